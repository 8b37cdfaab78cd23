"""Text to image: encode the prompt, denoise from Gaussian noise, decode the latents.

Each image i has its own CPU generator, seeded with its seed, which draws its starting noise
and then any noise the sampler adds (DDPM, or DDIM with eta > 0), so the same seed gives the
same picture whatever the batch size, the rest of the batch or the device: bit for bit on the
CPU; on a GPU the kernels chosen for each batch size round differently, so pixels can differ
slightly (tests/test_sample_cli.py allows two levels of 255).
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import torch

from ldm.model import StableDiffusion
from ldm.samplers import ddim_sample, ddpm_sample, guided_denoiser

SAMPLERS = ("ddim", "ddpm")
MAX_RESOLUTION = 2048  # pixels a side that the tools accept (SD v1 is trained at 512)


class SamplingError(Exception):
    """The sampled images hold NaN or infinite numbers: a guidance scale, a learned vector or a
    weight so large that float32 (or float16) overflowed on the way. Raised rather than handing
    back images that would be saved as black squares."""


def size_multiple(model: StableDiffusion) -> int:
    """What an image's height and width must be a multiple of: the VAE's factor, then a halving of
    the latents at every U-Net level but the last (SD v1: 8 × 2³ = 64)."""
    return model.config.vae.downsample_factor * 2 ** (len(model.config.unet.channel_mult) - 1)


def latent_shape(model: StableDiffusion, height: int, width: int) -> tuple:
    """(C, h, w) of the latents for an image, or ValueError if the size does not fit the U-Net."""
    f, multiple = model.config.vae.downsample_factor, size_multiple(model)
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            raise ValueError(f"{name} {value} must be a positive multiple of {multiple} for this model")
    return (model.config.vae.embed_dim, height // f, width // f)


def initial_noise(shape: tuple, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """x_T (B, C, h, w): image i's noise drawn by generators[i] alone."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])


@torch.no_grad()
def generate(model: StableDiffusion, prompts: Sequence[str], seeds: Sequence[int], *,
             negative_prompt: str = "", steps: int = 50, scale: float = 7.5, sampler: str = "ddim",
             eta: float = 0.0, height: Optional[int] = None, width: Optional[int] = None,
             new_embeddings=None, cond=None, uncond=None, value_cond=None, value_uncond=None,
             progress: Optional[Callable] = None) -> torch.Tensor:
    """Sample one image per (prompt, seed): returns images (B, 3, H, W) in [0, 1] on the CPU.

    `cond`/`uncond` override the text encoding: a tensor (B, 77, D), a list with one per
    cross-attention layer, or a function of the timestep (NeTI). `value_cond`/`value_uncond`,
    in the same forms, replace them for the cross-attention values only (NeTI's textual
    bypass). `new_embeddings` are learned token vectors spliced into the embedding lookup
    (Textual Inversion)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if len(prompts) != len(seeds):
        raise ValueError("give one seed per prompt")
    if not all(0 <= int(s) < 2 ** 63 for s in seeds):
        raise ValueError("seeds must be between 0 and 2**63 - 1")
    if not (0 <= scale < float("inf")):  # also refuses nan, which would give black images
        raise ValueError(f"scale must be a number >= 0, got {scale}")
    height = height or model.config.image_size
    width = width or model.config.image_size
    shape = latent_shape(model, height, width)
    if cond is None:
        cond = model.encode_prompts(list(prompts), new_embeddings)
    if uncond is None and scale != 1.0:  # at scale 1 the prompt alone: no unconditional pass
        uncond = model.encode_prompts([negative_prompt], new_embeddings)  # (1, 77, D), broadcast over the batch
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]  # one per image, on the CPU
    x_T = initial_noise(shape, generators).to(model.device, model.dtype)
    denoiser = guided_denoiser(model.unet, cond, uncond, scale, value_cond=value_cond, value_uncond=value_uncond)
    if sampler == "ddim":
        z = ddim_sample(denoiser, x_T, model.schedule, steps, eta=eta, generator=generators, progress=progress)
    else:
        z = ddpm_sample(denoiser, x_T, model.schedule, steps, generator=generators, progress=progress)
    images = model.decode_latents(z).float()
    if not torch.isfinite(images).all():
        raise SamplingError(f"the sampled images hold NaN or infinite numbers (guidance scale {scale:g}, "
                            f"{str(model.dtype).removeprefix('torch.')}): the scale, a learned file's numbers or "
                            "the model's weights are too large for the precision")
    return ((images + 1) / 2).clamp(0, 1).cpu()


def generate_or_warn(path, model: StableDiffusion, prompts: Sequence[str], seeds: Sequence[int],
                     desc: Optional[str] = None, **kwargs) -> Optional[torch.Tensor]:
    """`generate`, for a picture a training run writes at `path` beside what it learned: None when
    the images overflowed, with a warning that `path` is not written, and the training goes on.
    With `desc`, a progress bar of its denoising steps (at SD's sizes such a picture takes
    minutes on a CPU)."""
    from ldm.cli import counting, progress_bar
    bar = progress_bar(kwargs.get("steps", 50), desc, disable=desc is None)
    try:
        return generate(model, prompts, seeds, progress=counting(bar), **kwargs)
    except SamplingError as e:
        print(f"warning: {path} not written: {e}", file=sys.stderr)
        return None
    finally:
        bar.close()


def to_pil(images: torch.Tensor):
    """(B, 3, H, W) in [0, 1] -> list of PIL images."""
    from PIL import Image
    arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arrays]


def make_grid(images, columns: Optional[int] = None):
    """Tile PIL images of one size into one PIL image, `columns` wide (default: near-square)."""
    from PIL import Image
    import math
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid


@torch.no_grad()
def save_prompt_row(model: StableDiffusion, prompts: Sequence[str], path, steps: int, upscale: int = 1,
                    size: Optional[int] = None, desc: Optional[str] = None, **conditioning) -> None:
    """One image of each prompt (seeds 0, 1, ...), side by side in one PNG: a training run's
    validation grid, drawn `size` pixels square (default: the model's size), with a progress bar
    if `desc` is given. `conditioning` is what `generate` takes besides the prompts (learned
    token vectors, or NeTI's per-layer text encodings)."""
    images = generate_or_warn(path, model, prompts, list(range(len(prompts))), desc=desc, steps=steps,
                              height=size, width=size, **conditioning)
    if images is None:
        return
    save_image(make_grid(to_pil(images), columns=len(prompts)), path, upscale=upscale)


def save_image(image, path, pnginfo=None, upscale: int = 1) -> None:
    """Write a PIL image through a temporary file, so that an interrupted run leaves no
    half-written image; `upscale` enlarges it with square pixels (the tiny model's 32-px images).
    The format is the name's (.jpg, .webp), PNG for any other; `pnginfo`, the settings as text,
    goes into PNG files only."""
    from pathlib import Path
    from ldm.cli import IMAGE_FORMATS
    from ldm.files import atomic_write
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), 0)  # 0 = nearest
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower(), "PNG")
    options = {"pnginfo": pnginfo} if fmt == "PNG" else {"quality": 95}
    atomic_write(Path(path), lambda tmp: image.save(tmp, format=fmt, **options))
