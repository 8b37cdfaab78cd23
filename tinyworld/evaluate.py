"""How well does a model draw what it is told? Sample prompts, read the images back.

    python -m tinyworld.evaluate                    # the shipped tiny model, 240 prompts
    python -m tinyworld.evaluate --ckpt runs/x.safetensors --n 48 --steps 20 --grid grid.png

Prompts name size, color, shape, position and background of combinations that never occur
in training (`tinyworld.world.heldout_combos`); the analyzer reads each generated image,
and the accuracy of every named attribute is printed. Two smaller tables follow: prompts that
name a texture (striped, dotted), and the autoencoder alone (rendered images encoded and
decoded, read back), which is where the tiny model loses textures.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ldm.cli import (Parser, check_file_writable, image_path_arg, nonnegative_float, path_arg, positive_int,
                     seed_int)
from tinyworld.tools import MEMORY_ADVICE, load_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SCORED = ("shape", "color", "size", "position", "background")


def eval_prompts(n: int, seed: int = 0):
    """n (Attributes, prompt) pairs of held-out combinations, plain texture."""
    from tinyworld.world import prompt, sample_attributes
    rng = np.random.default_rng([seed, 99])
    attrs = [sample_attributes(rng, "eval", textures=("plain",)) for _ in range(n)]
    return attrs, [prompt(a) for a in attrs]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3)."""
    return (images.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def sample_prompts(model, prompts, seeds, steps=50, scale=7.5, batch=64, desc=None, **kw) -> np.ndarray:
    """uint8 (N, H, W, 3) samples, one per (prompt, seed), `batch` at a time; with `desc`, a
    progress bar of the batches on stderr."""
    from ldm.generate import generate
    out = []
    starts = range(0, len(prompts), batch)
    if desc is not None:
        from ldm.cli import progress_bar
        starts = progress_bar(len(starts), desc, unit="batch", iterable=starts, leave=False)
    for i in starts:
        out.append(to_uint8(generate(model, prompts[i:i + batch], seeds[i:i + batch], steps=steps,
                                     scale=scale, **kw)))
    return np.concatenate(out)


def read_accuracy(reads, attrs, attributes=SCORED) -> dict:
    """Share of the analyzer's reads that equal the intended value, per attribute."""
    return {a: float(np.mean([r[a] == getattr(t, a) for r, t in zip(reads, attrs)])) for a in attributes}


def accuracy(images: np.ndarray, attrs, attributes=SCORED) -> dict:
    from tinyworld.analyze import analyze_batch
    return read_accuracy(analyze_batch(images), attrs, attributes)


def print_table(title: str, acc: dict) -> None:
    print(title)
    print("| attribute | accuracy |\n|---|---|")
    for k, v in acc.items():
        print(f"| {k} | {v:.1%} |")


def evaluate_model(model, n=240, steps=50, scale=7.5, seed=0, quiet=False, grid=None) -> dict:
    attrs, prompts = eval_prompts(n, seed)
    images = sample_prompts(model, prompts, [seed + i for i in range(n)], steps=steps, scale=scale,
                            desc=None if quiet else "held-out prompts")
    acc = accuracy(images, attrs)
    if grid is not None:
        from tinyworld.world import save_grid
        save_grid(str(grid), images[:32], prompts[:32])
    if not quiet:
        print_table(f"{n} prompts of held-out combinations, DDIM {steps} steps, guidance {scale}", acc)
    return acc


def texture_word_accuracy(model, n=64, steps=50, scale=7.5, seed=0, desc=None) -> dict:
    """Share of prompts naming "striped" or "dotted" whose samples the analyzer reads so."""
    from tinyworld.world import prompt, sample_attributes
    rng = np.random.default_rng([seed, 98])
    attrs = [sample_attributes(rng, "eval", textures=("striped", "dotted")) for _ in range(n)]
    prompts = [prompt(a, include=("size", "color", "texture", "shape", "position", "background")) for a in attrs]
    images = sample_prompts(model, prompts, [seed + i for i in range(n)], steps=steps, scale=scale, desc=desc)
    return accuracy(images, attrs, ("texture", "shape", "color"))


@torch.no_grad()
def autoencoder_reads(model, images: np.ndarray) -> list:
    """What the analyzer reads on uint8 (N, H, W, 3) images after the autoencoder's round trip
    (encoder mean, decoder): what the latents, and so the diffusion model, can carry at best."""
    from tinyworld.analyze import analyze_batch
    from tinyworld.train import to_tensor
    x = to_tensor(images).to(model.device, model.dtype)
    recon = model.vae.decode(model.vae.encode(x).mean).float().clamp(-1, 1)
    return analyze_batch(to_uint8((recon + 1) / 2))


def autoencoder_accuracy(model, n=256, seed=0) -> dict:
    """The VAE alone: n rendered images (every shape and texture) encoded, decoded and read back;
    'textured' is the texture accuracy on the striped, dotted and checkered ones, then each alone."""
    from tinyworld.world import HELDOUT_TEXTURES, TEXTURES, render, sample_attributes
    rng = np.random.default_rng([seed, 97])
    attrs = [sample_attributes(rng, "any") for _ in range(n)]
    reads = autoencoder_reads(model, np.stack([render(a, rng) for a in attrs]))
    acc = read_accuracy(reads, attrs, ("shape", "color", "size", "texture"))
    textured = [r["texture"] == t.texture for r, t in zip(reads, attrs) if t.texture != "plain"]
    acc["texture (textured only)"] = float(np.mean(textured))
    for texture in (*TEXTURES[1:], *HELDOUT_TEXTURES):
        kept = [r["texture"] == t.texture for r, t in zip(reads, attrs) if t.texture == texture]
        acc[f"texture: {texture}"] = float(np.mean(kept)) if kept else float("nan")
    return acc


def main(argv=None) -> int:
    p = Parser(prog="python -m tinyworld.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=path_arg, default=ROOT / "weights" / "tiny.safetensors",
                   help="a tiny-world model (.safetensors, .ckpt or a diffusers folder)")
    p.add_argument("--n", type=positive_int, default=240, help="number of prompts (one image each)")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps")
    p.add_argument("--scale", type=nonnegative_float, default=7.5, help="guidance scale")
    p.add_argument("--seed", type=seed_int, default=0, help="picks the prompts; image i is sampled with seed + i")
    p.add_argument("--grid", type=image_path_arg, default=None, help="write the first 32 samples with their prompts")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps, or auto: a GPU if there is one")
    args = p.parse_args(argv)
    if args.grid is not None:
        check_file_writable(args.grid, "--grid")
    from ldm.cli import pick_device
    device = pick_device(args.device)  # a bad name: one line, from ldm.cli.run
    model = load_tiny_model(args.ckpt, device, sample_steps={"--steps": args.steps})
    evaluate_model(model, n=args.n, steps=args.steps, scale=args.scale, seed=args.seed, grid=args.grid)
    n_tex = max(1, args.n // 4)
    print_table(f"\n{n_tex} prompts naming a texture (striped or dotted)",
                texture_word_accuracy(model, n=n_tex, steps=args.steps, scale=args.scale, seed=args.seed,
                                      desc="texture prompts"))
    print_table("\nThe autoencoder alone: 256 rendered images encoded, decoded and read back",
                autoencoder_accuracy(model, seed=args.seed))
    return 0


if __name__ == "__main__":
    from ldm.cli import run
    sys.exit(run(main, prog="tinyworld.evaluate", memory_advice=MEMORY_ADVICE))
