"""The conditional U-Net of Stable Diffusion v1 (CompVis `openaimodel.UNetModel`).

It predicts the noise ε in a noisy latent x_t (B, 4, h, w), given the timestep
t and the text `context` (B, 77, 768) that it reads through cross-attention.

Module names equal the CompVis checkpoint keys. Position-numbered names such as
`in_layers.2` or `input_blocks.4.1` come from `nn.Sequential`/`nn.ModuleList`
in the original; we keep the same containers so the weights load unchanged.

Text conditioning can vary per cross-attention layer (NeTI): `context` is one
tensor for every layer, or a sequence with one tensor per layer. Each
SpatialTransformer knows its own `layer_index`, set once at construction in
the order input blocks -> middle -> output blocks (16 layers in SD v1:
IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03 ... OUT11).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.config import UNetConfig
from ldm.conv import Conv2d

Context = Union[torch.Tensor, Sequence[torch.Tensor]]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as in the original)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim), [cos | sin] order."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """Two 3×3 convolutions with the timestep embedding added in between."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    """softmax(Q Kᵀ / √d) V with queries from the image and keys/values from `context`.

    With no context it is self-attention. `value_context`, if given, feeds the values
    while `context` feeds the keys (NeTI's textual bypass changes only the values)."""

    def __init__(self, query_dim: int, context_dim: Optional[int], heads: int):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                value_context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context.to(x.dtype)
        value_context = context if value_context is None else value_context.to(x.dtype)
        B, N, C = x.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, -1).transpose(1, 2)  # (B, heads, n, d)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(value_context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))  # (B, heads, N, d) -> (B, N, heads·d = C)


class GEGLU(nn.Module):
    """Linear to 2×inner, then value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-LN and residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context, value_context=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, value_context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Flattens the feature map to tokens, runs transformer blocks with text cross-attention,
    and adds the result back. `layer_index` picks this layer's text in per-layer conditioning."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # CompVis `Normalize`: eps 1e-6, not GroupNorm32
        self.proj_in = Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: Context, value_context: Optional[Context] = None):
        if not torch.is_tensor(context):
            context = context[self.layer_index]
        if value_context is not None and not torch.is_tensor(value_context):
            value_context = value_context[self.layer_index]
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, C, H, W) -> (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context, value_context)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, HW, C) -> (B, C, H, W)
        return x + self.proj_out(h)


class TimestepEmbedSequential(nn.ModuleList):
    """A block of the U-Net: passes the timestep embedding to ResBlocks and the text to
    SpatialTransformers. (A ModuleList so the keys are `input_blocks.N.M.*`.)"""

    def forward(self, x, emb, context, value_context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, value_context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """ε_θ(x_t, t, text): encoder blocks push skips, decoder blocks pop them."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = ch * 4
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        layer_index = 0

        def attention(channels):
            nonlocal layer_index
            block = SpatialTransformer(channels, cfg.num_heads, cfg.transformer_depth, cfg.context_dim,
                                       groups, layer_index)
            layer_index += 1
            return block

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        # the channels of each input block's output: pushed in order here, popped in reverse by
        # the output blocks, whose ResBlocks take them concatenated to their input (the skips)
        skip_channels = [ch]
        downsample_rate = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, cfg.model_channels * mult, groups)]
                ch = cfg.model_channels * mult
                if downsample_rate in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
                downsample_rate *= 2

        self.middle_block = TimestepEmbedSequential(
            [ResBlock(ch, emb_dim, ch, groups), attention(ch), ResBlock(ch, emb_dim, ch, groups)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):  # one more than the encoder: the Downsample's skip too
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, cfg.model_channels * mult, groups)]
                ch = cfg.model_channels * mult
                if downsample_rate in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    downsample_rate //= 2
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.num_cross_attention_layers = layer_index
        self.gradient_checkpointing = False  # see run_block

    def run_block(self, block: TimestepEmbedSequential, h, emb, context, value_context):
        """One block. With `gradient_checkpointing` (and gradients on), the block's activations are
        not kept for the backward pass but computed again there from its inputs: the backward holds
        one block's activations at a time instead of all of them, for one more forward pass of
        time. The numbers are the same (the same operations on the same inputs)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, value_context, use_reentrant=False)
        return block(h, emb, context, value_context)

    def forward(self, x: torch.Tensor, t: Union[torch.Tensor, int], context: Context,
                value_context: Optional[Context] = None) -> torch.Tensor:
        """x (B, 4, h, w), t (B,) or a scalar, context (B, 77, D) or one per layer -> ε (B, 4, h, w)."""
        for ctx in (context, value_context):
            if ctx is not None and not torch.is_tensor(ctx) and len(ctx) != self.num_cross_attention_layers:
                raise ValueError(f"per-layer context needs {self.num_cross_attention_layers} tensors, got {len(ctx)}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        h, skips = x, []
        for block in self.input_blocks:
            h = self.run_block(block, h, emb, context, value_context)
            skips.append(h)
        h = self.run_block(self.middle_block, h, emb, context, value_context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C_h + C_skip, h, w)
            h = self.run_block(block, h, emb, context, value_context)
        return self.out(h)


class DiffusionWrapper(nn.Module):
    """`model` of the CompVis checkpoint: holds the U-Net as `.diffusion_model`."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.diffusion_model = UNetModel(cfg)
