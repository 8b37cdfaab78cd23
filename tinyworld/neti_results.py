"""The NeTI results tables of the README: NeTI against Textual Inversion on the tiny world.

    python -m tinyworld.neti_results --jobs 2         # 40 to 50 minutes on 2 CPU cores (3 seeds)
    python -m tinyworld.neti_results --concept hourglass --seeds 0 --grid outputs/neti_grid.png
    python -m tinyworld.neti_results --steps 400 --every 200 --n 128 --truncations 128 \
        --seeds $(seq 0 18) --jobs 16          # the README's 19 seeds, one process per core

One held-out concept (a shape or texture the base model draws but has no word for). For each
seed, 5 rendered images of it: both methods learn the word from the same images for the same
number of steps, each with its tiny-model recipe (Textual Inversion: invert.py's
TINY_DEFAULTS; NeTI: inversion.neti_cli.TINY_DEFAULTS; 8 images a step for both), and are
scored on the same prompts and seeds (tinyworld.concepts):
  reconstruction: share of "a photo of a <x>"-style samples the analyzer reads as the concept;
  editability: share of "a small red <x> on the left on a black background"-style prompts whose
      other attributes (size, color, position, background; and the shape, for a texture) are all honored;
  edit & concept: share of those prompts that are honored and also read as the concept.

Tables:
  1. the final scores of both methods (--n samples per score; the TI row is the same run and
     score as tinyworld.ti_results' "single vector" row of that concept);
  2. steps to reach Textual Inversion's final numbers: each trainer is scored every --every
     steps on the first n/2 prompts and seeds, then trained on (every step's randomness comes
     from (seed, step), so this is the same run as an uninterrupted one); printed is the first
     checkpoint at which each method's reconstruction, editability and both are at least TI's
     final ones; and, with several seeds, NeTI's score at each checkpoint less TI's final
     one, seed by seed, as mean ± standard error (how far apart the two are, and how sure);
  3. truncation: the trained mapper sampled with only its first K hidden units (NeTI's nested
     dropout orders them), K = 2 ... 128, against reconstruction and editability; K = 128 is
     the full mapper of table 1;
  4. with --grid, a PNG of a few samples: TI, NeTI, NeTI truncated (upscaled x4, nearest).
Scores are means over the seeds: on this tiny model one run's score depends much on its images
and training noise (Textual Inversion's ring reconstruction ranged from 28% to 70% over seeds).
The time of each part, summed over the seeds, is printed after its table. Seeds are
independent: --jobs N runs N of them at once in worker processes, with the same scores. Each
seed computes with --threads torch threads (default 1): another thread count sums in another
order, and those last-digit differences grow over 400 steps into another mapper (seed 0's
NeTI reads 70% / 80% with one thread, 84% / 83% with two, as invert.py's own line says).
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ldm.cli import (Parser, check_file_writable, check_writable, counted, distinct_seeds, given_options,
                     image_path_arg, learning_rate, nonnegative_int, path_arg, positive_int, seed_int, thread_count)
from tinyworld.tools import MEMORY_ADVICE, load_tiny_model

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
                         learned=trainer.saved_word())


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


# ----------------------------------------------------------------------------- one seed, or many at once

def run_seed(model, args, seed: int, grid: bool) -> dict:
    """Everything the tables need from one seed: both methods' scores at every checkpoint, the
    truncation sweep of its mapper and, with `grid`, the sample grid. A seed depends on no other
    (its images, training noise and sampling seeds all come from it), so seeds can run in
    separate processes and give the same scores."""
    timing: Dict[str, float] = {}
    ti, ti_scores = trajectory("TI", start_ti, score_ti, model, args, seed, timing)
    neti, neti_scores = trajectory("NeTI", functools.partial(start_neti, lr=args.neti_lr), score_neti,
                                   model, args, seed, timing)
    hidden = neti.mapper.config.hidden
    t = time.time()
    truncated = {k: score_neti(model, neti, args.concept, args.n, args.sample_steps, seed, truncation=k)
                 for k in sorted(set(args.truncations)) if k < hidden}
    timing["truncation"] = time.time() - t
    if grid:
        t = time.time()
        write_grid(model, ti, neti, args.concept, args.grid, args.grid_truncation, args.sample_steps, seed)
        timing["grid"] = time.time() - t
    learned = {"TI": ti.embedding().numel(), "NeTI": sum(p.numel() for p in neti.mapper.parameters())}
    return {"TI": ti_scores, "NeTI": neti_scores, "truncated": truncated, "hidden": hidden,
            "learned": learned, "timing": timing}


_worker_model = None   # each worker process loads the model once


def _start_worker(ckpt: Path, threads: int) -> None:
    global _worker_model
    import signal
    import threading
    import ldm
    from tqdm import tqdm
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # also on Windows, where it is not inherited: Ctrl-C is the parent's
    # tqdm's default lock is a multiprocessing semaphore, which a worker stopped by Ctrl-C would
    # leave behind (a warning at exit); the workers show no bars, a thread lock is enough.
    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(threads)
    _worker_model = ldm.load(ckpt)


def _run_seed_in_worker(args, seed: int, grid: bool) -> dict:
    return run_seed(_worker_model, args, seed, grid)


def run_seeds(model, args) -> List[dict]:
    """run_seed for every seed, in order: here one after the other, or with --jobs N in N worker
    processes; each with --threads torch threads, so that a seed's scores are the same either way."""
    wants_grid = [args.grid is not None and i == 0 for i in range(len(args.seeds))]
    if args.jobs == 1 or len(args.seeds) == 1:
        torch.set_num_threads(args.threads)
        return [run_seed(model, args, seed, grid) for seed, grid in zip(args.seeds, wants_grid)]
    import multiprocessing
    import signal
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(args.seeds)),
                             mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker, initargs=(args.ckpt, args.threads)) as pool:
        # The workers start while the seeds are handed out, with Ctrl-C ignored (they inherit it):
        # it reaches only this process, which stops them. One "interrupted" line, no worker tracebacks.
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            results = pool.map(_run_seed_in_worker, [args] * len(args.seeds), args.seeds, wants_grid)
        finally:
            signal.signal(signal.SIGINT, handler)
        try:
            return list(results)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in multiprocessing.active_children():
                worker.terminate()
            raise


def paired_difference(a: Sequence[float], b: Sequence[float]) -> str:
    """Mean and standard error of a - b over paired seeds, in percentage points: "+1.2 ± 3.4"."""
    import statistics
    diff = [100 * (x - y) for x, y in zip(a, b)]
    return f"{statistics.mean(diff):+.1f} ± {statistics.stdev(diff) / len(diff) ** 0.5:.1f}"


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
    save_grid(str(path), np.concatenate([images for _, images in rows]),
              [f"{label}: {p}" for label, _ in rows for p in prompts], cols=len(prompts), scale=4)


# ----------------------------------------------------------------------------- the command

def main(argv=None) -> int:
    p = Parser(prog="python -m tinyworld.neti_results", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=path_arg, default=ROOT / "weights" / "tiny.safetensors", help="a tiny-world model")
    p.add_argument("--concept", default="ring", help="a held-out concept of the tiny world")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps of both methods (default: invert.py's on the tiny model, 400)")
    p.add_argument("--every", type=nonnegative_int, default=100,
                   help="score both methods every N steps (n/2 samples); 0: at the end only")
    p.add_argument("--n", type=int, default=64, help="samples per final score (and per truncation)")
    p.add_argument("--sample-steps", type=positive_int, default=50, help="DDIM steps when scoring")
    p.add_argument("--truncations", type=int, nargs="+", default=list(TRUNCATIONS),
                   help="hidden units K kept in the truncation sweep")
    p.add_argument("--grid", type=image_path_arg, default=None,
                   help="write a PNG of TI / NeTI / NeTI-truncated samples")
    p.add_argument("--grid-truncation", type=int, default=16, help="with --grid: K of its truncated row")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2],
                   help="one run of each method per seed (its own 5 images, training noise and sampling seeds)")
    p.add_argument("--neti-lr", type=learning_rate, default=None,
                   help="NeTI's base learning rate, x batch (default: invert.py --method neti's tiny default)")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="seeds run at once, each in its own process (the scores do not change)")
    p.add_argument("--threads", type=thread_count, default=1,
                   help="torch threads of each seed: a seed's scores are bit for bit the same for the same "
                        "threads (with another count, last-digit differences grow into another mapper)")
    p.add_argument("--out", type=path_arg, default=Path("outputs") / "neti_results", help="trainers' checkpoints")
    args = p.parse_args(argv)

    from invert import TINY_DEFAULTS
    from inversion.neti_cli import TINY_DEFAULTS as NETI_TINY
    from tinyworld.concepts import concept_attribute, mean_scores
    try:
        concept_attribute(args.concept)
    except ValueError as e:
        p.error(str(e))
    if args.n < 2 or args.sample_steps < 1 or (args.steps is not None and args.steps < 1):
        p.error("--n must be at least 2, --steps and --sample-steps at least 1")
    if args.grid is None and "grid_truncation" in given_options(p, argv):
        p.error("--grid-truncation sets a row of --grid; give --grid too")
    from inversion.neti import NeTIConfig
    hidden = NeTIConfig.hidden  # the mapper's hidden units: a truncation keeps 1 to all of them
    for k in [*args.truncations, args.grid_truncation]:
        if not 1 <= k <= hidden:
            p.error(f"--truncations and --grid-truncation must be between 1 and {hidden} (the mapper's hidden "
                    f"units), got {k}")
    distinct_seeds(args.seeds)
    check_writable(args.out)
    if args.grid is not None:
        check_file_writable(args.grid, "--grid")
    # here also with --jobs, where each worker loads its own: a bad --ckpt fails before any work
    model = load_tiny_model(args.ckpt, sample_steps={"--sample-steps": args.sample_steps})
    args.steps = args.steps or TINY_DEFAULTS["steps"]
    t_all = time.time()

    # ---- every seed: both trainers scored along the way, the truncation sweep, the grid
    seeds = args.seeds
    print(f"# NeTI vs Textual Inversion on the tiny world: <{args.concept}>\n\n5 images per seed, seeds "
          f"{', '.join(map(str, seeds))} (each seed: its own images, training noise and sampling seeds), "
          f"{args.steps} steps each (8 images a step; NeTI's base lr {args.neti_lr or NETI_TINY['lr']:g}), "
          f"DDIM {args.sample_steps}, guidance 7.5; {args.n} samples per final score"
          + (f", {args.n // 2} at the checkpoints every {args.every} steps" if args.every else "")
          + f"; {counted(args.threads, 'torch thread')} a seed; scores are means over the seeds\n",
          flush=True)
    results = run_seeds(model, args)
    timing = {key: sum(r["timing"].get(key, 0.0) for r in results) for key in results[0]["timing"]}
    marks = checkpoints(args.steps, args.every)
    runs = {name: [r[name] for r in results] for name in ("TI", "NeTI")}   # per seed: {step: scores}
    mean = {name: {step: mean_scores([r[step] for r in runs[name]]) for step in marks} for name in runs}
    ti, neti = mean["TI"], mean["NeTI"]
    final_ti, final_neti = ti[args.steps], neti[args.steps]
    learned = results[0]["learned"]

    print(f"## 1. Final scores after {args.steps} steps (mean over {len(seeds)} seeds)\n")
    print("| method | learned numbers | reconstruction | editability | edit & concept | per seed: reconstruction "
          "/ editability | training time |")
    print("|---|---|---|---|---|---|---|")
    for name, final in (("TI", final_ti), ("NeTI", final_neti)):
        label = "Textual Inversion (one vector)" if name == "TI" else "NeTI (mapper, full)"
        per_seed = ", ".join(f"{r[args.steps]['reconstruction']:.0%} / {r[args.steps]['editability']:.0%}"
                             for r in runs[name])
        print(f"| {label} | {learned[name]:,} | {final['reconstruction']:.0%} | {final['editability']:.0%} | "
              f"{final['edit_and_concept']:.0%} | {per_seed} | {timing[name + ' training'] / len(seeds):.0f} s "
              "a seed |")

    print(f"\n## 2. Steps to reach Textual Inversion's final numbers (means over {len(seeds)} seeds)\n")
    print("| step | samples a seed | TI reconstruction | TI editability | NeTI reconstruction | NeTI editability |")
    print("|---|---|---|---|---|---|")
    for step in marks:
        n = args.n if step == args.steps else args.n // 2
        print(f"| {step} | {n} | {ti[step]['reconstruction']:.1%} | {ti[step]['editability']:.1%} | "
              f"{neti[step]['reconstruction']:.1%} | {neti[step]['editability']:.1%} |")
    print(f"\n| method | reconstruction >= {final_ti['reconstruction']:.1%} | "
          f"editability >= {final_ti['editability']:.1%} | both |\n|---|---|---|---|")
    for name, scores in (("TI", ti), ("NeTI", neti)):
        print(f"| {name} | " + " | ".join(first_reaching(scores, final_ti, keys) for keys in
                                         (("reconstruction",), ("editability",), ("reconstruction", "editability")))
              + " |")
    if len(seeds) > 1:
        print(f"\nPer seed, NeTI's score at each checkpoint less Textual Inversion's final one, in points "
              f"(mean ± standard error over the {len(seeds)} seeds):\n")
        print("| NeTI step | reconstruction | editability |\n|---|---|---|")
        for step in marks:
            cells = [paired_difference([r[step][key] for r in runs["NeTI"]],
                                       [r[args.steps][key] for r in runs["TI"]])
                     for key in ("reconstruction", "editability")]
            print(f"| {step} | " + " | ".join(cells) + " |")
    print(f"\nParts 1-2, summed over the seeds: training TI {timing['TI training']:.0f} s, NeTI "
          f"{timing['NeTI training']:.0f} s; scoring TI {timing['TI scoring']:.0f} s, "
          f"NeTI {timing['NeTI scoring']:.0f} s\n", flush=True)

    # ---- part 3: truncation sweep of the trained mappers
    hidden = results[0]["hidden"]
    print(f"## 3. Truncation: the trained mappers with only their first K of {hidden} hidden units "
          f"(mean over {len(seeds)} seeds)\n")
    print("| K | reconstruction | editability | edit & concept |\n|---|---|---|---|")
    for k in sorted(set(args.truncations)):
        scores = final_neti if k == hidden else mean_scores([r["truncated"][k] for r in results])
        label = f"{k} (full, table 1)" if k == hidden else str(k)
        print(f"| {label} | {scores['reconstruction']:.0%} | {scores['editability']:.0%} | "
              f"{scores['edit_and_concept']:.0%} |", flush=True)
    print(f"\nPart 3, summed over the seeds: {timing['truncation']:.0f} s ({args.n} samples per score and seed)\n")

    # ---- part 4: the grid (the first seed's trainers)
    if args.grid is not None:
        print(f"## 4. Samples\n\nwrote {args.grid} (seed {seeds[0]}; rows: TI, NeTI, NeTI "
              f"K={args.grid_truncation}): {timing['grid']:.0f} s\n")
    print(f"Total: {time.time() - t_all:.0f} s" + (f" ({args.jobs} seeds at a time)" if args.jobs > 1 else ""))
    return 0


if __name__ == "__main__":
    from ldm.cli import run
    sys.exit(run(main, prog="tinyworld.neti_results", memory_advice=MEMORY_ADVICE))
