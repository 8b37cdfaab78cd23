"""Configurations of the three networks of Stable Diffusion v1.

Each dataclass's defaults are the sizes of the public SD v1.x checkpoints, so
`UNetConfig()` is SD v1.5 and tests build tiny models by overriding fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, asdict

from clip.config import CLIPTextConfig


@dataclass
class UNetConfig:
    """`UNetModel` of CompVis `v1-inference.yaml` (model.params.unet_config)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)  # downsample rates that get a SpatialTransformer
    num_heads: int = 8
    context_dim: int = 768
    transformer_depth: int = 1
    norm_groups: int = 32


@dataclass
class VAEConfig:
    """`AutoencoderKL` of CompVis `v1-inference.yaml` (first_stage_config)."""
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215  # latents are scaled to unit variance before diffusion

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class ScheduleConfig:
    """The DDPM noise schedule of `LatentDiffusion` ("linear" in ldm, "scaled_linear" in diffusers)."""
    num_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012


@dataclass
class ModelConfig:
    """Everything needed to build a Stable Diffusion v1 model."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    image_size: int = 512  # the resolution the model was trained at: the default of sample.py

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        def build(klass, values):
            values = dict(values or {})
            for k, v in values.items():
                if isinstance(v, list):
                    values[k] = tuple(v)
            return klass(**values)
        if not isinstance(d, dict):
            raise TypeError(f"a configuration is a JSON object, not {type(d).__name__}")
        return cls(unet=build(UNetConfig, d.get("unet")), vae=build(VAEConfig, d.get("vae")),
                   text=build(CLIPTextConfig, d.get("text")),
                   schedule=build(ScheduleConfig, d.get("schedule")),
                   image_size=d.get("image_size", 512))

    def check(self) -> None:
        """ValueError naming the first size that no network can be built with, or that would
        fail only later (a head count that does not divide the width fails mid-sampling)."""
        for part in (self.unet, self.vae, self.text, self.schedule, self):
            for f in fields(part):
                value = getattr(part, f.name)
                if f.type in ("int", int) and not whole_number(value):
                    raise ValueError(f"{f.name} is {value!r}, not a whole number from 1 to {MAX_SIZE:,}")
                if f.type in ("tuple", tuple) and not (isinstance(value, tuple) and all(map(whole_number, value))):
                    raise ValueError(f"{f.name} is {value!r}, not a list of whole numbers from 1 to {MAX_SIZE:,}")
                if f.type in ("float", float) and not positive_number(value):
                    raise ValueError(f"{f.name} is {value!r}, not a number > 0")
        if self.schedule.num_timesteps < MIN_TIMESTEPS:
            raise ValueError(f"num_timesteps is {self.schedule.num_timesteps}; the tools sample with "
                             f"{MIN_TIMESTEPS} DDIM steps by default, so at least {MIN_TIMESTEPS} (SD v1 has 1000)")
        if not self.unet.channel_mult or not self.vae.ch_mult:
            raise ValueError("channel_mult and ch_mult need one entry per level")
        if not self.schedule.linear_start <= self.schedule.linear_end < 1:
            raise ValueError(f"the noise schedule's betas run from {self.schedule.linear_start} to "
                             f"{self.schedule.linear_end}; they must rise and stay below 1")
        unet, vae, text = self.unet, self.vae, self.text
        for name, width, groups in [*((f"U-Net width {unet.model_channels * m}", unet.model_channels * m,
                                       unet.norm_groups) for m in (1, *unet.channel_mult)),
                                    *((f"VAE width {vae.ch * m}", vae.ch * m, vae.norm_groups) for m in vae.ch_mult)]:
            if width % groups:
                raise ValueError(f"{name} is not divisible by its {groups} norm groups")
        for m in unet.channel_mult:
            if (unet.model_channels * m) % unet.num_heads:
                raise ValueError(f"U-Net width {unet.model_channels * m} is not divisible by its {unet.num_heads} "
                                 "heads")
        if text.hidden_size % text.num_attention_heads:
            raise ValueError(f"text width {text.hidden_size} is not divisible by its {text.num_attention_heads} heads")


MIN_TIMESTEPS = 50  # DDIM 50, the default of every sampling tool and of the training runs' validation grids
MAX_SIZE = 1 << 20  # no size of an SD v1 network is near it (the largest, the vocabulary, is 49,408)


def whole_number(value, least: int = 1, most: int = MAX_SIZE) -> bool:
    """A configuration's whole number (not a bool, a float or a text) from `least` to `most`."""
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= most


def positive_number(value) -> bool:
    """A configuration's finite number > 0 (not a bool or a text)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
