"""Precision of the frozen networks while a new word is trained, shared by the three methods.

On CUDA the frozen U-Net, VAE and text encoder are kept in bfloat16 and run under autocast,
while the learned vectors (and NeTI's mapper) stay float32 and so does the loss. bfloat16 has
float32's range, so the small gradients that reach the new word cannot underflow and no loss
scaler is needed. float16 weights (`--precision fp16`) also run under bfloat16 autocast where the
GPU has it; `--precision fp32` turns autocast off. On the CPU everything runs in the weights' dtype.
"""
from __future__ import annotations

import torch

from ldm.cli import pick_dtype


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype for --precision: auto is bf16 on a CUDA GPU that has it, else fp32."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return pick_dtype(precision, device)  # an explicit choice means the same as for sampling


def autocast(model):
    """Autocast for the frozen networks: on CUDA with half-precision weights, bf16 where the GPU
    has it (else fp16); off for fp32 weights and off the GPU."""
    if model.device.type == "cuda" and model.dtype != torch.float32:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(model.device.type, enabled=False)
