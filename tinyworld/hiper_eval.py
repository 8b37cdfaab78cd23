"""Does HiPer keep the subject while following the edit? A results table on the tiny world.

    python -m tinyworld.hiper_eval                        # 20 source images, weights/tiny.safetensors
    python -m tinyworld.hiper_eval --ckpt x.safetensors --n 2 --steps 4 --ti-steps 4 --sample-steps 4

Each source is a rendered tiny-world object with its canonical prompt ("a large red circle on
the left on a black background"). Each edit changes one attribute of the prompt: position,
background, or texture (a named texture word, "striped" or "dotted"). The target is drawn
three ways, with the same seeds:

    target prompt   the plain target prompt: no personalization
    TI              Textual Inversion of the one image ("<obj>" learned from "object"), then the
                    target prompt with the shape word replaced by "<obj>"
    HiPer           [e_tgt[:77-K]; α e_hiper], the tail learned on the source image

The analyzer reads every image. identity kept: shape, color and size are the source's;
edit honored: the edited attribute has its new value. The α sweep shows the trade-off: α = 0
is the target prompt with its tail rows zeroed, α = 1 the tail as learned.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from tinyworld import world as W
from tinyworld.tools import MEMORY_ADVICE, load_tiny_model

ROOT = Path(__file__).resolve().parents[1]
FULL = ("size", "color", "shape", "position", "background", "texture")   # what a source prompt says
IDENTITY = ("shape", "color", "size")                                     # what an edit must keep
EDITS = ("position", "background", "texture")
ALPHAS = (0.0, 0.4, 0.8, 1.0)
ALPHA = 0.8                     # the paper's α, used in the main table
TI_WORD = "<obj>"


@dataclass
class Result:
    method: str                 # "target prompt", "TI", "HiPer"
    alpha: Optional[float]      # HiPer's α
    edit: str                   # "position", "background", "texture"; "none" for the reconstruction
    identity: bool
    honored: bool
    image: np.ndarray           # (32, 32, 3) uint8


# ----------------------------------------------------------------------------- sources and edits

def source_prompt(attrs: W.Attributes) -> str:
    """The canonical prompt with the texture said when it is not plain."""
    return W.prompt(attrs, include=FULL)


def longest_prompt(n: int, seed: int) -> int:
    """Tokens (start and end included) of the longest source or target prompt of n sources:
    HiPer's tail takes the rows after it."""
    from clip.tokenizer import Tokenizer
    tokenizer = Tokenizer()
    prompts = [source_prompt(a) for i in range(n) for attrs, _, targets in [make_source(seed, i)]
               for a in (attrs, *targets.values())]
    return max(len(tokenizer.encode(p)) for p in prompts)


def ti_prompt(attrs: W.Attributes, word: str = TI_WORD) -> str:
    return W.prompt(attrs, include=FULL, shape_word=word)


def make_source(seed: int, index: int):
    """(Attributes, image uint8 (32, 32, 3), {edit: target Attributes}) of source `index`:
    a named shape (so that the prompt names it), plain texture (so that any texture word is an edit)."""
    rng = np.random.default_rng([seed, 303, index])
    attrs = W.sample_attributes(rng, "any", shapes=W.SHAPES, textures=("plain",))
    image = W.render(attrs, rng)
    targets = {}
    for what in EDITS:
        if what == "background":
            choices = [b for b in W.BACKGROUNDS if b != attrs.background and W.compatible(attrs.color, b)]
        elif what == "texture":
            choices = [t for t in W.TEXTURES if t != "plain"]
        else:
            choices = [v for v in W.VALUES[what] if v != getattr(attrs, what)]
        targets[what] = W.Attributes(**{**attrs.as_dict(), what: choices[int(rng.integers(len(choices)))]})
    return attrs, image, targets


def judge(read: dict, source: W.Attributes, target: W.Attributes, what: str) -> tuple:
    """(identity kept, edit honored) of one analyzed image."""
    identity = all(read[a] == getattr(source, a) for a in IDENTITY)
    honored = what == "none" or read[what] == getattr(target, what)
    return identity, honored


def to_model_image(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (32, 32, 3) -> (3, size, size) in [-1, 1]."""
    from PIL import Image
    if image.shape[0] != size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- drawing and reading

@torch.no_grad()
def edit_results(model, source: W.Attributes, targets: Dict[str, W.Attributes], tail: torch.Tensor,
                 alphas: Sequence[float] = ALPHAS, ti_mapping=None, samples: int = 2, steps: int = 50,
                 scale: float = 7.5, seed: int = 0) -> List[Result]:
    """Draw every (method, edit) `samples` times (seeds seed, seed+1, ... for every method)
    and judge each image; plus the reconstruction [e_src[:77-K]; e_hiper] (edit "none")."""
    from inversion.hiper import edit_context, encode
    from ldm.generate import generate
    from tinyworld.analyze import analyze_batch
    from tinyworld.evaluate import to_uint8

    conds = []      # (method, alpha, edit, target, context (1, 77, D))
    for what, target in targets.items():
        e_tgt = encode(model, source_prompt(target))
        conds.append(("target prompt", None, what, target, e_tgt))
        if ti_mapping is not None:
            conds.append(("TI", None, what, target, encode(model, ti_prompt(target), ti_mapping)))
        conds += [("HiPer", a, what, target, edit_context(e_tgt, tail, a)) for a in alphas]
    conds.append(("HiPer", 1.0, "none", source, edit_context(encode(model, source_prompt(source)), tail, 1.0)))

    context = torch.cat([c[-1] for c in conds for _ in range(samples)]).to(model.dtype)
    seeds = [seed + j for _ in conds for j in range(samples)]
    images = []
    for i in range(0, len(seeds), 64):
        images.append(to_uint8(generate(model, [""] * len(seeds[i:i + 64]), seeds[i:i + 64],
                                        cond=context[i:i + 64], steps=steps, scale=scale)))
    images = np.concatenate(images)
    reads = analyze_batch(images)
    results = []
    for n, (method, alpha, what, target, _) in enumerate(conds):
        for j in range(samples):
            k = n * samples + j
            results.append(Result(method, alpha, what, *judge(reads[k], source, target, what), images[k]))
    return results


def train_tail(model, image: torch.Tensor, source: str, steps: int, batch: int, lr: float, tail: int,
               seed: int) -> torch.Tensor:
    from inversion.hiper import HiPer, HiPerConfig
    cfg = HiPerConfig(source=source, tail=tail, steps=steps, lr=lr, batch=batch, seed=seed, save_every=steps)
    with tempfile.TemporaryDirectory() as out:
        trainer = HiPer(model, image, cfg, Path(out), log=lambda s: None)
        trainer.run(progress=False)
    return trainer.tail_vectors().to(model.device)


def train_ti(model, image: torch.Tensor, steps: int, batch: int, seed: int):
    """Textual Inversion on the one image: "<obj>" from "object"; returns its token mapping."""
    from inversion.data import templates
    from inversion.textual_inversion import TIConfig, TextualInversion
    cfg = TIConfig(placeholder=TI_WORD, init_word="object", steps=steps, batch=batch, seed=seed, save_every=steps)
    with tempfile.TemporaryDirectory() as out:
        trainer = TextualInversion(model, image[None], cfg, Path(out), templates("object"), log=lambda s: None)
        trainer.run(progress=False)
    return {k: v.detach() for k, v in trainer.learned.mapping().items()}


# ----------------------------------------------------------------------------- tables

def rate(results: List[Result], **match) -> tuple:
    """(identity kept, edit honored, both, count) over the results matching every field given."""
    rs = [r for r in results if all(getattr(r, k) == v for k, v in match.items())]
    if not rs:
        return (float("nan"),) * 3 + (0,)
    return (np.mean([r.identity for r in rs]), np.mean([r.honored for r in rs]),
            np.mean([r.identity and r.honored for r in rs]), len(rs))


def print_tables(results: List[Result], alphas: Sequence[float], out=print) -> None:
    methods = [("target prompt", dict(method="target prompt")), ("TI", dict(method="TI")),
               (f"HiPer α={ALPHA:g}", dict(method="HiPer", alpha=ALPHA))]
    methods = [(name, m) for name, m in methods if rate(results, **m)[3]]
    edits = [e for e in EDITS if rate(results, edit=e)[3]]
    out("identity kept (shape, color and size read as the source's) / edit honored (the new value read):")
    out("| method | " + " | ".join(edits) + " | all edits | both |")
    out("|---|" + "---|" * (len(edits) + 2))
    for name, m in methods:
        cells = [rate(results, edit=e, **m) for e in edits]
        allr = [r for r in results if r.edit != "none" and all(getattr(r, k) == v for k, v in m.items())]
        i, h, b, _ = rate(allr)
        out(f"| {name} | " + " | ".join(f"{c[0]:.0%} / {c[1]:.0%}" for c in cells) + f" | {i:.0%} / {h:.0%} | {b:.0%} |")
    out("")
    out("HiPer α sweep (all edits):")
    out("| α | identity kept | edit honored | both |\n|---|---|---|---|")
    for a in alphas:
        i, h, b, _ = rate([r for r in results if r.edit != "none"], method="HiPer", alpha=a)
        out(f"| {a:g} | {i:.0%} | {h:.0%} | {b:.0%} |")
    i, _, _, n = rate(results, edit="none")
    if n:
        out(f"reconstruction [e_src[:77-K]; e_hiper] (source prompt, α=1): identity kept {i:.0%} of {n}")


def write_grid(path: Path, rows: List[tuple]) -> None:
    """One row per source: the source, then per edit the target prompt, TI and HiPer (first seed)."""
    images, captions = [], []
    for source_image, attrs, targets, results in rows:
        images.append(source_image)
        captions.append("source: " + source_prompt(attrs))
        for what, target in targets.items():
            for name, m in (("target", dict(method="target prompt")), ("TI", dict(method="TI")),
                            (f"HiPer {ALPHA:g}", dict(method="HiPer", alpha=ALPHA))):
                hit = [r for r in results if r.edit == what and all(getattr(r, k) == v for k, v in m.items())]
                if hit:
                    images.append(hit[0].image)
                    captions.append(f"{getattr(target, what)}: {name}")
    from PIL import Image
    size = (W.IMAGE_SIZE, W.IMAGE_SIZE)                 # (a model of another size draws other sizes)
    images = [np.asarray(Image.fromarray(im).resize(size, Image.NEAREST)) for im in images]
    W.save_grid(str(path), np.stack(images), captions, cols=len(images) // len(rows))


# ----------------------------------------------------------------------------- texture ceiling

CEILING_TEXTURES = ("striped", "dotted")
CEILING_SEEDS, CEILING_STEPS, CEILING_SAMPLES = (0, 1, 2), 400, 64


def texture_images(texture: str, n: int, seed: int) -> np.ndarray:
    """n rendered objects (uint8 (n, 32, 32, 3)) of random named shape, color, size, position and
    background, all with the texture."""
    images = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 7])
        images.append(W.render(W.sample_attributes(rng, "any", shapes=W.SHAPES, textures=(texture,)), rng))
    return np.stack(images)


def texture_ceiling(model, texture: str, seed: int, steps: int = CEILING_STEPS, n: int = CEILING_SAMPLES,
                    sample_steps: int = 50, scale: float = 7.5) -> float:
    """Share of samples read with `texture`, drawn from the U-Net's whole context learned on 5 images
    of it (`tinyworld.whole_context`, starting from "a photo of a <texture> object"). No conditioning
    learned with this loss gets the texture drawn more often, so no texture edit can succeed more."""
    from tinyworld import whole_context
    from tinyworld.analyze import analyze_batch
    images = torch.stack([to_model_image(im, model.config.image_size) for im in texture_images(texture, 5, seed)])
    context = whole_context.learn(model, images, f"a photo of a {texture} object", steps, seed)
    reads = analyze_batch(whole_context.sample(model, context, n, sample_steps, scale, seed))
    return float(np.mean([r["texture"] == texture for r in reads]))


def autoencoder_keeps(model, texture: str, n: int = 256) -> float:
    """Share of n rendered objects with `texture` that still show it after the autoencoder's round
    trip: what the latents carry of it. A sample is painted by the same decoder, so a texture
    the round trip loses is seldom drawn, however it is asked for."""
    from tinyworld.evaluate import autoencoder_reads
    reads = autoencoder_reads(model, texture_images(texture, n, seed=100))
    return float(np.mean([r["texture"] == texture for r in reads]))


def print_texture_ceiling(model, steps: int, n: int, sample_steps: int, scale: float) -> None:
    print(f"Texture ceiling: the whole context (77 x D) learned on 5 images of each texture, {steps} steps; "
          f"{n} samples per seed, DDIM {sample_steps}\n")
    print("| texture | samples drawn with it | per seed | the autoencoder keeps it |\n|---|---|---|---|")
    for texture in CEILING_TEXTURES:
        shares = [texture_ceiling(model, texture, seed, steps, n, sample_steps, scale) for seed in CEILING_SEEDS]
        kept = autoencoder_keeps(model, texture)
        print(f"| {texture} | {np.mean(shares):.0%} | {', '.join(f'{x:.0%}' for x in shares)} | {kept:.0%} |",
              flush=True)


# ----------------------------------------------------------------------------- command

# What --texture-ceiling uses; the other options set the HiPer tables, which it does not run.
CEILING_OPTIONS = {"ckpt", "device", "sample_steps", "scale", "texture_ceiling", "threads"}


def build_parser():
    from ldm.cli import (Parser, image_path_arg, learning_rate, nonnegative_float, path_arg, positive_int, seed_int,
                         thread_count)
    from inversion.hiper_cli import TINY_DEFAULTS
    from invert import TINY_DEFAULTS as TI_DEFAULTS
    p = Parser(prog="python -m tinyworld.hiper_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=path_arg, default=ROOT / "weights" / "tiny.safetensors", help="a tiny-world model")
    p.add_argument("--n", type=positive_int, default=20, help="source images")
    p.add_argument("--steps", type=positive_int, default=TINY_DEFAULTS["steps"], help="HiPer steps per image")
    p.add_argument("--batch", type=positive_int, default=TINY_DEFAULTS["batch"], help="HiPer batch")
    p.add_argument("--lr", type=learning_rate, default=TINY_DEFAULTS["lr"], help="HiPer learning rate")
    p.add_argument("--tail", type=positive_int, default=5, help="HiPer tail rows K")
    p.add_argument("--ti-steps", type=positive_int, default=TI_DEFAULTS["steps"], help="Textual Inversion steps")
    p.add_argument("--ti-batch", type=positive_int, default=TI_DEFAULTS["batch"], help="Textual Inversion batch")
    p.add_argument("--no-ti", action="store_true", help="skip the Textual Inversion baseline")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in ALPHAS), help="α values of the sweep")
    p.add_argument("--samples", type=positive_int, default=2, help="images per (source, edit, method)")
    p.add_argument("--sample-steps", type=positive_int, default=50, help="DDIM steps")
    p.add_argument("--scale", type=nonnegative_float, default=7.5, help="guidance scale")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the source images, training and sampling")
    p.add_argument("--grid", type=image_path_arg, default=Path("outputs") / "hiper_eval.png",
                   help="before/after grid of the first 8 sources")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps, or auto: a GPU if there is one")
    p.add_argument("--threads", type=thread_count, default=2,
                   help="torch threads; the README's tables were measured with 2 (another count sums in another "
                        "order, and the last-digit differences grow into other scores)")
    p.add_argument("--texture-ceiling", action="store_true",
                   help="instead of the tables: how often any conditioning learned with the same loss gets each "
                        f"texture drawn (the whole context learned on 5 images of it, seeds "
                        f"{', '.join(map(str, CEILING_SEEDS))}, {CEILING_STEPS} steps, {CEILING_SAMPLES} samples)")
    return p


def main(argv=None) -> int:
    from inversion.hiper import MAX_ALPHA, HiPerError, check_tail_size
    from ldm.cli import CLIError, check_file_writable, counted, flags, pick_device
    parser = build_parser()
    args = parser.parse_args(argv)
    given = parser.given_options(argv)
    unused = sorted(given - CEILING_OPTIONS) if args.texture_ceiling else []
    if unused:
        raise CLIError(f"{flags(unused)}: --texture-ceiling does not use {'them' if len(unused) > 1 else 'it'} "
                       f"(it takes only {flags(sorted(CEILING_OPTIONS - {'texture_ceiling'}))})")
    try:
        alphas = {float(a) for a in args.alphas.split(",") if a.strip()}
    except ValueError:
        raise CLIError(f"--alphas {args.alphas!r}: expected numbers separated by commas") from None
    if not alphas:
        raise CLIError("--alphas: give at least one α, e.g. --alphas 0.4,1 (0.8, the main table's, is always run)")
    if not all(0 <= a <= MAX_ALPHA for a in alphas):  # also refuses nan
        raise CLIError(f"--alphas {args.alphas!r}: each α must be between 0 and {MAX_ALPHA:g} (the paper's are 0 "
                       "to 1)")
    alphas = sorted(alphas | {ALPHA})
    try:
        check_tail_size(args.tail)
    except HiPerError as e:
        raise CLIError(str(e)) from None
    longest = longest_prompt(args.n, args.seed)
    if longest > 77 - args.tail:  # HiPer's own rule (check_prompt), before any training
        raise CLIError(f"--tail {args.tail}: the source and edit prompts are up to {longest} tokens with start and "
                       f"end, so a tail of at most {77 - longest} rows fits after them")
    if not args.texture_ceiling:
        check_file_writable(args.grid, "--grid")
    if args.no_ti and given & {"ti_steps", "ti_batch"}:
        raise CLIError("--ti-steps and --ti-batch set the Textual Inversion baseline, which --no-ti skips")
    if not args.ckpt.exists():
        raise CLIError(f"--ckpt {args.ckpt}: no such file (train the tiny model first, or pass --ckpt)")
    torch.set_num_threads(args.threads)
    model = load_tiny_model(args.ckpt, pick_device(args.device), sample_steps={"--sample-steps": args.sample_steps})
    if args.texture_ceiling:
        print_texture_ceiling(model, CEILING_STEPS, CEILING_SAMPLES, args.sample_steps, args.scale)
        return 0
    print(f"{args.n} sources x {len(EDITS)} edits x {args.samples} seeds; HiPer {args.steps} steps (batch "
          f"{args.batch}, lr {args.lr:g}, K={args.tail})" + ("" if args.no_ti else
          f", TI {args.ti_steps} steps (batch {args.ti_batch})")
          + f"; DDIM {args.sample_steps}, guidance {args.scale:g}; {counted(args.threads, 'torch thread')}")
    results, grid_rows, t0 = [], [], time.time()
    for i in range(args.n):
        t = time.time()
        attrs, image_u8, targets = make_source(args.seed, i)
        image = to_model_image(image_u8, model.config.image_size)
        tail = train_tail(model, image, source_prompt(attrs), args.steps, args.batch, args.lr, args.tail, args.seed)
        t_hiper = time.time() - t
        ti = None if args.no_ti else train_ti(model, image, args.ti_steps, args.ti_batch, args.seed)
        rs = edit_results(model, attrs, targets, tail, alphas, ti, args.samples, args.sample_steps, args.scale,
                          seed=1000 * args.seed + 10 * i)
        results += rs
        if len(grid_rows) < 8:
            grid_rows.append((image_u8, attrs, targets, rs))
        i_h, h_h, _, _ = rate(rs, method="HiPer", alpha=ALPHA)
        print(f"[{i + 1}/{args.n}] {source_prompt(attrs)!r}: HiPer {t_hiper:.0f} s, total {time.time() - t:.0f} s; "
              f"HiPer identity {i_h:.0%}, edit {h_h:.0%}", flush=True)
    print(f"\n{args.n} sources in {time.time() - t0:.0f} s\n")
    print_tables(results, alphas)
    write_grid(args.grid, grid_rows)
    print(f"\nwrote {args.grid}")
    return 0


if __name__ == "__main__":
    from ldm.cli import run
    sys.exit(run(main, prog="tinyworld.hiper_eval", memory_advice=MEMORY_ADVICE))
