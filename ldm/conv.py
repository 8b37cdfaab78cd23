"""A 2-D convolution that, on the CPU, computes large-weight layers on small images as a
matrix product.

A convolution is a matrix product: unfold the image into columns of k×k patches,

    cols = unfold(x)            # (B, C_in·k·k, H_out·W_out)
    y    = W.flatten(1) @ cols  # (B, C_out, H_out·W_out)

PyTorch's CPU convolution (oneDNN) first re-lays out the weight into its own blocked format,
on every call (`ONEDNN_VERBOSE=1` shows it: here 21 ms to reorder a 1280×1280×3×3 weight, for
a convolution that then takes about 5 ms on a 4×4 latent). That costs time in proportion to the
weight, not to the image, so it dominates where the weight is large and the image small: the
layers of SD's U-Net with 1280 or more input channels on its smallest latents (16×16 and below),
forward and backward. There the matrix product is up to 4 times faster (`bench/conv_cpu.py`
measures it layer by layer). Everywhere else, and on the GPU, the layer is an ordinary
`nn.Conv2d`; the weights and their names are the same. The thresholds below were measured on
one machine; to see yours, run the bench, and to turn the path off, set
`ldm.conv.MATMUL_MIN_WEIGHT = float("inf")`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# A layer takes the matrix-product path when its weight has at least this many numbers
# (a 3×3 convolution from 1280 to 1280 channels has 14.7 M, from 1920 to 640 11.1 M) ...
MATMUL_MIN_WEIGHT = 10_000_000
# ... and its output has at most this many positions per image (H_out · W_out). The rule does
# not look at the batch, so an image takes the same path, and gets the same numbers, in any batch.
MATMUL_MAX_POSITIONS = 256


def output_size(x: torch.Tensor, kernel, stride, padding):
    """(H_out, W_out) of a convolution of x (..., H, W) with zero padding."""
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(x.shape[-2:], kernel, stride, padding))


def conv2d_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias, stride, padding) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding) as unfold + one matrix product per image."""
    B, c_out = x.shape[0], weight.shape[0]
    kh, kw = weight.shape[-2:]
    h_out, w_out = output_size(x, (kh, kw), stride, padding)
    w = weight.flatten(1)                                          # (C_out, C_in·kh·kw)
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (B, C_in·kh·kw, h_out·w_out)
    # One product per image: a product over the whole batch can round an image differently
    # depending on the batch around it, and a seed must give the same image in any batch.
    y = torch.stack([w @ c for c in cols])                         # (B, C_out, h_out·w_out)
    if bias is not None:
        y = y + bias[:, None]
    return y.view(B, c_out, h_out, w_out)


def conv2d_as_matmul_input_grad(grad: torch.Tensor, weight: torch.Tensor, input_shape, stride, padding):
    """The gradient of conv2d_as_matmul with respect to its input x (B, C_in, H, W), from the
    output's gradient (B, C_out, H_out, W_out): the same products transposed, folded back.

        grad_cols = W.flatten(1)ᵀ @ grad      # (B, C_in·kh·kw, H_out·W_out)
        grad_x    = fold(grad_cols)           # overlapping patches add up
    """
    kh, kw = weight.shape[-2:]
    w_t = weight.flatten(1).t()                                    # (C_in·kh·kw, C_out)
    grad_cols = torch.stack([w_t @ g for g in grad.flatten(2)])    # (B, C_in·kh·kw, H_out·W_out)
    return F.fold(grad_cols, tuple(input_shape[-2:]), (kh, kw), padding=padding, stride=stride)


class Conv2d(nn.Conv2d):
    """nn.Conv2d, computed as a matrix product where that is the faster way on the CPU."""

    def use_matmul(self, x: torch.Tensor) -> bool:
        if self.weight.numel() < MATMUL_MIN_WEIGHT or x.device.type != "cpu" or x.dtype != torch.float32:
            return False
        if x.dim() != 4 or self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" \
                or isinstance(self.padding, str):
            return False  # what conv2d_as_matmul does not compute
        h_out, w_out = output_size(x, self.kernel_size, self.stride, self.padding)
        return h_out * w_out <= MATMUL_MAX_POSITIONS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_matmul(x):
            return conv2d_as_matmul(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)
