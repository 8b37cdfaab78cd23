"""Stable Diffusion v1 as one module whose `state_dict()` is the CompVis checkpoint.

    model.diffusion_model.*                    the U-Net (ldm/unet.py)
    first_stage_model.*                        the VAE (ldm/vae.py)
    cond_stage_model.transformer.text_model.*  the CLIP text encoder (clip/model.py)
    betas, alphas_cumprod, ...                 the noise schedule, as buffers

Short names for notebooks: `.unet`, `.vae`, `.text_encoder`, `.tokenizer`, `.schedule`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from clip.model import FrozenCLIPEmbedder, CLIPTextModel
from ldm.config import ModelConfig
from ldm.schedule import NoiseSchedule
from ldm.unet import DiffusionWrapper, UNetModel
from ldm.vae import AutoencoderKL


class StableDiffusion(nn.Module):
    def __init__(self, config: Optional[ModelConfig] = None, tokenizer=None):
        super().__init__()
        self.config = config = config or ModelConfig()
        self.model = DiffusionWrapper(config.unet)
        self.first_stage_model = AutoencoderKL(config.vae)
        self.cond_stage_model = FrozenCLIPEmbedder(config.text)
        self.schedule = NoiseSchedule(config.schedule)
        for name, value in self.schedule.compvis_buffers().items():
            self.register_buffer(name, value)  # stored in the CompVis files; rebuilt when absent
        self._tokenizer = tokenizer

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.cond_stage_model.transformer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from clip.tokenizer import Tokenizer
            self._tokenizer = Tokenizer()
        return self._tokenizer

    @property
    def scale_factor(self) -> float:
        return self.config.vae.scale_factor

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the networks compute in: that of the U-Net's last normalization weight, which
        keeps it even where the large weights are stored in float16 (ldm/half_weights.py)."""
        return self.unet.out[0].weight.dtype

    def _apply(self, fn, *args, **kwargs):
        # keep the schedule on the same device as the buffers (used by samplers and training)
        out = super()._apply(fn, *args, **kwargs)
        self.schedule = self.schedule.to(self.betas.device)
        return out

    @torch.no_grad()
    def encode_prompts(self, prompts: Union[str, Sequence[str]], new_embeddings=None) -> torch.Tensor:
        """prompts -> text-encoder output (B, 77, D) in the model's dtype."""
        ids = self.tokenizer([prompts] if isinstance(prompts, str) else list(prompts)).to(self.device)
        return self.text_encoder(ids, new_embeddings).to(self.dtype)

    def encode_images(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                      sample: bool = True) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/f, W/f), the diffusion space."""
        posterior = self.vae.encode(images.to(self.device, self.dtype))
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents -> images (B, 3, H, W) clamped to [-1, 1]."""
        return self.vae.decode(latents / self.scale_factor).clamp(-1, 1)
