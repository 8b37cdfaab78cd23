"""Frozen weights kept in float16 and computed in float32: half the weights' memory on a CPU.

A CPU computes in float32 (its float16 arithmetic, where it has any, is slow), so a model loaded
for the CPU holds its weights in float32: 4.3 GB for SD v1.5, most of what training it needs.
With `--half-weights` every linear, convolution and embedding layer keeps its weight in float16,
2 bytes a number (biases and normalization weights, 0.06% of SD's numbers, stay float32), and
casts it to float32 where it is used:

    forward:   y = x · float32(W16)ᵀ + b      W16 is all the layer keeps for the backward pass
    backward:  ∂L/∂x = ∂L/∂y · float32(W16)   (the weights are frozen: no gradient for W)

The arithmetic is float32's. What changes is that each weight is rounded to float16 once, and
for a model read from an fp16 file (SD v1.5 is also shared as one) nothing changes at all: that
file holds exactly these values, and its samples and learned words are the same numbers as with
float32 weights. A convolution also keeps less for the backward pass than PyTorch's, which saves
its input too, for a weight gradient that frozen weights never need. The price is time: each
weight is cast twice a training step (forward and backward) and once a sampling step. Cast into
one reused buffer (`_Scratch`), that is about 0.3 s for SD's 860 M U-Net numbers on a 2-core CPU.

`ldm.load.load(path, half_weights=True)` loads a file in this form (from an fp16 file no float32
copy of a weight is ever made); `keep_weights_in_fp16(model)` converts a model in memory. The
modules keep their names and their parameters, so `state_dict()` keys are unchanged.
"""
from __future__ import annotations

import threading
from typing import Iterator, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ldm.conv import Conv2d, conv2d_as_matmul, conv2d_as_matmul_input_grad

STORAGE_DTYPE = torch.float16
LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding)  # whose weight is kept in float16


class _Scratch(threading.local):
    """One buffer per device, dtype and thread that each layer casts its weight into. No layer
    keeps its float32 weight past its own product, so one buffer, the size of the largest
    weight, serves them all; and casting into memory already in use is about 4 times faster
    on a CPU than into a new tensor, whose pages the system must first find and zero (18 ms
    against 4.3 ms for a 3×3 convolution from 1280 to 1280 channels, on 2 cores)."""

    def __init__(self):
        self.buffers = {}

    def cast(self, weight16: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (weight16.device, dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < weight16.numel():
            buffer = self.buffers[key] = torch.empty(weight16.numel(), dtype=dtype, device=weight16.device)
        return buffer[: weight16.numel()].view(weight16.shape).copy_(weight16)


_scratch = _Scratch()


class _Linear(torch.autograd.Function):
    """F.linear(x, float32(W16), b) that keeps only W16 for the backward pass."""

    @staticmethod
    def forward(ctx, x, weight16, bias):
        ctx.save_for_backward(weight16)
        return F.linear(x, _scratch.cast(weight16, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        (weight16,) = ctx.saved_tensors
        return grad @ _scratch.cast(weight16, grad.dtype), None, None  # (..., in): ∂L/∂x only


class _Conv2d(torch.autograd.Function):
    """The convolution `conv` computes (ldm.conv.Conv2d: a matrix product or F.conv2d), with
    float32(W16), keeping only W16 and the input's shape for the backward pass."""

    @staticmethod
    def forward(ctx, x, weight16, bias, conv):
        ctx.conv, ctx.input_shape, ctx.matmul = conv, x.shape, conv.use_matmul(x)
        ctx.save_for_backward(weight16)
        weight = _scratch.cast(weight16, x.dtype)
        if ctx.matmul:
            return conv2d_as_matmul(x, weight, bias, conv.stride, conv.padding)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad):
        (weight16,) = ctx.saved_tensors
        conv, weight = ctx.conv, _scratch.cast(weight16, grad.dtype)
        if ctx.matmul:
            grad_x = conv2d_as_matmul_input_grad(grad, weight, ctx.input_shape, conv.stride, conv.padding)
        else:
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad, conv.stride, conv.padding,
                                                conv.dilation, conv.groups)
        return grad_x, None, None, None


class HalfLinear(nn.Linear):
    """nn.Linear with a float16 weight, computed in the input's dtype (float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Linear.apply(x, self.weight, self.bias)


class HalfConv2d(Conv2d):
    """ldm.conv.Conv2d (the U-Net's, and the VAE's nn.Conv2d) with a float16 weight, computed in
    the input's dtype (float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Conv2d.apply(x, self.weight, self.bias, self)


class HalfEmbedding(nn.Embedding):
    """nn.Embedding with a float16 table: the rows looked up are returned in float32."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()  # (..., D)


HALF_CLASS = {nn.Linear: HalfLinear, nn.Conv2d: HalfConv2d, nn.Embedding: HalfEmbedding}


def _layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, LAYERS):
            yield name, module


def half_weight_names(model: nn.Module) -> Set[str]:
    """The state_dict keys `keep_weights_in_fp16` stores in float16: each layer's `.weight`."""
    return {f"{name}.weight" if name else "weight" for name, _ in _layers(model)}


def keep_weights_in_fp16(model: nn.Module) -> nn.Module:
    """Keep the weights of `model`'s linear, convolution and embedding layers in float16, each
    layer computing in float32 from then on (its class becomes the Half* one above, with the same
    parameters; nothing else changes). The model must compute in float32 and its weights must be
    frozen: the layers give no gradient for their weights."""
    for name, module in _layers(model):
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            raise ValueError(f"{name or 'the model'}: half weights are for frozen layers; its weights require grad")
        if module.weight.dtype not in (torch.float32, STORAGE_DTYPE):
            raise ValueError(f"{name or 'the model'}: half weights compute in float32; its weight is "
                             f"{module.weight.dtype}")
        if module.weight.dtype != STORAGE_DTYPE:
            module.weight = nn.Parameter(module.weight.detach().to(STORAGE_DTYPE), requires_grad=False)
        base = next(cls for cls in HALF_CLASS if isinstance(module, cls))
        # Same attributes, same parameters: only the forward pass changes.
        module.__class__ = HALF_CLASS[base]
    return model
