"""Precision of the frozen networks while a new word is trained, shared by the three methods.

On a CUDA GPU with bfloat16 arithmetic (compute capability 8.0, Ampere, or later) the frozen
U-Net, VAE and text encoder are kept in bfloat16 and run under autocast, while the learned
vectors (and NeTI's mapper) stay float32 and so does the loss. bfloat16 has float32's range, so
the small gradients that reach the new word cannot underflow and no loss scaler is needed. On
older GPUs `auto` is float32. float16 weights (`--precision fp16`) run under bfloat16 autocast
where the GPU has it, else float16: the new word's gradients then pass through float16, with no
loss scaler, and the smallest of them are lost (`fp16_warning`). `--precision fp32` turns autocast
off. Elsewhere everything runs in the weights' dtype.
"""
from __future__ import annotations

import contextlib

import torch

from ldm.cli import pick_dtype


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether this CUDA GPU computes in bfloat16 natively (compute capability 8.0 or later).
    (torch.cuda.is_bf16_supported() also says yes where bfloat16 is only emulated, slowly.)"""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype for --precision: auto is bf16 on a CUDA GPU that has it, else fp32."""
    if precision == "auto":
        return torch.bfloat16 if cuda_has_bf16(device) else torch.float32
    return pick_dtype(precision, device)  # an explicit choice means the same as for sampling


def fp16_warning(dtype: torch.dtype, device: torch.device) -> str:
    """What to tell a user who trains with float16 weights on a GPU without bfloat16 ('' otherwise)."""
    if dtype == torch.float16 and device.type == "cuda" and not cuda_has_bf16(device):
        return ("--precision fp16 on a GPU without bfloat16: the new word's gradients pass through float16 "
                "without a loss scaler and the smallest are lost; --precision fp32 trains exactly")
    return ""


def no_autocast(device_type: str):
    """Autocast off, for code that must compute in float32 inside an autocast region; a plain
    context where this PyTorch has no autocast for the device (mps before 2.5)."""
    if device_type in ("cuda", "cpu"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast(model):
    """Autocast for the frozen networks: on CUDA with half-precision weights, bf16 where the GPU
    has it (else fp16); off for fp32 weights and off the GPU."""
    if model.device.type == "cuda" and model.dtype != torch.float32:
        dtype = torch.bfloat16 if cuda_has_bf16(model.device) else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return no_autocast(model.device.type)
