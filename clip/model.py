"""The CLIP text transformer of Stable Diffusion v1 (the ViT-L/14 text tower).

A pre-LayerNorm transformer with a causal mask: token ids (B, 77) become one
768-wide vector per position; Stable Diffusion cross-attends to all 77 of them.
Module names follow the checkpoints (`text_model.embeddings.token_embedding`,
`encoder.layers.N.self_attn.q_proj`, ...), so the original weights load with a
plain `load_state_dict`.

The embedding lookup is where personalization hooks in: `CLIPTextEmbeddings`
takes an optional mapping {new token id: vector(s)} and splices those vectors
in with `torch.where`. The frozen table is never resized or written, and the
learned vectors stay a separate parameter owned by the caller.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from clip.config import CLIPTextConfig


class Embedding(nn.Embedding):
    """nn.Embedding that draws no random weights when it is built on the meta device, to be
    loaded (ldm.load): there is nothing to draw there, and drawing a normal distribution on
    meta tensors imports PyTorch's compiler stack (1.7 s and 70 MB)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class CLIPTextEmbeddings(nn.Module):
    """Token embedding + learned absolute position embedding."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        # Saved in the SD v1 checkpoints, so it is a persistent buffer; always arange(77).
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).unsqueeze(0))

    def forward(self, input_ids: torch.Tensor,
                new_embeddings: Optional[Mapping[int, torch.Tensor]] = None) -> torch.Tensor:
        """input_ids (B, L) -> (B, L, D).

        `new_embeddings` maps a token id that the tokenizer added (>= vocab_size, or
        any id to override) to a vector (D,) shared by the batch, or (B, D) with one
        vector per batch row (NeTI: one per timestep and layer)."""
        vocab = self.token_embedding.num_embeddings
        new_embeddings = new_embeddings or {}
        unknown = input_ids >= vocab
        for token_id in new_embeddings:
            unknown &= input_ids != token_id
        if unknown.any():
            bad = sorted(set(input_ids[unknown].tolist()))
            raise ValueError(f"token ids {bad} are not in the embedding table and have no learned vector; "
                             "load the embedding that defines them")
        # A new token's id (>= vocab) has no row in the frozen table: look up a stand-in row,
        # which the torch.where below replaces with the learned vector.
        x = self.token_embedding(input_ids.clamp(max=vocab - 1))  # (B, L, D)
        for token_id, vector in new_embeddings.items():
            vector = vector.to(x.device, x.dtype)  # learned vectors may live elsewhere (fp32, CPU)
            vector = vector[:, None, :] if vector.dim() == 2 else vector  # (B, 1, D) or (D,)
            # mask (B, L, 1) with the vector (B, 1, D) or (D,) -> (B, L, D): the word's positions
            # take the learned vector, every other position keeps the table's row
            x = torch.where((input_ids == token_id).unsqueeze(-1), vector, x)
        positions = self.position_embedding(self.position_ids[:, : input_ids.shape[1]])
        return x + positions


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention (each token sees itself and the tokens before it)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        # (B, L, D) -> (B, heads, L, D/heads)
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x)  # quick-GELU, the activation CLIP was trained with
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """ids (B, 77) -> hidden states (B, 77, D), the `context` of the U-Net.

    `layer=-1` is the last layer (SD v1); `layer=-2` the penultimate one
    ("CLIP skip 2" of community models); a positive `layer=k` is the output of block k,
    counted from 1 (so k = n is -1). All go through the final LayerNorm.
    """

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, input_ids: torch.Tensor,
                new_embeddings: Optional[Mapping[int, torch.Tensor]] = None,
                layer: int = -1) -> torch.Tensor:
        tm = self.text_model
        n = len(tm.encoder.layers)
        stop = n + layer + 1 if layer < 0 else layer
        if not 1 <= stop <= n:
            raise ValueError(f"layer {layer} is out of range for a {n}-layer text encoder")
        x = tm.embeddings(input_ids, new_embeddings)  # (B, 77, D)
        for block in tm.encoder.layers[:stop]:
            x = block(x)
        return tm.final_layer_norm(x)


class FrozenCLIPEmbedder(nn.Module):
    """`cond_stage_model` of the CompVis checkpoints: holds the text model as `.transformer`."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.transformer = CLIPTextModel(cfg)
