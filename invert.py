"""Learn a new word for a concept from a few images (Textual Inversion).

    python invert.py                       # learn a held-out shape of the tiny world, then score it
    python invert.py --images my_toy/ --placeholder "<my-toy>" --init-word toy \\
                     --ckpt v1-5-pruned-emaonly.safetensors --out outputs/my-toy

The frozen model is asked to reconstruct the images from prompts such as "a photo of a
<my-toy>"; only the new word's embedding is trained. The result loads in sample.py,
diffusers (`load_textual_inversion`) and AUTOMATIC1111 / ComfyUI.

--method neti learns a NeTI mapper instead (a vector per timestep and U-Net layer;
inversion/neti_cli.py), --method hiper a HiPer tail from one image and its prompt
(inversion/hiper_cli.py); each has its own group of options in --help.
"""
from __future__ import annotations

import importlib
import signal
import sys
import time
from pathlib import Path
from typing import Optional


def interrupted_while_loading(signum, frame):
    """Ctrl-C while the imports below load torch (a second or two) ends the program with the
    line a later Ctrl-C prints, not with a traceback from inside torch; ldm.cli.run puts
    Python's own handler back for the work itself."""
    print("invert.py: interrupted", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted_while_loading)

import torch

from inversion.precision import fp16_warning, training_dtype
from ldm.cli import (CLIError, Parser, at_most, check_half_weights, check_output_names, check_writable, checked_number,
                     counted, flags, learning_rate, nonnegative_float, nonnegative_int, path_arg, pick_device,
                     positive_int, run, seed_int, shell_command, word_arg)
from ldm.generate import MAX_RESOLUTION

ROOT = Path(__file__).resolve().parent
DEFAULT_CKPT = ROOT / "weights" / "tiny.safetensors"
MAX_RENDERED = 100   # tiny-world images rendered for a run without --images
MAX_BATCH = 1024     # images a step (far more than fits in any memory at 512 px)
# Measured on the tiny model (see README, "Results on the tiny world"); SD uses the paper's recipe.
TINY_DEFAULTS = dict(steps=400, batch=8, lr=5e-3, save_every=100)
SD_DEFAULTS = dict(steps=5000, batch=4, lr=5e-3, save_every=500)
# Methods beside Textual Inversion live in their own modules, each with
# add_arguments(parser) (its own argument group) and main(args) -> int.
METHOD_MODULES = {"hiper": "inversion.hiper_cli", "neti": "inversion.neti_cli"}
# Each method's own default output folder, so that one method's run does not block another's.
DEFAULT_OUT = {"ti": Path("outputs") / "textual_inversion", "neti": Path("outputs") / "neti",
               "hiper": Path("outputs") / "hiper"}


def build_parser() -> Parser:
    p = Parser(prog="invert.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--method", choices=["ti", *METHOD_MODULES], default="ti",
                   help="ti: Textual Inversion" + "".join(f"; {k}: see its options below" for k in METHOD_MODULES))
    data = p.add_argument_group("data")
    data.add_argument("--images", type=path_arg, default=None,
                      help="folder of 3-5 images of the concept, or one image file (default: a held-out concept of the "
                           "tiny world)")
    data.add_argument("--concept", default="ring",
                      help="without --images: which tiny-world concept to learn (ring, hourglass, checkered)")
    data.add_argument("--num-images", type=positive_int, default=5, help="without --images: how many to render")
    data.add_argument("--resolution", type=positive_int, default=None,
                      help="training resolution of the --images (default: the model's, 512 for SD v1; a multiple of "
                           "64 for SD v1, of 16 for the tiny model)")
    data.add_argument("--no-flip", action="store_true", help="turn off the random horizontal flip")

    word = p.add_argument_group("the new word")
    word.add_argument("--placeholder", type=word_arg, default=None,
                      help="the new token, e.g. '<cat-toy>' (needed with --images; default on the tiny world: "
                           "<concept>)")
    word.add_argument("--init-word", type=word_arg, default=None,
                      help="a one-token word the embedding starts from, e.g. 'toy' (needed with --images; default "
                           "on the tiny world: object, or pattern for a style)")
    word.add_argument("--property", choices=("object", "style"), default=None,
                      help="object: 'a photo of a <x>' templates; style: 'a painting in the style of <x>' (default: "
                           "object; style for the tiny world's checkered)")
    word.add_argument("--num-vectors", type=positive_int, default=1,
                      help="vectors per word: the paper's extended latent")
    word.add_argument("--progressive-every", type=nonnegative_int, default=0,
                      help="progressive extension: start with one vector and add one every K steps (0 = off)")
    word.add_argument("--reg-weight", type=nonnegative_float, default=0.0,
                      help="L2 regularization toward the init word's embedding")
    word.add_argument("--per-image-tokens", action="store_true",
                      help="an extra token per training image, mixed into prompts with --per-image-prob")
    word.add_argument("--per-image-prob", type=checked_number(float, "a number", lambda v: 0 <= v <= 1,
                                                               "between 0 and 1"), default=0.5,
                      help="with --per-image-tokens: the share of prompts that carry the image's own token, "
                           "'a photo of a <x> with <x>-img2' (default: 0.5)")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--steps", type=positive_int, default=None,
                     help="training steps (tiny model / SD: ti 400 / 5000; neti 400 / 1000; hiper 300 / 1000)")
    opt.add_argument("--lr", type=learning_rate, default=None,
                     help="base learning rate (ti 5e-3 and neti 1e-3, each multiplied by the images per step; "
                          "hiper 5e-3 as it is)")
    opt.add_argument("--batch", type=at_most(MAX_BATCH, "the paper's is 4 per GPU"), default=None,
                     help="images per step (tiny model / SD: ti 8 / 4; neti 8 / 2, with --grad-accum 4 on SD; "
                          "hiper 4 / 1)")
    opt.add_argument("--seed", type=seed_int, default=0,
                     help="seeds the training noise (and, without --images, the rendered tiny-world images)")

    run_ = p.add_argument_group("model and outputs")
    run_.add_argument("--ckpt", type=path_arg, default=None,
                      help=f"SD v1.x weights (default: {DEFAULT_CKPT.relative_to(ROOT)})")
    run_.add_argument("--out", type=path_arg, default=None,
                      help="output folder (default: outputs/<method>: " + ", ".join(map(str, DEFAULT_OUT.values()))
                           + "; a folder that holds a run is refused unless --resume)")
    run_.add_argument("--save-every", type=positive_int, default=None,
                      help="checkpoint and learned files every N steps (default: ti 100 on the tiny model, 500 on "
                           "SD; neti 100, 250; hiper 50, 100)")
    run_.add_argument("--sample-every", type=nonnegative_int, default=0,
                      help="validation grid every N steps (0 = at the end)")
    run_.add_argument("--validation-prompt", action="append", default=[], metavar="TEXT",
                      help="a prompt of the validation grid, with the word in it, e.g. 'a <my-toy> on the beach'; "
                           "repeatable (default: the first four training templates)")
    run_.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    run_.add_argument("--no-eval", action="store_true", help="tiny world: skip the reconstruction/editability scores")
    run_.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    run_.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                      help="frozen weights' dtype. auto: bf16 under autocast on a CUDA GPU that computes in it "
                           "(Ampere or later), fp32 elsewhere; "
                           "fp32 turns autocast off; the learned vectors are fp32 always")
    run_.add_argument("--gradient-checkpointing", action="store_true",
                      help="keep less for the backward pass: each U-Net block's activations are computed "
                           "again there instead of kept (less memory, more time; the same numbers)")
    run_.add_argument("--half-weights", action="store_true",
                      help="keep the frozen weights in fp16 and compute in fp32, casting each layer's weight "
                           "where it is used: half the weights' memory (SD v1.5: 4.3 -> 2.2 GB), slower steps "
                           "on a CPU; exact for an fp16 checkpoint. For a CPU short of memory")
    # Which options each method takes: a method's own group and its SHARED_OPTIONS; Textual
    # Inversion takes every option but the other methods' own.
    modules = {name: importlib.import_module(module) for name, module in METHOD_MODULES.items()}
    own = {name: module.add_arguments(p) for name, module in modules.items()}
    every = {a.dest for a in p._actions} - {"help"}
    p.method_options = {"ti": every - set().union(*own.values())}
    for name, module in modules.items():
        p.method_options[name] = own[name] | set(module.SHARED_OPTIONS) | {"method"}
    return p


def check_options_used(parser: Parser, args, argv) -> None:
    """An option that would be ignored without a word is refused: one the chosen --method does
    not take, or one that the other options leave nothing to do."""
    given = parser.given_options(argv)
    for dest in sorted(given - parser.method_options[args.method]):
        owners = [m for m, options in parser.method_options.items() if dest in options]
        raise CLIError(f"{flags([dest])} is not an option of --method {args.method}; it belongs to "
                       f"--method {' and '.join(owners)} (see --help)")
    if args.images is not None and given & {"concept", "num_images"}:
        raise CLIError("--concept and --num-images choose tiny-world images to render; with --images they have "
                       "nothing to do")
    if "per_image_prob" in given and not args.per_image_tokens:
        raise CLIError("--per-image-prob is the share of prompts with per-image tokens; it needs --per-image-tokens")
    if args.progressive_every and args.num_vectors < 2:
        raise CLIError("--progressive-every adds vectors up to --num-vectors; give --num-vectors 2 or more")


def tiny_world_images(concept: str, n: int, seed: int, out: Optional[Path]) -> torch.Tensor:
    """Render n images of a held-out concept, save them to out/ (if given) to look at, return
    (n, 3, 32, 32)."""
    from PIL import Image
    from ldm.generate import save_image
    from tinyworld.world import concept_images
    from tinyworld.train import to_tensor
    try:
        images = concept_images(concept, n, seed=seed)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if out is not None:
        for i, im in enumerate(images):
            save_image(Image.fromarray(im), out / f"{i:02d}.png", upscale=128 // im.shape[0])
    return to_tensor(images)


def the_word(args, tiny: bool):
    """(placeholder, init word, property) of the word to learn: from the arguments, or, without
    --images, the tiny-world concept's defaults ("<ring>", "object", "object")."""
    if args.images is None:
        from tinyworld.concepts import concept_attribute, default_init_word
        if not tiny:
            raise CLIError("--images is required with an SD checkpoint (the tiny world only fits the tiny model)")
        try:
            kind = concept_attribute(args.concept)
        except ValueError as e:
            raise CLIError(str(e)) from None
        return (args.placeholder or f"<{args.concept}>", args.init_word or default_init_word(args.concept),
                args.property or ("object" if kind == "shape" else "style"))
    if not args.placeholder or not args.init_word:
        raise CLIError("with --images, give --placeholder (e.g. '<my-toy>') and --init-word (e.g. 'toy')")
    return args.placeholder, args.init_word, args.property or "object"


def training_images(args, model) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1]: the --images folder at the training resolution, or rendered
    tiny-world images of --concept (saved to --out/train_images to look at; a --resume leaves
    the folder as its first run wrote it, since the checkpoint refuses other images)."""
    from inversion.data import DataError, load_images
    from ldm.generate import size_multiple
    if args.images is None:
        images = tiny_world_images(args.concept, args.num_images, args.seed,
                                   None if args.resume else args.out / "train_images")
    else:
        resolution = args.resolution or model.config.image_size
        if resolution % size_multiple(model):
            raise CLIError(f"--resolution {resolution} must be a multiple of {size_multiple(model)} for this model")
        try:
            images = load_images(args.images, resolution, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
        except DataError as e:
            raise CLIError(str(e)) from None
    if len(images) == 1:
        print("warning: one training image; the word will copy that image closely (3-5 images work best)",
              file=sys.stderr)
    return images


# File names the AUTOMATIC1111 pair must not take: our own outputs', and the devices of Windows
# (a file named nul.pt, whatever its case, is no file there).
TAKEN_NAMES = {"learned_embeds", "checkpoint", "loss", "con", "prn", "aux", "nul",
               *(f"{port}{i}" for port in ("com", "lpt") for i in range(10))}


def output_files(out: Path, placeholder: str, tokenizer):
    """Ours, and the AUTOMATIC1111 pair. AUTOMATIC1111 calls a word by its file name, so that name
    must not be a word of the vocabulary: '<toy>' gives toy-embedding.pt, '<cat-toy>' cat-toy.pt."""
    safe = "".join(c if c.isalnum() or c in "-_" else "" for c in placeholder) or "embedding"
    if tokenizer.word_id(safe) is not None or safe.lower() in TAKEN_NAMES:
        safe += "-embedding"
    return out / "learned_embeds.safetensors", out / f"{safe}.pt", out / f"{safe}.safetensors"


def check_paths(args, files=(), folders=()) -> None:
    """The checks every method shares: model, images and output folder (before anything is loaded);
    `files` and `folders` are the names the method writes in --out besides the shared ones."""
    if args.ckpt is None and not DEFAULT_CKPT.exists():
        raise CLIError(f"no default model at {DEFAULT_CKPT.relative_to(ROOT)}: pass --ckpt with an SD v1.x "
                       "checkpoint (see weights/README.md)")
    if args.ckpt is not None and not args.ckpt.exists():
        raise CLIError(f"--ckpt {args.ckpt}: no such file or folder")
    if args.images is not None and not args.images.exists():
        raise CLIError(f"--images {args.images}: no such file or folder")
    if args.num_images > MAX_RENDERED:
        raise CLIError(f"--num-images {args.num_images}: at most {MAX_RENDERED} (the paper learns from 3-5)")
    if args.resolution is not None and args.resolution > MAX_RESOLUTION:
        raise CLIError(f"--resolution {args.resolution}: at most {MAX_RESOLUTION} (SD v1 is trained at 512)")
    if args.resolution is not None and args.images is None:
        raise CLIError("--resolution applies to --images; the tiny world's images are rendered at the model's size")
    check_writable(args.out)
    check_output_names(args.out, files=("checkpoint.pt", "loss.csv", *files), folders=("samples", *folders))
    if args.resume and not (args.out / "checkpoint.pt").exists():
        raise CLIError(f"--resume: {args.out / 'checkpoint.pt'} does not exist")
    if not args.resume and (args.out / "checkpoint.pt").exists():
        raise CLIError(f"{args.out} already holds a run: pass --resume to continue it, or choose another --out")


def load_model(args):
    """(checkpoint path, frozen model, device) from --ckpt, --device, --precision, --half-weights and
    --gradient-checkpointing."""
    from ldm.load import load
    ckpt = args.ckpt or DEFAULT_CKPT
    device = pick_device(args.device)
    dtype = training_dtype(args.precision, device)
    check_half_weights(args.half_weights, args.precision, dtype)
    warning = fp16_warning(dtype, device)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    model = load(ckpt, device=device, dtype=dtype, half_weights=args.half_weights)
    model.unet.gradient_checkpointing = args.gradient_checkpointing
    return ckpt, model, device


def start_trainer(trainer_class, args, model, ckpt, cfg, prop: str):
    """Everything that can refuse a run of Textual Inversion or NeTI, before its first file is
    written: the words and validation prompts, the images, then the trainer, built and resumed if
    asked (a checkpoint of other settings or another model is refused).
    -> (trainer, images, validation prompts, resumed)."""
    from inversion.data import DataError, templates, validation_prompts
    from inversion.files import BaseModel
    from inversion.textual_inversion import check_words
    from inversion.trainer import TrainingError
    try:
        check_words(model, cfg)
        grid_prompts = validation_prompts(cfg.placeholder, prop, args.validation_prompt, model.tokenizer)
    except (TrainingError, DataError) as e:
        raise CLIError(str(e)) from None
    images = training_images(args, model)
    try:
        trainer = trainer_class(model, images, cfg, args.out, templates(prop))
        trainer.base_model = BaseModel(ckpt, model)
        resumed = args.resume and trainer.resume()
    except TrainingError as e:
        raise CLIError(str(e)) from None
    return trainer, images, grid_prompts, resumed


def train(trainer, learned_file: Path, **callbacks) -> bool:
    """trainer.run(**callbacks); False, after saying what was saved, when Ctrl-C (or SIGTERM)
    stops it: the trainer has written its checkpoint and the learned file before returning. A
    run whose learned values become NaN stops with one line (TrainingError), saving nothing."""
    from inversion.trainer import TrainingError
    if trainer.step >= trainer.cfg.steps:
        raise CLIError(f"--resume: the run in {trainer.out} is at step {trainer.step} already; give --steps above "
                       f"{trainer.step} to train it further")
    try:
        trainer.run(**callbacks)
        return True
    except TrainingError as e:
        raise CLIError(str(e)) from None
    except KeyboardInterrupt:
        if trainer.step >= trainer.cfg.steps:  # in the last validation grid: the training itself is done
            print(f"\ninterrupted after the last step, {trainer.step}: saved {learned_file} and "
                  f"{trainer.checkpoint_path}; the training is complete, its last validation grid was not drawn",
                  file=sys.stderr)
        else:
            print(f"\ninterrupted at step {trainer.step}: saved {learned_file} and {trainer.checkpoint_path} "
                  "(continue with --resume)", file=sys.stderr)
        return False


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_options_used(parser, args, argv)
    if args.out is None:
        args.out = DEFAULT_OUT[args.method]
    if args.method != "ti":
        return importlib.import_module(METHOD_MODULES[args.method]).main(args)
    from inversion.data import templates
    from inversion.files import save_a1111, save_embeddings
    from inversion.textual_inversion import TIConfig, TextualInversion

    check_paths(args, files=("learned_embeds.safetensors",), folders=("train_images",))
    t_start = time.time()
    ckpt, model, device = load_model(args)
    tiny = model.config.image_size <= 64
    defaults = TINY_DEFAULTS if tiny else SD_DEFAULTS
    steps = args.steps or defaults["steps"]
    last_added = (args.num_vectors - 1) * args.progressive_every  # progressive: the step after it has them all
    if args.progressive_every and steps <= last_added:
        print(f"warning: --steps {steps} ends before the word has its {args.num_vectors} vectors (one more every "
              f"{args.progressive_every} steps: all {args.num_vectors} from step {last_added + 1}); the files will "
              "hold fewer", file=sys.stderr)

    tiny_concept = args.images is None
    placeholder, init_word, prop = the_word(args, tiny)
    cfg = TIConfig(placeholder=placeholder, init_word=init_word, learnable_property=prop, num_vectors=args.num_vectors,
                   steps=steps, lr=args.lr or defaults["lr"], batch=args.batch or defaults["batch"],
                   flip=not args.no_flip,
                   progressive_every=args.progressive_every, reg_weight=args.reg_weight,
                   per_image_tokens=args.per_image_tokens, per_image_prob=args.per_image_prob, seed=args.seed,
                   save_every=args.save_every or defaults["save_every"], sample_every=args.sample_every)
    trainer, images, grid_prompts, resumed = start_trainer(TextualInversion, args, model, ckpt, cfg, prop)
    print(f"{'resuming at step ' + str(trainer.step) if resumed else 'training'} {placeholder!r} "
          f"({counted(cfg.num_vectors, 'vector')}) from {len(images)} images on {device}; "
          f"effective lr = {cfg.lr:g} x batch {cfg.batch} = {cfg.effective_lr:g}")

    base = trainer.base_model.metadata()
    ours, a1111_pt, a1111_st = output_files(args.out, placeholder, model.tokenizer)
    check_output_names(args.out, files=(a1111_pt.name, a1111_st.name))

    def save(t: TextualInversion) -> None:
        vec = t.embedding()
        meta = {**base, "init_word": init_word, "step": str(t.step),
                "placeholder": placeholder, "method": "textual_inversion", "num_vectors": str(len(vec))}
        save_embeddings(ours, {placeholder: vec}, meta)
        save_a1111(a1111_pt, placeholder, vec, t.step, metadata=meta)
        save_a1111(a1111_st, placeholder, vec, t.step, metadata=meta)

    def sample_grid(t: TextualInversion) -> None:
        write_validation_grid(model, t, grid_prompts, args.out / "samples" / f"step-{t.step:06d}.png", tiny,
                              size=images.shape[-1])

    if not train(trainer, ours, on_save=save, on_sample=sample_grid):
        return 130
    print(f"trained {counted(trainer.step, 'step')} in {time.time() - t_start:.0f} s; wrote {ours}, {a1111_pt.name}, "
          f"{a1111_st.name}, loss.csv and samples/")
    ckpt_words = [] if args.ckpt is None else ["--ckpt", args.ckpt]
    print("sample with: " + shell_command("python", "sample.py", "--embedding", ours, "--prompt",
                                          templates(prop)[0].format(placeholder), *ckpt_words))
    if tiny_concept and not args.no_eval:
        report_tiny_scores(model, trainer, args.concept, placeholder)
    return 0


def grid_options(trainer, tiny: bool, size: int) -> dict:
    """How a run draws its validation grid (ldm.generate.save_prompt_row), at the training images'
    size: on the tiny model with its sampling steps, shown 4x; on SD with DDIM 30 and a progress
    bar (minutes on a CPU)."""
    return dict(steps=trainer.cfg.sample_steps if tiny else 30, upscale=4 if tiny else 1, size=size,
                desc=None if tiny else "validation grid")


def write_validation_grid(model, trainer, prompts, path: Path, tiny: bool, size: int) -> None:
    """The validation prompts, each with the active vectors of the word, one image each."""
    from ldm.generate import save_prompt_row
    word = trainer.saved_word()  # the active vectors
    save_prompt_row(model, [word.expand(p) for p in prompts], path, new_embeddings=word.mapping(),
                    **grid_options(trainer, tiny, size))


def report_tiny_scores(model, trainer, concept: str, placeholder: str) -> None:
    from tinyworld.concepts import evaluate_word, scores_line
    t = time.time()
    scores = evaluate_word(model, concept, placeholder, n=64, learned=trainer.saved_word())
    print(scores_line(placeholder, concept, scores, time.time() - t))


if __name__ == "__main__":
    sys.exit(run(main, prog="invert.py"))
