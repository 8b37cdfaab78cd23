"""The NeTI results tables of the README: NeTI against Textual Inversion on the tiny world.

    python -m tinyworld.neti_results                  # about 25 minutes on 2 CPU cores (3 seeds)
    python -m tinyworld.neti_results --concept hourglass --seeds 0 --grid outputs/neti_grid.png

One held-out concept (a shape or texture the base model draws but has no word for). For each
seed, 5 rendered images of it: both methods learn the word from the same images for the same
number of steps, each with its tiny-model recipe (Textual Inversion: invert.py's
TINY_DEFAULTS; NeTI: inversion.neti_cli.TINY_DEFAULTS; 8 images a step for both), and are
scored on the same prompts and seeds (tinyworld.concepts):
  reconstruction: share of "a photo of a <x>"-style samples the analyzer reads as the concept;
  editability: share of "a small red <x> on the left on a black background"-style prompts whose
      other attributes (size, color, position, background) are all honored;
  edit & concept: share of those prompts that are honored and also read as the concept.

Tables:
  1. the final scores of both methods (--n samples per score; the TI row is the same run and
     score as tinyworld.ti_results' "single vector" row of that concept);
  2. steps to reach Textual Inversion's final numbers: each trainer is scored every --every
     steps on the first n/2 prompts and seeds, then trained on (every step's randomness comes
     from (seed, step), so this is the same run as an uninterrupted one); printed is the first
     checkpoint at which each method's reconstruction, editability and both are at least TI's
     final ones;
  3. truncation: the trained mapper sampled with only its first K hidden units (NeTI's nested
     dropout orders them), K = 2 ... 128, against reconstruction and editability; K = 128 is
     the full mapper of table 1;
  4. with --grid, a PNG of a few samples: TI, NeTI, NeTI truncated (upscaled x4, nearest).
Scores are means over the seeds: on this tiny model one run's score depends much on its images
and training noise (Textual Inversion's ring reconstruction ranged from 28% to 70% over seeds).
The wall time of each part is printed after its table.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ldm.cli import HelpFormatter, nonnegative_int, positive_float, positive_int

ROOT = Path(__file__).resolve().parents[1]
TRUNCATIONS = (2, 4, 8, 16, 32, 64, 128)
Scores = Dict[str, float]


# ----------------------------------------------------------------------------- training

def word_property(concept: str) -> str:
    """The prompt templates both methods train with: "object" for a shape, "style" for a texture."""
    from tinyworld.concepts import concept_attribute
    return "object" if concept_attribute(concept) == "shape" else "style"


def start_ti(model, concept: str, steps: int, seed: int, out: Path):
    """A Textual Inversion trainer for `concept` trained to `steps` (tinyworld.ti_results' recipe)."""
    from tinyworld.ti_results import learn
    return learn(model, concept, steps, seed, out, learnable_property=word_property(concept))


def start_neti(model, concept: str, steps: int, seed: int, out: Path, lr: Optional[float] = None):
    """A NeTI trainer for `concept` with the recipe of `invert.py --method neti` on the tiny model
    (its base learning rate unless `lr` is given), trained to `steps`."""
    from inversion.data import templates
    from inversion.neti import NeTI, NeTIConfig
    from inversion.neti_cli import TINY_DEFAULTS
    from tinyworld.concepts import default_init_word
    from tinyworld.train import to_tensor
    from tinyworld.world import concept_images
    prop = word_property(concept)
    cfg = NeTIConfig(placeholder=f"<{concept}>", init_word=default_init_word(concept), learnable_property=prop,
                     steps=steps, lr=lr or TINY_DEFAULTS["lr"], batch=TINY_DEFAULTS["batch"],
                     grad_accum=TINY_DEFAULTS["grad_accum"], seed=seed, save_every=10 ** 9)
    images = to_tensor(concept_images(concept, 5, seed=seed))
    trainer = NeTI(model, images, cfg, out, templates(prop), log=lambda s: None)
    trainer.run(progress=False)
    return trainer


def train_on(trainer, steps: int) -> None:
    """Continue a trainer (either method) to `steps`: the same run as training there at once."""
    trainer.cfg.steps = steps
    trainer.run(progress=False)


# ----------------------------------------------------------------------------- scoring

def score_ti(model, trainer, concept: str, n: int, sample_steps: int, seed: int) -> Scores:
    from tinyworld.concepts import evaluate_word
    return evaluate_word(model, concept, trainer.cfg.placeholder, n=n, steps=sample_steps, seed=seed,
                         learned=trainer.learned)


def score_neti(model, trainer, concept: str, n: int, sample_steps: int, seed: int,
               truncation: Optional[int] = None) -> Scores:
    """The same prompts and seeds as `score_ti`, sampled with the mapper's per-timestep,
    per-layer conditioning (inversion.neti_cli.tiny_scores)."""
    from inversion.neti_cli import tiny_scores
    return tiny_scores(model, trainer.mapper, concept, trainer.cfg.placeholder, n=n, steps=sample_steps,
                       truncation=truncation, seed=seed)


def checkpoints(steps: int, every: int) -> List[int]:
    """every, 2 every, ... below `steps`, then `steps`."""
    return list(range(every, steps, every)) + [steps] if every > 0 else [steps]


def trajectory(name: str, start, score, model, args, seed: int, timing: Dict[str, float]):
    """Train one method to args.steps, scoring it at every checkpoint (n/2 samples; n at the end):
    returns (trainer, {step: scores}). Adds its training and scoring seconds to `timing`."""
    marks = checkpoints(args.steps, args.every)
    out = args.out / f"{args.concept}-{name.lower().replace(' ', '_')}-seed{seed}"
    result, trainer = {}, None
    for step in marks:
        t = time.time()
        if trainer is None:
            trainer = start(model, args.concept, step, seed, out)
        else:
            train_on(trainer, step)
        timing[f"{name} training"] = timing.get(f"{name} training", 0.0) + time.time() - t
        t = time.time()
        n = args.n if step == args.steps else max(1, args.n // 2)
        result[step] = score(model, trainer, args.concept, n, args.sample_steps, seed)
        timing[f"{name} scoring"] = timing.get(f"{name} scoring", 0.0) + time.time() - t
        progress(f"seed {seed}: {name} step {step}: reconstruction {result[step]['reconstruction']:.0%}, "
                 f"editability {result[step]['editability']:.0%} ({n} samples)")
    return trainer, result


def first_reaching(scores: Dict[int, Scores], target: Scores, keys: Sequence[str]) -> str:
    for step in sorted(scores):
        if all(scores[step][k] >= target[k] for k in keys):
            return str(step)
    return "not reached"


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- grid

@torch.no_grad()
def write_grid(model, ti, neti, concept: str, path: Path, truncation: int, sample_steps: int, seed: int,
               columns: int = 4) -> None:
    """Rows: TI, NeTI, NeTI truncated; columns: reconstruction prompts, then edit prompts (same seeds)."""
    from inversion.neti import SpaceTimeConditioning
    from ldm.generate import generate
    from tinyworld.concepts import edit_attributes, edit_prompt, reconstruction_prompts
    from tinyworld.evaluate import sample_prompts, to_uint8
    from tinyworld.world import save_grid
    import numpy as np
    word = ti.cfg.placeholder
    half = max(1, columns // 2)
    prompts = reconstruction_prompts(concept, word, half) + \
        [edit_prompt(a, concept, word) for a in edit_attributes(concept, columns - half, seed)]
    seeds = [seed + i for i in range(len(prompts))]
    rows = [("TI", sample_prompts(model, [ti.learned.expand(p) for p in prompts], seeds, sample_steps,
                                  new_embeddings=ti.learned.mapping()))]
    for label, k in (("NeTI", None), (f"NeTI K={truncation}", truncation)):
        cond = SpaceTimeConditioning(model, neti.mapper, neti.cfg.placeholder, prompts, k)
        rows.append((label, to_uint8(generate(model, prompts, seeds, steps=sample_steps,
                                              cond=cond.keys, value_cond=cond.value_cond))))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(str(path), np.concatenate([images for _, images in rows]),
              [f"{label}: {p}" for label, _ in rows for p in prompts], cols=len(prompts), scale=4)


# ----------------------------------------------------------------------------- the command

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tinyworld.neti_results", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", type=Path, default=ROOT / "weights" / "tiny.safetensors")
    p.add_argument("--concept", default="ring", help="a held-out concept of the tiny world")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps of both methods; None: invert.py's tiny default, 400")
    p.add_argument("--every", type=nonnegative_int, default=100,
                   help="score both methods every N steps (n/2 samples); 0: at the end only")
    p.add_argument("--n", type=int, default=64, help="samples per final score (and per truncation)")
    p.add_argument("--sample-steps", type=positive_int, default=50, help="DDIM steps when scoring")
    p.add_argument("--truncations", type=int, nargs="+", default=list(TRUNCATIONS),
                   help="hidden units K kept in the truncation sweep")
    p.add_argument("--grid", type=Path, default=None, help="write a PNG of TI / NeTI / NeTI-truncated samples")
    p.add_argument("--grid-truncation", type=int, default=16, help="K of the truncated row of --grid")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one run of each method per seed (its own 5 images, training noise and sampling seeds)")
    p.add_argument("--neti-lr", type=positive_float, default=None,
                   help="NeTI's base learning rate, x batch (default: invert.py --method neti's tiny default)")
    p.add_argument("--out", type=Path, default=Path("outputs") / "neti_results", help="trainers' checkpoints")
    args = p.parse_args(argv)

    import ldm
    from invert import TINY_DEFAULTS
    from inversion.neti_cli import TINY_DEFAULTS as NETI_TINY
    from tinyworld.concepts import concept_attribute, mean_scores
    try:
        concept_attribute(args.concept)
    except ValueError as e:
        p.error(str(e))
    if args.n < 2 or args.sample_steps < 1 or (args.steps is not None and args.steps < 1):
        p.error("--n must be at least 2, --steps and --sample-steps at least 1")
    try:
        model = ldm.load(args.ckpt)
    except ldm.LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    args.steps = args.steps or TINY_DEFAULTS["steps"]
    t_all = time.time()

    # ---- parts 1 and 2: both trainers on each seed's images, scored along the way
    seeds = args.seeds
    print(f"# NeTI vs Textual Inversion on the tiny world: <{args.concept}>\n\n5 images per seed, seeds "
          f"{', '.join(map(str, seeds))} (each seed: its own images, training noise and sampling seeds), "
          f"{args.steps} steps each (8 images a step; NeTI's base lr {args.neti_lr or NETI_TINY['lr']:g}), "
          f"DDIM {args.sample_steps}, guidance 7.5; {args.n} samples per final score, {args.n // 2} at the checkpoints every {args.every} steps; scores are means over "
          "the seeds\n", flush=True)
    timing: Dict[str, float] = {}
    t = time.time()
    runs = {"TI": [], "NeTI": []}      # per seed: (trainer, {step: scores})
    start_neti_lr = functools.partial(start_neti, lr=args.neti_lr)
    for seed in seeds:
        runs["TI"].append(trajectory("TI", start_ti, score_ti, model, args, seed, timing))
        runs["NeTI"].append(trajectory("NeTI", start_neti_lr, score_neti, model, args, seed, timing))
    part12 = time.time() - t
    marks = checkpoints(args.steps, args.every)
    mean = {name: {step: mean_scores([r[step] for _, r in runs[name]]) for step in marks} for name in runs}
    ti, neti = mean["TI"], mean["NeTI"]
    final_ti, final_neti = ti[args.steps], neti[args.steps]
    learned = {"TI": runs["TI"][0][0].embedding().numel(),
               "NeTI": sum(p.numel() for p in runs["NeTI"][0][0].mapper.parameters())}

    print(f"## 1. Final scores after {args.steps} steps (mean over {len(seeds)} seeds)\n")
    print("| method | learned numbers | reconstruction | editability | edit & concept | per seed: reconstruction "
          "/ editability | training time |")
    print("|---|---|---|---|---|---|---|")
    for name, final in (("TI", final_ti), ("NeTI", final_neti)):
        label = "Textual Inversion (one vector)" if name == "TI" else "NeTI (mapper, full)"
        per_seed = ", ".join(f"{r[args.steps]['reconstruction']:.0%} / {r[args.steps]['editability']:.0%}"
                             for _, r in runs[name])
        print(f"| {label} | {learned[name]:,} | {final['reconstruction']:.0%} | {final['editability']:.0%} | "
              f"{final['edit_and_concept']:.0%} | {per_seed} | {timing[name + ' training'] / len(seeds):.0f} s "
              "a seed |")

    print(f"\n## 2. Steps to reach Textual Inversion's final numbers (means over {len(seeds)} seeds)\n")
    print("| step | samples a seed | TI reconstruction | TI editability | NeTI reconstruction | NeTI editability |")
    print("|---|---|---|---|---|---|")
    for step in marks:
        n = args.n if step == args.steps else args.n // 2
        print(f"| {step} | {n} | {ti[step]['reconstruction']:.0%} | {ti[step]['editability']:.0%} | "
              f"{neti[step]['reconstruction']:.0%} | {neti[step]['editability']:.0%} |")
    print(f"\n| method | reconstruction >= {final_ti['reconstruction']:.0%} | "
          f"editability >= {final_ti['editability']:.0%} | both |\n|---|---|---|---|")
    for name, scores in (("TI", ti), ("NeTI", neti)):
        print(f"| {name} | " + " | ".join(first_reaching(scores, final_ti, keys) for keys in
                                         (("reconstruction",), ("editability",), ("reconstruction", "editability")))
              + " |")
    print(f"\nParts 1-2: {part12:.0f} s (training: TI {timing['TI training']:.0f} s, NeTI "
          f"{timing['NeTI training']:.0f} s; scoring: TI {timing['TI scoring']:.0f} s, "
          f"NeTI {timing['NeTI scoring']:.0f} s)\n", flush=True)

    # ---- part 3: truncation sweep of the trained mappers
    t = time.time()
    hidden = runs["NeTI"][0][0].mapper.config.hidden
    print(f"## 3. Truncation: the trained mappers with only their first K of {hidden} hidden units "
          f"(mean over {len(seeds)} seeds)\n")
    print("| K | reconstruction | editability | edit & concept |\n|---|---|---|---|")
    for k in sorted(set(args.truncations)):
        if not 1 <= k <= hidden:
            continue
        scores = final_neti if k == hidden else mean_scores(
            [score_neti(model, trainer, args.concept, args.n, args.sample_steps, seed, truncation=k)
             for seed, (trainer, _) in zip(seeds, runs["NeTI"])])
        label = f"{k} (full, table 1)" if k == hidden else str(k)
        print(f"| {label} | {scores['reconstruction']:.0%} | {scores['editability']:.0%} | "
              f"{scores['edit_and_concept']:.0%} |", flush=True)
    print(f"\nPart 3: {time.time() - t:.0f} s ({args.n} samples per score and seed)\n")

    # ---- part 4: the grid (the first seed's trainers)
    if args.grid is not None:
        t = time.time()
        k = min(max(1, args.grid_truncation), hidden)
        write_grid(model, runs["TI"][0][0], runs["NeTI"][0][0], args.concept, args.grid, k, args.sample_steps,
                   seeds[0])
        print(f"## 4. Samples\n\nwrote {args.grid} (seed {seeds[0]}; rows: TI, NeTI, NeTI K={k}): "
              f"{time.time() - t:.0f} s\n")
    print(f"Total: {time.time() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
