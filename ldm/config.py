"""Configurations of the three networks of Stable Diffusion v1.

Each dataclass's defaults are the sizes of the public SD v1.x checkpoints, so
`UNetConfig()` is SD v1.5 and tests build tiny models by overriding fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict

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
        return cls(unet=build(UNetConfig, d.get("unet")), vae=build(VAEConfig, d.get("vae")),
                   text=build(CLIPTextConfig, d.get("text")),
                   schedule=build(ScheduleConfig, d.get("schedule")),
                   image_size=int(d.get("image_size", 512)))
