"""Latent diffusion: the U-Net, the VAE, the noise schedule and samplers of Stable Diffusion v1."""
from ldm.config import ModelConfig, UNetConfig, VAEConfig, CLIPTextConfig, ScheduleConfig
from ldm.files import LoadError
from ldm.load import load, save
from ldm.model import StableDiffusion

__all__ = ["load", "save", "LoadError", "StableDiffusion", "ModelConfig", "UNetConfig", "VAEConfig",
           "CLIPTextConfig", "ScheduleConfig"]
