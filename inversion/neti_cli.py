"""`invert.py --method neti`: learn a NeTI mapper for a new word, then sample with sample.py.

    python invert.py --method neti                     # tiny world: a held-out concept, then its scores
    python invert.py --method neti --images my_toy/ --placeholder "<my-toy>" --init-word toy \\
                     --ckpt v1-5-pruned-emaonly.safetensors --out outputs/my-toy-neti
    python sample.py --neti outputs/my-toy-neti/neti_mapper.safetensors --prompt "a photo of <my-toy>" \\
                     --ckpt v1-5-pruned-emaonly.safetensors [--truncation 32]

Writes to --out (default outputs/neti) neti_mapper.safetensors (the mapper's weights, its
configuration, the placeholder, the init word and the base model's hash), checkpoint.pt, loss.csv
and validation grids samples/step-000100.png (every --sample-every steps and at the end).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ldm.cli import CLIError, at_most, counted, flags, shell_command

# SD: NeTI's recipe (training/config.py of the authors' code): lr 1e-3 scaled by the images
# per step, batch 2 with 4 accumulated micro-batches, 1000 steps, a checkpoint every 250.
SD_DEFAULTS = dict(steps=1000, batch=2, grad_accum=4, lr=1e-3, save_every=250)
# The tiny model (config.image_size <= 64): the same 8 images and lr per step as NeTI for SD.
TINY_DEFAULTS = dict(steps=400, batch=8, grad_accum=1, lr=1e-3, save_every=100)
MAX_GRAD_ACCUM = 1024  # micro-batches a step, as invert.py's --batch: far beyond any use, below an overflow
# The options beside its own that --method neti takes (invert.py refuses the others).
SHARED_OPTIONS = ("images", "concept", "num_images", "resolution", "no_flip", "placeholder", "init_word",
                  "property", "steps", "lr", "batch", "seed", "ckpt", "out", "resume", "save_every",
                  "sample_every", "validation_prompt", "no_eval", "device", "precision",
                  "gradient_checkpointing", "half_weights")


def add_arguments(parser) -> set:
    """Add NeTI's argument group; returns the names (dests) of its own options."""
    g = parser.add_argument_group(
        "NeTI (--method neti)",
        "a mapper gives the word's vector for every timestep and cross-attention layer; --init-word is the "
        f"super-category word; also uses {flags(SHARED_OPTIONS)} (SD defaults: 1000 steps, lr 1e-3 x 8 images)")
    own = [g.add_argument("--grad-accum", type=at_most(MAX_GRAD_ACCUM, "the paper's is 4"), default=None,
                          help="micro-batches per step; the lr is scaled by batch x grad-accum (SD: 4, tiny: 1)"),
           g.add_argument("--sigma-t", type=float, default=0.03, help="scale of the time frequencies of the encoding"),
           g.add_argument("--sigma-l", type=float, default=2.0, help="scale of the layer frequencies of the encoding"),
           g.add_argument("--nested-dropout", type=float, default=0.5,
                          help="probability of truncating the mapper's hidden units at a random index in training"),
           g.add_argument("--no-bypass", action="store_true", help="no textual bypass: the mapper gives only the word")]
    return {a.dest for a in own}


def check_arguments(args) -> None:
    """Everything that can be checked before the model is loaded; CLIError otherwise."""
    from inversion.neti import MAPPER_FILE, NeTIConfig, check_config
    from inversion.trainer import TrainingError
    from invert import check_paths
    try:  # the numbers the user chose, before anything is loaded
        check_config(NeTIConfig(sigma_t=args.sigma_t, sigma_l=args.sigma_l, nested_dropout=args.nested_dropout,
                                lr=args.lr or 1e-3))
    except TrainingError as e:
        raise CLIError(str(e)) from None
    check_paths(args, files=(MAPPER_FILE,), folders=("train_images",))


def main(args) -> int:
    from inversion.data import templates
    from inversion.neti import MAPPER_FILE, NeTI, NeTIConfig, check_config, save_mapper
    from inversion.trainer import TrainingError
    from invert import load_model, start_trainer, the_word, train

    check_arguments(args)
    t_start = time.time()
    ckpt, model, device = load_model(args)
    tiny = model.config.image_size <= 64
    defaults = TINY_DEFAULTS if tiny else SD_DEFAULTS

    tiny_concept = args.images is None
    placeholder, init_word, prop = the_word(args, tiny)

    cfg = NeTIConfig(placeholder=placeholder, init_word=init_word, learnable_property=prop,
                     steps=args.steps or defaults["steps"], lr=args.lr or defaults["lr"],
                     batch=args.batch or defaults["batch"], grad_accum=args.grad_accum or defaults["grad_accum"],
                     flip=not args.no_flip, seed=args.seed, save_every=args.save_every or defaults["save_every"],
                     sample_every=args.sample_every, sigma_t=args.sigma_t, sigma_l=args.sigma_l,
                     nested_dropout=args.nested_dropout, bypass=not args.no_bypass)
    try:
        check_config(cfg)
    except TrainingError as e:
        raise CLIError(str(e)) from None
    trainer, images, grid_prompts, resumed = start_trainer(NeTI, args, model, ckpt, cfg, prop)
    mc = trainer.mapper.config
    print(f"{'resuming at step ' + str(trainer.step) if resumed else 'training'} a NeTI mapper for {placeholder!r} "
          f"({mc.num_layers} cross-attention layers, {sum(p.numel() for p in trainer.mapper.parameters()):,} "
          f"parameters) from {len(images)} images on {device}; effective lr = {cfg.lr:g} x batch {cfg.batch} "
          f"x {cfg.grad_accum} = {cfg.effective_lr:g}")

    base = trainer.base_model.metadata()
    mapper_path = args.out / MAPPER_FILE

    def save(t: NeTI) -> None:
        save_mapper(mapper_path, t.mapper, {**base, "placeholder": placeholder, "init_word": init_word,
                                            "learnable_property": prop, "step": str(t.step)})

    def sample_grid(t: NeTI) -> None:
        write_validation_grid(model, t, grid_prompts, args.out / "samples" / f"step-{t.step:06d}.png", tiny,
                              size=images.shape[-1])

    if not train(trainer, mapper_path, on_save=save, on_sample=sample_grid):
        return 130
    print(f"trained {counted(trainer.step, 'step')} in {time.time() - t_start:.0f} s; wrote {mapper_path}, "
          "loss.csv and samples/")
    example = templates(prop)[0].format(placeholder)
    print("sample with: " + shell_command("python", "sample.py", "--neti", mapper_path, "--prompt", example,
                                          *([] if args.ckpt is None else ["--ckpt", args.ckpt])))
    if tiny_concept and not args.no_eval:
        from tinyworld.concepts import scores_line
        t = time.time()
        scores = tiny_scores(model, trainer.mapper, args.concept, placeholder)
        print(scores_line(placeholder, args.concept, scores, time.time() - t))
    return 0


def write_validation_grid(model, trainer, prompts, path: Path, tiny: bool, size: int) -> None:
    """The validation prompts, each drawn with the mapper's vector for every step and layer."""
    from invert import grid_options
    from ldm.generate import save_prompt_row
    neti = trainer.conditioning(prompts)
    save_prompt_row(model, prompts, path, cond=neti.keys, value_cond=neti.value_cond,
                    **grid_options(trainer, tiny, size))


@torch.no_grad()
def tiny_scores(model, mapper, concept: str, placeholder: str, n: int = 64, steps: int = 50, scale: float = 7.5,
                truncation=None, seed: int = 0) -> dict:
    """`tinyworld.concepts.evaluate_word` for a NeTI word: reconstruction and editability."""
    from inversion.neti import SpaceTimeConditioning
    from ldm.generate import generate
    from tinyworld.concepts import edit_attributes, edit_prompt, reconstruction_prompts, score
    from tinyworld.evaluate import to_uint8
    seeds = [seed + i for i in range(n)]

    def draw(prompts):
        neti = SpaceTimeConditioning(model, mapper, placeholder, prompts, truncation)
        return to_uint8(generate(model, prompts, seeds, steps=steps, scale=scale,
                                 cond=neti.keys, value_cond=neti.value_cond))

    reconstruction = score(draw(reconstruction_prompts(concept, placeholder, n)), concept)["concept"]
    attrs = edit_attributes(concept, n, seed)
    edit = score(draw([edit_prompt(a, concept, placeholder) for a in attrs]), concept, attrs)
    return {"reconstruction": reconstruction, "editability": edit["edit"], "edit_and_concept": edit["edit_and_concept"]}
