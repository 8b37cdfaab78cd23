"""`invert.py --method hiper`: learn a HiPer tail for one image, then edit with sample.py.

    python invert.py --method hiper                   # tiny world: render an image, learn, show edits
    python invert.py --method hiper --image dog.png --source "a standing dog" \\
                     --ckpt v1-5-pruned-emaonly.safetensors --out outputs/dog
    python sample.py --hiper outputs/dog/hiper_tail.safetensors --prompt "a sitting dog" \\
                     --ckpt v1-5-pruned-emaonly.safetensors

Writes to --out (default outputs/hiper) hiper_tail.safetensors (the tail, with K, the source
prompt and the base model's hash), checkpoint.pt, loss.csv, source.png (the image as the model
sees it) and samples/reconstruction.png (the source image, then the model's drawings from
[e_src[:77-K]; e_hiper]).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ldm.cli import CLIError, counted, flags, path_arg, positive_int, shell_command

# SD: the paper's recipe (HiPer0/HiPer script.sh: Adam, lr 5e-3, batch 1; tails used at step 1000).
SD_DEFAULTS = dict(steps=1000, batch=1, lr=5e-3, save_every=100)
# The tiny model (config.image_size <= 64), measured with tinyworld/hiper_eval.py on 8 sources:
# 150 and 300 steps both keep identity (98-100 %, plain target prompt 92 %) without losing edits;
# 300 reconstructs the source best. lr 2e-2 overfits (α = 1 loses edits). ~20 s on one CPU thread.
TINY_DEFAULTS = dict(steps=300, batch=4, lr=5e-3, save_every=50)
TAIL_FILE = "hiper_tail.safetensors"


# The options beside its own that --method hiper takes (invert.py refuses the others).
SHARED_OPTIONS = ("steps", "lr", "batch", "seed", "ckpt", "out", "resume", "save_every", "no_eval", "device",
                  "precision", "gradient_checkpointing", "half_weights")


def add_arguments(parser) -> set:
    """Add HiPer's argument group; returns the names (dests) of its own options."""
    g = parser.add_argument_group(
        "HiPer (--method hiper)",
        f"one image and a prompt describing it; also uses {flags(SHARED_OPTIONS)} (SD defaults: 1000 steps, "
        "lr 5e-3, batch 1; tiny model: 300 steps, lr 5e-3, batch 4)")
    own = [g.add_argument("--image", type=path_arg, default=None, metavar="IMG",
                          help="the source image (default on the tiny model: a rendered tiny-world object)"),
           g.add_argument("--source", default=None, metavar="TEXT",
                          help="the source prompt describing --image, e.g. 'a standing dog'"),
           g.add_argument("--tail", type=positive_int, default=5, metavar="K",
                          help="the last K of the 77 text-encoder rows are learned")]
    return {a.dest for a in own}


def check_arguments(args) -> None:
    """Everything that can be checked before the model is loaded; CLIError otherwise."""
    from inversion.data import DataError, load_image
    from inversion.hiper import HiPerError, check_prompt, check_tail_size
    from invert import check_paths
    if (args.image is None) != (args.source is None):
        raise CLIError("give --image and --source together (--source describes the image), or neither for the "
                       "tiny-world demo")
    try:
        check_tail_size(args.tail)
    except HiPerError as e:
        raise CLIError(str(e)) from None
    check_paths(args, files=(TAIL_FILE, "source.png"))
    if args.source is not None and not args.source.strip():
        raise CLIError("--source is empty; write the prompt that describes --image, e.g. 'a standing dog'")
    if args.image is not None:
        if args.image.is_dir():
            raise CLIError(f"--image {args.image}: is a folder; HiPer learns from one image file")
        if not args.image.is_file():
            from ldm.files import not_a_file
            raise CLIError(f"--image {args.image}: {not_a_file(args.image)}")
        try:
            load_image(args.image, 8)  # decodes the file: an unreadable image fails before the model loads
        except DataError as e:
            raise CLIError(f"--image: {e}") from None
        from clip.tokenizer import Tokenizer
        try:
            check_prompt(Tokenizer(), args.source, args.tail)
        except HiPerError as e:
            raise CLIError(str(e)) from None


def main(args) -> int:
    from inversion.files import BaseModel
    from inversion.hiper import HiPer, HiPerConfig, save_tail
    from inversion.trainer import TrainingError
    from invert import load_model, train

    check_arguments(args)
    t_start = time.time()
    ckpt, model, device = load_model(args)
    tiny = model.config.image_size <= 64
    defaults = TINY_DEFAULTS if tiny else SD_DEFAULTS
    demo = args.image is None
    if demo:
        if not tiny:
            raise CLIError("--image and --source are required with an SD checkpoint (the demo fits the tiny model)")
        from tinyworld.hiper_eval import make_source, source_prompt, to_model_image
        attrs, image_u8, targets = make_source(args.seed, 0)
        source, image = source_prompt(attrs), to_model_image(image_u8, model.config.image_size)
    else:
        from inversion.data import DataError, load_image
        source = args.source
        try:
            image = load_image(args.image, model.config.image_size,
                               warn=lambda m: print(f"warning: {m}", file=sys.stderr))
        except DataError as e:
            raise CLIError(f"--image: {e}") from None

    cfg = HiPerConfig(source=source, tail=args.tail, steps=args.steps or defaults["steps"],
                      lr=args.lr or defaults["lr"], batch=args.batch or defaults["batch"], seed=args.seed,
                      save_every=args.save_every or defaults["save_every"])
    try:
        trainer = HiPer(model, image, cfg, args.out)
        trainer.base_model = BaseModel(ckpt, model)  # a checkpoint from another model is refused
        resumed = args.resume and trainer.resume()
    except TrainingError as e:  # HiPerError, or a checkpoint of other settings
        raise CLIError(str(e)) from None
    write_source_image(image, args.out / "source.png", tiny)
    print(f"{'resuming at step ' + str(trainer.step) if resumed else 'learning'} a HiPer tail of {cfg.tail} rows "
          f"for {source!r} on {device}; lr {cfg.lr:g}, batch {cfg.batch}, {cfg.steps} steps")

    base = trainer.base_model.metadata()
    tail_path = args.out / TAIL_FILE

    def save(t: HiPer) -> None:
        save_tail(tail_path, t.tail_vectors(), {**base, "source": source, "step": str(t.step)})

    if not train(trainer, tail_path, on_save=save):
        return 130
    write_reconstruction(model, trainer, image, args.out / "samples" / "reconstruction.png", tiny)
    print(f"trained {counted(trainer.step, 'step')} in {time.time() - t_start:.0f} s; wrote {tail_path}, loss.csv, "
          "source.png and samples/reconstruction.png")
    example = source_prompt(targets["position"]) if demo else cfg.source
    print("edit with: " + shell_command("python", "sample.py", "--hiper", tail_path, "--prompt", example,
                                        *([] if args.ckpt is None else ["--ckpt", args.ckpt]))
          + ("" if demo else "   (change the prompt's words to edit the image)"))
    if demo and not args.no_eval:
        report_demo_edits(model, trainer, attrs, targets)
    return 0


def write_source_image(image: torch.Tensor, path: Path, tiny: bool) -> None:
    from ldm.generate import save_image, to_pil
    save_image(to_pil(((image[None] + 1) / 2).clamp(0, 1))[0], path, upscale=4 if tiny else 1)


@torch.no_grad()
def write_reconstruction(model, trainer, image: torch.Tensor, path: Path, tiny: bool, n: int = 4) -> None:
    """The source image, then n drawings from [e_src[:77-K]; e_hiper] (DDIM 50, guidance 7.5)."""
    from ldm.generate import generate_or_warn, make_grid, save_image, to_pil
    cond = trainer.context()[None].to(model.dtype)
    images = generate_or_warn(path, model, [""] * n, list(range(n)), cond=cond, steps=50,
                              desc=None if tiny else "reconstruction")  # minutes at SD's size on a CPU
    if images is None:  # the tail is saved already
        return
    grid = make_grid(to_pil(torch.cat([((image[None] + 1) / 2).clamp(0, 1), images])), columns=n + 1)
    save_image(grid, path, upscale=4 if tiny else 1)


def report_demo_edits(model, trainer, attrs, targets, samples: int = 4) -> None:
    """Tiny-world demo: one edit of each kind, drawn with the plain target prompt and with HiPer."""
    from tinyworld.hiper_eval import ALPHA, edit_results, rate, source_prompt
    t = time.time()
    results = edit_results(model, attrs, targets, trainer.tail_vectors().to(model.device), alphas=(ALPHA,),
                           samples=samples)
    print(f"edits of {source_prompt(attrs)!r}, {samples} seeds each, read by the analyzer ({time.time() - t:.0f} s); "
          "identity = shape, color and size kept:")
    for what, target in targets.items():
        plain = rate(results, edit=what, method="target prompt")
        hiper = rate(results, edit=what, method="HiPer")
        print(f"  {what} -> {getattr(target, what)}: target prompt identity {plain[0]:.0%}, edit {plain[1]:.0%} | "
              f"HiPer (α={ALPHA:g}) identity {hiper[0]:.0%}, edit {hiper[1]:.0%}")
