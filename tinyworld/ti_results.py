"""The Textual Inversion results table of the README, on the tiny world.

    python -m tinyworld.ti_results                 # about 40 minutes on 2 CPU cores (3 seeds)
    python -m tinyworld.ti_results --seeds 0       # one seed: about 10 minutes
    python -m tinyworld.ti_results --rows ring --no-baseline --lr 2.5e-3 --steps 800   # one row of a sweep
    python -m tinyworld.ti_results --rows ring-context --no-baseline --num-images 50 --steps 1200   # more images

For each row, a word is learned from 5 rendered images (--num-images) of a held-out concept (a
shape or a texture the base model draws but has no word for), then scored:
  reconstruction: share of "a photo of a <x>"-style samples the analyzer reads as the concept;
  editability: share of "a small red <x> on the left on a black background"-style prompts whose
      other attributes (size, color, position, background; and the shape, for a texture) are all honored.
The baseline row is the best ordinary word for the concept. The last two rows are not words:
they learn the U-Net's whole context (77 x D) on the same images with the same loss, to show
how much of the concept any conditioning learned this way gets across. Each score is a mean over
seeds: one run's score depends much on its images and training noise on this tiny model.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ldm.cli import (Parser, check_writable, counted, distinct_seeds, given_options, learning_rate, nonnegative_float,
                     path_arg, positive_int, seed_int, thread_count)
from tinyworld.tools import MEMORY_ADVICE, load_tiny_model
from tinyworld.whole_context import CONTEXT_LR


ROOT = Path(__file__).resolve().parents[1]

ROWS = {
    # name (for --rows): (label, concept, TIConfig overrides)
    "ring": ("single vector", "ring", dict()),
    "ring-multi": ("multi-vector (3)", "ring", dict(num_vectors=3)),
    "ring-progressive": ("progressive (1 -> 3, every 100 steps)", "ring", dict(num_vectors=3, progressive_every=100)),
    "hourglass": ("single vector", "hourglass", dict()),
    "checkered": ("style: single vector", "checkered", dict(learnable_property="style")),
}
# Comparison rows, not words: the U-Net's whole context learned directly (learn_context).
CONTEXT_ROWS = {"ring-context": ("no word: the whole context (77 x D) learned directly", "ring"),
                "checkered-context": ("no word: the whole context (77 x D) learned directly", "checkered")}


def learn(model, concept: str, steps: int, seed: int, out: Path, n_images: int = 5, **overrides):
    """Train a word for `concept` on `n_images` of its images; returns the trainer."""
    from inversion.data import templates
    from inversion.textual_inversion import TIConfig, TextualInversion
    from tinyworld.concepts import default_init_word
    from tinyworld.train import to_tensor
    from tinyworld.world import concept_images
    from invert import TINY_DEFAULTS
    cfg = TIConfig(placeholder=f"<{concept}>", init_word=default_init_word(concept), steps=steps,
                   batch=TINY_DEFAULTS["batch"], lr=TINY_DEFAULTS["lr"], seed=seed, save_every=10 ** 9)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    images = to_tensor(concept_images(concept, n_images, seed=seed))
    trainer = TextualInversion(model, images, cfg, out, templates(cfg.learnable_property), log=lambda s: None)
    trainer.run(progress=False)
    return trainer


def learn_context(model, concept: str, steps: int, seed: int, lr: float = CONTEXT_LR, n_images: int = 5):
    """The U-Net's whole context (77, D) learned directly on the word's images, with the word's
    loss, batch and steps, starting from the text encoder's output for "a photo of a <init word>"
    (`tinyworld.whole_context`): how far any conditioning learned this way gets the concept."""
    from tinyworld import whole_context
    from tinyworld.concepts import default_init_word
    from tinyworld.train import to_tensor
    from tinyworld.world import concept_images
    from invert import TINY_DEFAULTS
    images = to_tensor(concept_images(concept, n_images, seed=seed))
    return whole_context.learn(model, images, f"a photo of a {default_init_word(concept)}", steps, seed, lr,
                               batch=TINY_DEFAULTS["batch"])


def status(line: str) -> None:
    """What is running now, on stderr (the table, on stdout, gets a line per finished row)."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = Parser(prog="python -m tinyworld.ti_results", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=path_arg, default=ROOT / "weights" / "tiny.safetensors", help="a tiny-world model")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: invert.py's tiny default)")
    p.add_argument("--lr", type=learning_rate, default=None,
                   help="base learning rate, x batch (default: invert.py's tiny default)")
    p.add_argument("--n", type=positive_int, default=64, help="samples per score")
    p.add_argument("--sample-steps", type=positive_int, default=50, help="DDIM steps when scoring")
    p.add_argument("--scale", type=nonnegative_float, default=7.5, help="guidance scale when scoring")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2],
                   help="one run per seed (its own images, training noise and sampling seeds); scores are means")
    p.add_argument("--num-images", type=positive_int, default=5,
                   help="rendered images of the concept per seed, for the words and the contexts alike")
    p.add_argument("--rows", nargs="+", choices=[*ROWS, *CONTEXT_ROWS], default=[*ROWS, *CONTEXT_ROWS],
                   help="which rows of the table to run (for a sweep of one of them); the -context rows learn "
                        "the U-Net's whole context instead of a word, with --context-lr")
    p.add_argument("--context-lr", type=learning_rate, default=CONTEXT_LR,
                   help="Adam learning rate of the -context rows, not scaled by the batch")
    p.add_argument("--no-baseline", action="store_true", help="skip the best-plain-word rows")
    p.add_argument("--threads", type=thread_count, default=2,
                   help="torch threads; the README's table was measured with 2 (another count sums in another "
                        "order, and the last-digit differences grow into other scores)")
    p.add_argument("--out", type=path_arg, default=Path("outputs") / "ti_results",
                   help="the trainers' folders (learned words, checkpoints, loss logs)")
    args = p.parse_args(argv)
    given = given_options(p, argv)
    if not set(args.rows) & set(CONTEXT_ROWS) and "context_lr" in given:
        p.error(f"--context-lr sets the {' and '.join(CONTEXT_ROWS)} rows, which --rows leaves out")
    if not set(args.rows) - set(CONTEXT_ROWS) and "lr" in given:
        p.error(f"--lr sets the words' rows; the {' and '.join(CONTEXT_ROWS)} rows take --context-lr")
    if args.n < 2 and not args.no_baseline:
        p.error("--n: the baseline picks its word on n/2 samples, so it needs at least 2 (or pass --no-baseline)")
    distinct_seeds(args.seeds)
    check_writable(args.out)
    import torch
    from invert import TINY_DEFAULTS
    from tinyworld.concepts import best_plain_caption, evaluate_context, evaluate_word, mean_scores
    torch.set_num_threads(args.threads)
    model = load_tiny_model(args.ckpt, sample_steps={"--sample-steps": args.sample_steps})
    steps = args.steps or TINY_DEFAULTS["steps"]
    seeds = args.seeds
    words = set(args.rows) - set(CONTEXT_ROWS)
    print(f"Textual Inversion on the tiny world: {counted(args.num_images, 'image')} per concept and seed, "
          f"{counted(steps, 'step')}, "
          + (f"base lr {args.lr or TINY_DEFAULTS['lr']:g}, " if words else "") + f"{args.n} samples "
          f"per score, DDIM {args.sample_steps}, guidance {args.scale:g}; means over seeds {', '.join(map(str, seeds))}"
          + (f"; the whole context: Adam, lr {args.context_lr:g}" if set(args.rows) & set(CONTEXT_ROWS) else "")
          + f"; {counted(args.threads, 'torch thread')}\n")
    print("| concept | word | reconstruction | editability | per seed: reconstruction / editability "
          "| training time a seed |\n|---|---|---|---|---|---|")

    def row(concept, label, runs, seconds="-"):
        mean = mean_scores(runs)
        percent = lambda r, key: f"{r[key]:.0%}" if key in r else "-"   # a context has no editability
        per_seed = ", ".join(f"{percent(r, 'reconstruction')} / {percent(r, 'editability')}" for r in runs)
        print(f"| {concept} | {label} | {percent(mean, 'reconstruction')} | {percent(mean, 'editability')} | "
              f"{per_seed} | {seconds} |", flush=True)

    done = set()
    for name in args.rows:
        if name in CONTEXT_ROWS:
            label, concept = CONTEXT_ROWS[name]
            runs, seconds = [], 0.0
            for seed in seeds:
                t = time.time()
                status(f"{name}, seed {seed}: learning the context, then scoring")
                context = learn_context(model, concept, steps, seed, args.context_lr, args.num_images)
                seconds += time.time() - t
                runs.append(evaluate_context(model, concept, context, n=args.n, steps=args.sample_steps,
                                             scale=args.scale, seed=seed))
            row(concept, label, runs, f"{seconds / len(seeds):.0f} s")
            continue
        label, concept, overrides = ROWS[name]
        if concept not in done and not args.no_baseline:  # the baseline: the best ordinary word, on the first seed's samples
            status(f"{concept} baseline: choosing the best plain word, then scoring it")
            word, _ = best_plain_caption(model, concept, n=args.n // 2, steps=args.sample_steps,
                                              scale=args.scale, seed=seeds[0])
            row(concept, f"baseline: best plain word \"{word}\"",
                [evaluate_word(model, concept, word, n=args.n, steps=args.sample_steps, scale=args.scale, seed=s)
                 for s in seeds])
            done.add(concept)
        runs, seconds = [], 0.0
        for seed in seeds:
            t = time.time()
            status(f"{name}, seed {seed}: learning the word, then scoring")
            trainer = learn(model, concept, steps, seed, args.out / f"{name}-seed{seed}", args.num_images,
                            **({"lr": args.lr} if args.lr else {}), **overrides)
            seconds += time.time() - t
            runs.append(evaluate_word(model, concept, trainer.cfg.placeholder, n=args.n, steps=args.sample_steps,
                                      scale=args.scale, seed=seed, learned=trainer.saved_word()))
        row(concept, label, runs, f"{seconds / len(seeds):.0f} s")
    return 0


if __name__ == "__main__":
    from ldm.cli import run
    sys.exit(run(main, prog="tinyworld.ti_results", memory_advice=MEMORY_ADVICE))
