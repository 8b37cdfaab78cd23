"""Generate images from a prompt with a Stable Diffusion v1 model.

    python sample.py --prompt "a large blue circle on the left"          # the shipped tiny model
    python sample.py --ckpt v1-5-pruned-emaonly.safetensors --prompt "a photo of a cat" --n 4
    python sample.py --embedding outputs/textual_inversion/learned_embeds.safetensors --prompt "a <ring> on the left"
    python sample.py --neti outputs/neti/neti_mapper.safetensors --prompt "a <ring>" --truncation 32
    python sample.py --hiper outputs/hiper/hiper_tail.safetensors --prompt "a red circle on the right" --alpha 0.8

Writes one PNG per image, NNNNN-<seed>.png (prompt, seed and settings in its text metadata),
numbered on from what --out already holds, and their grid, grid-NNNNN.png (NNNNN: the first image's
number).
"""
from __future__ import annotations

import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple


def interrupted_while_loading(signum, frame):
    """Ctrl-C while the imports below load torch (a second or two) ends the program with the
    line a later Ctrl-C prints, not with a traceback from inside torch; ldm.cli.run puts
    Python's own handler back for the work itself."""
    print("sample.py: interrupted", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted_while_loading)

import torch

from inversion.hiper import MAX_ALPHA
from ldm.generate import MAX_RESOLUTION
from ldm.cli import (DTYPES, CLIError, Parser, at_most, check_half_weights, check_writable, checked_number, counted,
                     nonnegative_float, path_arg, pick_device, pick_dtype, positive_int, run, seed_int)

ROOT = Path(__file__).resolve().parent
DEFAULT_CKPT = ROOT / "weights" / "tiny.safetensors"
MAX_IMAGES = 1000  # a run keeps every image for its grid; more come from another run with a later --seed


def build_parser() -> Parser:
    p = Parser(prog="sample.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--prompt", required=True,
                   help="what to draw; learned words (e.g. <cat-toy>) need the --embedding or --neti file that "
                        "defines them")
    p.add_argument("--negative", default="", help="negative prompt: the unconditional half of guidance")
    p.add_argument("--ckpt", type=path_arg, default=None,
                   help=f"SD v1.x weights: a CompVis .safetensors/.ckpt file or a diffusers folder "
                        f"(default: {DEFAULT_CKPT.relative_to(ROOT)})")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps (U-Net evaluations)")
    p.add_argument("--scale", type=nonnegative_float, default=7.5,
                   help="classifier-free guidance scale; 1 turns guidance off")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--n", type=at_most(MAX_IMAGES, "each run keeps its images for the grid; run again with a "
                                                   "later --seed for more"),
                   default=4, help="number of images")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per U-Net batch")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim",
                   help="ddim: deterministic, few steps; ddpm: ancestral, stochastic")
    p.add_argument("--eta", type=checked_number(float, "a number", lambda v: 0 <= v <= 1, "between 0 and 1"),
                   default=0.0, help="DDIM noise, 0 to 1 (0 = deterministic, 1 = as much as DDPM's)")
    side = at_most(MAX_RESOLUTION, "SD v1 draws at 512")
    p.add_argument("--height", type=side, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=side, default=None, help="image width (default: the model's)")
    p.add_argument("--out", type=path_arg, default=Path("outputs"), help="folder for the PNGs and the grid")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="weights dtype; auto = fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--half-weights", action="store_true",
                   help="keep the weights in fp16 and compute in fp32: half the weights' memory (SD v1.5: 4.3 -> "
                        "2.2 GB), slower steps on a CPU; the same images for an fp16 checkpoint")
    p.add_argument("--ema", action="store_true", help="use the EMA U-Net of a full (non-emaonly) checkpoint")
    p.add_argument("--embedding", type=path_arg, action="append", default=[], metavar="FILE",
                   help="a learned word (ours, diffusers, sd-concepts-library or AUTOMATIC1111 file); repeatable")
    p.add_argument("--hiper", type=path_arg, default=None, metavar="FILE",
                   help="a HiPer tail (invert.py --method hiper): --prompt is the target text, the tail keeps "
                        "the source image's subject")
    p.add_argument("--alpha", type=checked_number(float, "a number", lambda v: 0 <= v <= MAX_ALPHA,
                                                  f"between 0 and {MAX_ALPHA:g} (the paper's are 0 to 1)"),
                   default=0.8,
                   help="with --hiper: the weight α of the tail (the paper's value)")
    p.add_argument("--neti", type=path_arg, default=None, metavar="FILE",
                   help="a NeTI mapper (invert.py --method neti); write its placeholder in --prompt")
    p.add_argument("--truncation", type=positive_int, default=None, metavar="K",
                   help="with --neti: keep the mapper's first K hidden units (smaller: more editable, less faithful)")
    return p


def resolve_checkpoint(ckpt) -> Path:
    if ckpt is not None:
        return ckpt
    if not DEFAULT_CKPT.exists():
        raise CLIError(f"no default model at {DEFAULT_CKPT.relative_to(ROOT)}: pass --ckpt with an SD v1.x "
                       "checkpoint (see weights/README.md for which files work and where to put them)")
    return DEFAULT_CKPT


def load_model(ckpt, device: torch.device, dtype: torch.dtype, ema: bool = False, half_weights: bool = False):
    """The model named by --ckpt (or the default), with a one-line error for anything wrong."""
    import ldm
    return ldm.load(resolve_checkpoint(ckpt), device=device, dtype=dtype, ema=ema, half_weights=half_weights)


def unlearned_words(text: str, learned) -> list:
    """Words written like a learned word, '<cat-toy>', that no loaded file defines: the text
    encoder would read them as ordinary text, a likely mistake (a forgotten --embedding)."""
    return [w for w in dict.fromkeys(re.findall(r"<[^<>\s]+>", text)) if w not in learned]


def next_number(folder: Path) -> int:
    """The number of the next image in `folder`: one past the highest 'NNNNN-<seed>.png' there (0 in
    a new folder), so that a second run into the same --out adds its images beside the first's."""
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"(\d{5,})-", p.name))]
    return max(numbers, default=-1) + 1


def png_info(settings: dict):
    """PNG text chunks: each setting as its own key, and an AUTOMATIC1111-style "parameters" line."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    a1111 = (f"{settings['prompt']}\nNegative prompt: {settings['negative_prompt']}\n"
             f"Steps: {settings['steps']}, Sampler: {settings['sampler'].upper()}, CFG scale: {settings['scale']}, "
             f"Seed: {settings['seed']}, Size: {settings['width']}x{settings['height']}, "
             f"Model: {settings['model'].removesuffix('.safetensors').removesuffix('.ckpt')}")
    info.add_text("parameters", a1111)
    return info


def check_arguments(parser: Parser, args, argv) -> None:
    """Options that contradict each other, refused before the model is loaded."""
    if args.ckpt is not None and not args.ckpt.exists():
        raise CLIError(f"--ckpt {args.ckpt}: no such file or folder")
    if args.truncation is not None and args.neti is None:
        raise CLIError("--truncation needs --neti (it truncates a NeTI mapper)")
    if args.hiper is None and "alpha" in parser.given_options(argv):
        raise CLIError("--alpha needs --hiper (it weights a HiPer tail)")
    if args.neti is not None and args.hiper is not None:
        raise CLIError("use --neti or --hiper, not both")
    if args.eta and args.sampler != "ddim":
        raise CLIError(f"--eta is DDIM's noise; --sampler {args.sampler} does not take it")
    if args.seed + args.n - 1 >= 2 ** 63:
        raise CLIError(f"--seed {args.seed} with --n {args.n}: image i uses seed + i, and the last would pass "
                       "2**63 - 1; give a smaller --seed")


@dataclass
class Text:
    """What the U-Net reads: the prompts (with learned words expanded), and the encodings that
    replace the plain text encoder's where a learned file asks for it (see ldm.generate.generate)."""
    prompt: str
    negative: str
    new_embeddings: Optional[dict] = None   # Textual Inversion: token id -> learned vector(s)
    cond: Any = None                        # HiPer: (1, 77, D); NeTI: per timestep and layer
    uncond: Any = None
    value_cond: Any = None                  # NeTI's textual bypass: the values' text
    value_uncond: Any = None
    learned_words: List[str] = field(default_factory=list)


def text_conditioning(args, model) -> Text:
    """The prompts as --embedding, --hiper or --neti make them; every file is read and checked
    here, before anything is written."""
    from inversion.files import BaseModel
    base = BaseModel(resolve_checkpoint(args.ckpt), model)  # hashed only if a learned file names its base model
    text = Text(args.prompt, args.negative)
    if args.embedding:
        from inversion.files import apply_embeddings
        from inversion.hook import LearnedEmbeddings
        learned = LearnedEmbeddings(model.tokenizer)
        text.learned_words = list(apply_embeddings(model, learned, args.embedding, base))
        learned.to(model.device)
        text.new_embeddings = learned.mapping()
        text.prompt, text.negative = learned.expand(args.prompt), learned.expand(args.negative)
    if args.hiper is not None:  # HiPer: the prompt's rows 0..76-K, then α x the learned tail
        from inversion.hiper import HiPerError, hiper_condition, load_tail
        tail, _ = load_tail(args.hiper, model.config.text.hidden_size, base=base)
        try:
            text.cond = hiper_condition(model, text.prompt, tail, args.alpha, text.new_embeddings)
        except HiPerError as e:
            raise CLIError(str(e)) from None
    if args.neti is not None:  # NeTI: the mapper's text for every timestep and cross-attention layer
        from inversion.neti import neti_conditioning
        text.cond, text.value_cond, text.uncond, text.value_uncond, word = neti_conditioning(
            model, args.neti, text.prompt, text.negative, args.truncation, text.new_embeddings, base=base)
        text.learned_words += [word] if word else []
    return text


def warn_about_prompts(args, model, text: Text) -> None:
    """Settings that run but are likely mistakes: one warning line each."""
    from inversion.data import words_cut_off
    limit = model.tokenizer.context_length
    for flag, prompt in (("--prompt", text.prompt), ("--negative", text.negative)):
        n = len(model.tokenizer.encode(prompt))
        if n > limit:
            print(f"warning: {flag} is {n} tokens; the text encoder reads the first {limit} "
                  "(with the start and end tokens), the rest is ignored", file=sys.stderr)
    if args.negative and args.scale == 1:
        print("warning: --negative has no effect at --scale 1, which turns guidance off", file=sys.stderr)
    if args.scale == 0:
        print("warning: --scale 0 draws without the prompt (the unconditional model); guidance is usually 3 to 12",
              file=sys.stderr)
    for word in words_cut_off(model.tokenizer, text.prompt, text.learned_words):
        print(f"warning: the learned word {word!r} comes after the text encoder's {limit} "
              "tokens and is cut off: it does nothing; shorten the prompt", file=sys.stderr)
    for word in text.learned_words:
        if word not in args.prompt and word not in args.negative:
            print(f"warning: the prompt does not use the learned word {word!r}", file=sys.stderr)
    for flag, prompt in (("--prompt", args.prompt), ("--negative", args.negative)):
        for word in unlearned_words(prompt, [*text.learned_words, *model.tokenizer.added_tokens]):  # and the model's
            print(f"warning: {word!r} in {flag} looks like a learned word, but no --embedding or --neti file "
                  "defines it; it is read as ordinary text", file=sys.stderr)


def image_settings(args, height: int, width: int, device, dtype) -> dict:
    """The settings written into each PNG (with its own seed) and into the grid."""
    extra = {"embeddings": ", ".join(p.name for p in args.embedding)} if args.embedding else {}
    if args.ema:
        extra.update(ema="true")
    if args.half_weights:
        extra.update(half_weights="true")
    if args.hiper is not None:
        extra.update(hiper=args.hiper.name, alpha=args.alpha)
    if args.neti is not None:
        extra.update(neti=args.neti.name, **({"truncation": args.truncation} if args.truncation else {}))
    return dict(prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, steps=args.steps,
                scale=args.scale, sampler=args.sampler, eta=args.eta, height=height, width=width,
                model=(args.ckpt or DEFAULT_CKPT).resolve().name,  # its name, not its path: images get shared
                device=device.type, precision=next(name for name, d in DTYPES.items() if d == dtype), **extra)


def draw(args, model, text: Text, settings: dict) -> Tuple[List[Path], Path]:
    """Sample --n images in batches of --batch-size, writing each as it is drawn, then their
    grid: (image paths, grid path)."""
    from ldm.cli import counting, progress_bar
    from ldm.generate import SamplingError, generate, make_grid, save_image, to_pil
    args.out.mkdir(parents=True, exist_ok=True)
    images, paths = [], []
    seeds = [args.seed + i for i in range(args.n)]
    first = next_number(args.out)
    batches = range(0, args.n, args.batch_size)
    bar = progress_bar(len(batches) * args.steps, "sampling")  # a step: one denoising step of one batch
    for start in batches:
        batch_seeds = seeds[start:start + args.batch_size]
        try:
            batch = generate(model, [text.prompt] * len(batch_seeds), batch_seeds, negative_prompt=text.negative,
                             steps=args.steps, scale=args.scale, sampler=args.sampler, eta=args.eta,
                             height=settings["height"], width=settings["width"], new_embeddings=text.new_embeddings,
                             cond=text.cond, uncond=text.uncond, value_cond=text.value_cond,
                             value_uncond=text.value_uncond, progress=counting(bar))
        except SamplingError as e:
            bar.close()
            done = f"the {len(paths)} images before seed {batch_seeds[0]} were written" if paths else "nothing written"
            raise CLIError(f"{e}; {done}") from None
        for i, (seed, image) in enumerate(zip(batch_seeds, to_pil(batch)), start=first + start):
            path = args.out / f"{i:05d}-{seed}.png"
            save_image(image, path, png_info({**settings, "seed": seed}))
            images.append(image)
            paths.append(path)
    bar.close()
    grid_path = args.out / f"grid-{first:05d}.png"  # the grid of the images from number `first` on
    save_image(make_grid(images), grid_path, png_info(settings))
    return paths, grid_path


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args, argv)
    check_writable(args.out)
    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)
    check_half_weights(args.half_weights, args.precision, dtype)
    model = load_model(args.ckpt, device, dtype, ema=args.ema, half_weights=args.half_weights)
    if args.steps > model.schedule.num_timesteps:
        raise CLIError(f"--steps {args.steps}: at most {model.schedule.num_timesteps}, the model's training timesteps")
    text = text_conditioning(args, model)
    height, width = args.height or model.config.image_size, args.width or model.config.image_size
    from ldm.generate import latent_shape
    try:
        latent_shape(model, height, width)
    except ValueError as e:
        raise CLIError(str(e)) from None

    # everything is checked: what follows only warns, then draws
    warn_about_prompts(args, model, text)
    paths, grid_path = draw(args, model, text, image_settings(args, height, width, device, dtype))
    names = paths[0].name + (f" to {paths[-1].name}" if len(paths) > 1 else "")
    print(f"wrote {counted(len(paths), 'image')} ({names}) and {grid_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="sample.py", memory_advice="try a smaller --batch-size, --height or --width"))
