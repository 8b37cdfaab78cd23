r"""Train the tiny Stable Diffusion of the tiny world, on a CPU or a GPU, in two stages.

    python -m tinyworld.train --vae-steps 3000 --steps 4500   # the shipped model's recipe; replaces it (--out keeps it)
    python -m tinyworld.train --resume       # continue an interrupted run from its last checkpoint
    python -m tinyworld.train --device cuda --batch 256 --steps 100000 --minutes 60   # on a GPU, for an hour
    python -m tinyworld.train --init weights/tiny.safetensors --run runs/texture \
        --vae-steps 5000 --steps 1500 --out runs/texture/tiny.safetensors   # continue a model: both stages
    python -m tinyworld.train --init runs/texture/tiny.safetensors --run runs/decoder \
        --vae-steps 0 --decoder-steps 3000 --steps 0 --out runs/decoder/tiny.safetensors  # its decoder alone

Stage 1, the autoencoder: AutoencoderKL (f = 4: 32×32×3 images -> 8×8×4 latents), an L1
reconstruction loss weighted ×5 on the object's pixels (the object is what must survive)
and the usual tiny KL term. Its latents are then computed once and cached, with the
scale factor that gives them unit variance (SD v1's 0.18215 plays the same role).

Stage 1b (optional, `--decoder-steps`): the decoder alone, the encoder frozen, so that the
latents stay what they were and only how they are painted into pixels improves.

Stage 2, the diffusion model: the U-Net and the CLIP text transformer trained jointly from
scratch on the cached latents with the ε-prediction loss of DDPM (as the original LDM
trained its text encoder with its U-Net). Captions are drawn afresh every step (templates,
dropped attributes, 10 % empty for classifier-free guidance). An exponential moving average
of the weights is what gets shipped.

With `--init`, both stages continue from an existing model instead of from scratch. The
autoencoder then also pays an anchor loss, the squared distance of its encoder means to the
starting encoder's, so that the latents the diffusion model learned stay where they were while
the decoder (and the encoder's fine detail) improves; the diffusion model then continues on
the new latents. The README's texture experiment was run this way (the shipped model's 3000
autoencoder steps left stripes and dots too weak to survive the round trip).

Every random draw is made on the CPU (batches, noise, timesteps), so a run draws the same
batches on any device; only the arithmetic moves to `--device`.

The sizes are chosen for a 2-core CPU: the U-Net has three levels (8×8, 4×4, 2×2) so that
its bottleneck can tell left from right, and the text encoder is 64 wide, since its
49,408-row token table is most of the text encoder's size (and 28% of the model's).
"""
from __future__ import annotations

import collections
import copy
import itertools
import json
import math
import multiprocessing
import os
import pickle
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldm.config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from ldm.cli import (MAX_THREADS, CLIError, Parser, check_file_writable, check_writable, checked_number,
                     given_options, learning_rate, nonnegative_int, out_of_memory, path_arg, positive_int,
                     progress_bar, seed_int)
from ldm.files import atomic_write, load_error_reason

ROOT = Path(__file__).resolve().parents[1]


def tiny_model_config() -> ModelConfig:
    return ModelConfig(
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(1, 2, 4), num_heads=4, context_dim=64),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
        text=CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4),
        image_size=32,
    )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def object_weight(x: torch.Tensor, weight: float = 5.0) -> torch.Tensor:
    """Per-pixel loss weight: `weight` where the pixel differs from the border's median color."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (B, 3, 4W)
    background = border.median(dim=2).values[:, :, None, None]
    mask = ((x - background).abs().amax(dim=1, keepdim=True) > 0.15).float()
    return 1 + (weight - 1) * mask


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# What reading a damaged checkpoint, or restoring one that does not fit the run, raises.
DAMAGED = (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError,
           IndexError)
STAGE_CHECKPOINTS = ("vae.pt", "decoder.pt", "diffusion.pt")  # latents.pt, a cache, is computed again if damaged


class ResumeError(Exception):
    """A checkpoint of the run cannot be read, or does not fit the model it is to restore."""


def resume_from(path: Path, restore):
    """restore(state) with the checkpoint at `path`, which exists: the stage's step (and more).
    A file that cannot be read or does not fit is a ResumeError naming it, not a traceback."""
    try:
        return restore(load_checkpoint(path))
    except DAMAGED as e:
        if out_of_memory(e):
            raise
        raise ResumeError(f"--resume: {path} is damaged or from another run ({load_error_reason(e)}); delete "
                          "it to train its stage again, or start another --run") from None


# ----------------------------------------------------------------------------- stage 1: VAE

def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1, weighted ×5 on the object's pixels: the object is what must survive the round trip."""
    return ((recon - x).abs() * object_weight(x)).mean()


def fit_autoencoder(vae, params, loss_of_batch, images: np.ndarray, args, steps: int, lr: float,
                    ckpt: Path, desc: str, device="cpu", minutes: float = 0):
    """Adam on `params` for `steps` steps of `loss_of_batch(x, g) -> (loss, reconstruction loss)` on
    batches of `images`; resumes from and saves to `ckpt`. The loop of stages 1 and 1b."""
    opt = torch.optim.Adam(params, lr=lr)
    step = 0
    if ckpt.exists():
        def restore(state):
            vae.load_state_dict(state["vae"])
            opt.load_state_dict(state["opt"])
            return int(state["step"])
        step = resume_from(ckpt, restore)
    if step >= steps:
        return vae.eval()
    vae.train()
    bar = progress_bar(steps, desc, initial=step)
    start, first = time.time(), step
    try:
        while step < steps and (not minutes or time.time() - start < minutes * 60):
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # on the CPU: same draws on any device
            idx = torch.randint(0, len(images), (args.vae_batch,), generator=g)
            x = to_tensor(images[idx.numpy()]).to(device)
            loss, rec = loss_of_batch(x, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{rec.item():.4f}", refresh=False)
            if step % args.checkpoint_every == 0:  # and after the loop, however it ends
                save_checkpoint({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    finally:  # at the end, and on Ctrl-C or an error: keep what was learned (--resume)
        save_checkpoint({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
        bar.close()
    seconds = time.time() - start
    print(f"{desc}: {step} steps, {seconds / 60:.1f} min ({1000 * seconds / max(1, step - first):.1f} ms/step)")
    return vae.eval()


def train_vae(args, cfg: ModelConfig, images: np.ndarray, run: Path, start=None, device="cpu"):
    """L1 reconstruction (object pixels ×5) + a tiny KL; from `start`, also the anchor loss."""
    from ldm.vae import AutoencoderKL
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(cfg.vae)
    anchor = None
    if start is not None:
        vae.load_state_dict(start.state_dict())
        anchor = copy.deepcopy(vae).requires_grad_(False).eval().to(device)
    vae.to(device).requires_grad_(True)

    def loss_of_batch(x, g):
        posterior = vae.encode(x)
        rec = reconstruction_loss(vae.decode(posterior.sample(g)), x)
        kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1 - posterior.logvar).mean()
        loss = rec + 1e-6 * kl
        if anchor is not None:  # keep the latents where the diffusion model expects them
            with torch.no_grad():
                target = anchor.encode(x).mean  # (B, 4, 8, 8)
            loss = loss + args.anchor * F.mse_loss(posterior.mean, target)
        return loss, rec

    return fit_autoencoder(vae, list(vae.parameters()), loss_of_batch, images, args, args.vae_steps,
                           args.vae_lr, run / "vae.pt", "autoencoder", device, args.vae_minutes)


def train_decoder(args, vae, images: np.ndarray, run: Path, device="cpu"):
    """Stage 1b: the decoder alone, the encoder frozen. The latents (and so the diffusion model
    trained on them) do not move; only how a latent is painted into pixels improves: fine
    detail that the encoder does carry, such as the 2-px dots, which the decoder of stage 1
    had learned to paint as a flat color. (SD's fine-tuned VAE decoders were made the same way.)"""
    vae.to(device).requires_grad_(False)
    decoder = torch.nn.ModuleList([vae.post_quant_conv, vae.decoder]).requires_grad_(True)

    def loss_of_batch(x, g):
        with torch.no_grad():
            z = vae.encode(x).sample(g)  # (B, 4, 8, 8)
        rec = reconstruction_loss(vae.decode(z), x)
        return rec, rec

    vae = fit_autoencoder(vae, list(decoder.parameters()), loss_of_batch, images, args, args.decoder_steps,
                          args.decoder_lr, run / "decoder.pt", "decoder", device)
    return vae.requires_grad_(False)


@torch.no_grad()
def cache_latents(vae, images: np.ndarray, run: Path, batch: int = 500):
    """The encoder means of all training images and the scale that gives them unit variance;
    cached in the run, and computed again when the autoencoder has trained on since."""
    path, vae_ckpt = run / "latents.pt", run / "vae.pt"
    vae_step = resume_from(vae_ckpt, lambda state: int(state["step"])) if vae_ckpt.exists() else 0
    try:  # a cache that cannot be read, or is not one, is computed again
        state = load_checkpoint(path) if path.exists() else {}
        if state.get("vae_step") == vae_step and state["latents"].shape[0] == len(images):
            return state["latents"], float(state["scale_factor"])
    except DAMAGED as e:
        if out_of_memory(e):
            raise
        print(f"warning: {path} cannot be used ({load_error_reason(e)}); computing the latents again",
              file=sys.stderr)
    device = next(vae.parameters()).device
    means = torch.cat([vae.encode(to_tensor(images[i:i + batch]).to(device)).mean.cpu()
                       for i in range(0, len(images), batch)])
    scale_factor = float(1.0 / means.std())
    save_checkpoint({"latents": means, "scale_factor": scale_factor, "vae_step": vae_step}, path)
    return means, scale_factor


# ----------------------------------------------------------------------------- stage 2: U-Net + text

def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():  # e <- e + (1 - decay)(p - e), all tensors at once
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


class CaptionIds:
    """Token ids of captions, remembered: the same captions recur, and the tokenizer (ftfy,
    BPE) costs more than a GPU training step."""

    def __init__(self, tokenizer):
        self.tokenizer, self.known = tokenizer, {}

    def __call__(self, captions: list) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.known]
        if new:
            self.known.update(zip(new, self.tokenizer(new)))
        return torch.stack([self.known[c] for c in captions])


_draws = None  # what draw_batch needs, set once per process by start_drawing


def start_drawing(seed: int, batch: int, attrs: list, tokenizer) -> None:
    """Set up this process (the trainer's, or a worker's) to draw diffusion batches."""
    global _draws
    _draws = (seed, batch, attrs, CaptionIds(tokenizer))


def draw_batch(step: int) -> tuple:
    """Step `step`'s draw: which latents (indices into the training set) and the token ids of
    fresh captions of them, (B,) and (B, 77), as numpy arrays. Seeded by the step alone, so it is
    the same in any process and in any order."""
    from tinyworld.world import caption
    seed, batch, attrs, tokenize = _draws
    rng = np.random.default_rng([seed, 7, step])
    idx = rng.integers(0, len(attrs), batch)
    return idx, tokenize([caption(attrs[i], rng) for i in idx]).numpy()


def _start_worker(*setup) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it stops the workers
    torch.set_num_threads(1)  # one core each: the workers are many
    start_drawing(*setup)


def draw_batches(args, attrs: list, tokenizer, first: int):
    """The draws of steps first, first + 1, ... (see draw_batch). With `--workers N` they are made
    in N processes that keep 4 steps each ahead of the trainer: writing and tokenizing 256
    captions takes about 20 ms of a CPU core, time a GPU would otherwise wait for each step."""
    setup = (args.seed, args.batch, attrs, tokenizer)
    if not args.workers:
        start_drawing(*setup)
        yield from map(draw_batch, itertools.count(first))
        return
    context = multiprocessing.get_context("spawn")  # not fork: the trainer may already hold a GPU
    with context.Pool(args.workers, _start_worker, setup) as pool:  # leaving it stops the workers
        steps = itertools.count(first)
        ahead = collections.deque(pool.apply_async(draw_batch, (next(steps),)) for _ in range(4 * args.workers))
        while True:
            yield ahead.popleft().get()
            ahead.append(pool.apply_async(draw_batch, (next(steps),)))


def train_diffusion(args, model, latents: torch.Tensor, attrs: list, run: Path, device="cpu"):
    ckpt = run / "diffusion.pt"
    model.to(device)
    latents = latents.to(device)
    trainable = torch.nn.ModuleDict({"unet": model.unet, "text": model.text_encoder})
    trainable.requires_grad_(True)
    ema = copy.deepcopy(trainable).requires_grad_(False)
    opt = torch.optim.AdamW(trainable.parameters(), lr=args.lr, weight_decay=0.0)
    step, seconds = 0, 0.0
    if ckpt.exists():
        def restore(state):
            trainable.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            return int(state["step"]), float(state["seconds"])
        step, seconds = resume_from(ckpt, restore)
    schedule = model.schedule
    batches = draw_batches(args, attrs, model.tokenizer, first=step)
    log = open(run / "diffusion_log.csv", "a")
    bar = progress_bar(args.steps, "diffusion", initial=step)
    t_last = time.time()
    try:
        while step < args.steps and seconds < args.minutes * 60:
            idx, ids = next(batches)
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + 7 + step)
            ids = torch.from_numpy(ids).to(device)
            x0 = latents[torch.from_numpy(idx).to(device)]
            noise = torch.randn(x0.shape, generator=g).to(device)  # drawn on the CPU: same on any device
            t = torch.randint(0, args.max_timestep or schedule.num_timesteps, (args.batch,), generator=g).to(device)
            eps = model.unet(schedule.add_noise(x0, noise, t), t, model.text_encoder(ids))
            loss = F.mse_loss(eps, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
            # linear warm-up, then cosine decay to 10 % over the steps or the minutes, whichever runs out first
            progress = min(1.0, max(step / args.steps, seconds / (args.minutes * 60)))
            for group in opt.param_groups:
                warm = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
                cos = 0.55 + 0.45 * math.cos(math.pi * progress)
                group["lr"] = args.lr * warm * cos
            opt.step()
            ema_update(ema, trainable, min(args.ema, (1 + step) / (10 + step)))
            step += 1
            now = time.time()
            seconds += now - t_last
            t_last = now
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            log.write(f"{step},{loss.item():.5f},{seconds:.1f}\n")
            if step % args.checkpoint_every == 0:  # and after the loop, however it ends
                log.flush()
                save_checkpoint({"model": trainable.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                 "step": step, "seconds": seconds}, ckpt)
            if args.eval_every and step % args.eval_every == 0:
                quick_eval(model, ema, step)
    finally:  # at the end, and on Ctrl-C or an error: keep what was learned (--resume)
        save_checkpoint({"model": trainable.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "step": step, "seconds": seconds}, ckpt)
        batches.close()  # stops the workers
        log.close()
        bar.close()
    print(f"diffusion: {step} steps, {seconds / 60:.1f} min of training")
    trainable.load_state_dict(ema.state_dict())  # ship the moving average
    return model.requires_grad_(False).eval(), step, seconds


@torch.no_grad()
def quick_eval(model, ema, step, n: int = 48):
    """Sample held-out-combination and texture prompts with the EMA weights; print what the analyzer reads."""
    from tinyworld.evaluate import evaluate_model, texture_word_accuracy
    snapshot = copy.deepcopy(model)
    torch.nn.ModuleDict({"unet": snapshot.unet, "text": snapshot.text_encoder}).load_state_dict(ema.state_dict())
    acc = evaluate_model(snapshot.eval(), n=n, steps=20, seed=1234, quiet=True)
    acc["texture"] = texture_word_accuracy(snapshot, n=n // 2, steps=20, seed=1234)["texture"]
    print(f"\n[step {step}] " + "  ".join(f"{k} {v:.0%}" for k, v in acc.items()), flush=True)


# ----------------------------------------------------------------------------- main

EXAMPLES = __doc__.split("\n\n")[1]
SAME_ON_RESUME = ("images", "seed", "init")  # what the cached latents and the captions depend on


def build_parser():
    p = Parser(prog="python -m tinyworld.train", description=__doc__.split("\n\n")[0],
               epilog="examples:\n" + EXAMPLES)
    p.add_argument("--run", type=path_arg, default=ROOT / "runs" / "tiny", help="folder for checkpoints and logs")
    p.add_argument("--out", type=path_arg, default=ROOT / "weights" / "tiny.safetensors",
                   help="the exported model (EMA weights, fp16): name.safetensors or name.ckpt, or a new folder "
                        "for the diffusers layout")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --run")
    p.add_argument("--init", type=path_arg, default=None,
                   help="continue training this model (both stages) instead of starting from scratch")
    p.add_argument("--anchor", type=float, default=1.0,
                   help="with --init: weight of the loss keeping encoder means at the starting model's (default: 1.0)")
    p.add_argument("--images", type=positive_int, default=60000, help="training images (rendered once)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the rendered images and of every training draw")
    p.add_argument("--vae-steps", type=nonnegative_int, default=2000, help="stage 1: autoencoder steps")
    p.add_argument("--vae-minutes", type=float, default=0, help="stop the autoencoder stage after this "
                                                                     "much time (0 = run all --vae-steps)")
    p.add_argument("--vae-batch", type=positive_int, default=32, help="images per autoencoder step")
    p.add_argument("--vae-lr", type=learning_rate, default=1e-3, help="Adam learning rate of stage 1")
    p.add_argument("--decoder-steps", type=nonnegative_int, default=0,
                   help="stage 1b: fine-tune the decoder alone, the encoder (so the latents) frozen")
    p.add_argument("--decoder-lr", type=learning_rate, default=3e-4, help="Adam learning rate of stage 1b")
    p.add_argument("--steps", type=nonnegative_int, default=12000, help="diffusion steps")
    p.add_argument("--minutes", type=float, default=120.0,
                   help="stop diffusion training after this much time (the learning rate decays over "
                        "the steps or the minutes, whichever runs out first)")
    p.add_argument("--batch", type=positive_int, default=64, help="latents per diffusion step")
    p.add_argument("--lr", type=learning_rate, default=5e-4, help="AdamW peak learning rate of stage 2")
    p.add_argument("--warmup", type=nonnegative_int, default=300,
                   help="diffusion steps of linear learning-rate warm-up (0 = none)")
    p.add_argument("--ema", type=checked_number(float, "a number", lambda v: 0 <= v < 1, "between 0 and 1 (< 1)"),
                   default=0.999, help="decay of the moving average of the weights, which is what gets exported")
    p.add_argument("--max-timestep", type=int, default=0,
                   help="train on t < this only (0 = all 1000): a fine-tune of the low-noise steps, "
                        "where fine detail such as texture is drawn")
    p.add_argument("--checkpoint-every", type=positive_int, default=250,
                   help="steps between checkpoints in --run (one is also saved when a stage ends or stops)")
    p.add_argument("--eval-every", type=nonnegative_int, default=1000, help="quick accuracy check (0 = never)")
    p.add_argument("--threads", type=checked_number(int, "a whole number", lambda v: 0 <= v <= MAX_THREADS,
                                                    f"between 0 (torch's default) and {MAX_THREADS}"),
                   default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--workers", type=nonnegative_int, default=0,
                   help="processes that write and tokenize the diffusion stage's captions ahead of the training "
                        "steps (0 = the trainer, between steps); 256 captions take about 20 ms of a core, about "
                        "a quarter of a tiny-model step on a GPU; the batches are the same with any number")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    return p


def check_args(args, cfg: ModelConfig, given: set) -> str:
    """What is wrong with the settings of the new options, in one line ('' if nothing); `given`:
    the options written on the command line."""
    if not 0 <= args.max_timestep <= cfg.schedule.num_timesteps:
        return (f"--max-timestep must be between 0 (all timesteps) and {cfg.schedule.num_timesteps}, "
                f"got {args.max_timestep}")
    if "anchor" in given and args.init is None:
        return "--anchor weighs a loss toward the --init model's latents; it needs --init"
    if "decoder_lr" in given and not args.decoder_steps:
        return "--decoder-lr is the learning rate of the decoder's own stage; it needs --decoder-steps"
    if not (math.isfinite(args.anchor) and args.anchor >= 0):
        return f"--anchor must be a number >= 0, got {args.anchor}"
    if not (args.minutes > 0 and args.vae_minutes >= 0):
        return f"--minutes must be > 0 and --vae-minutes >= 0, got {args.minutes} and {args.vae_minutes}"
    return ""


def check_out(out: Path, init) -> str:
    """What is wrong with --out, in one line ('' if nothing): checked before hours of training."""
    if out.suffix not in (".safetensors", ".ckpt", ""):
        return f"--out {out}: cannot save as '{out.suffix}'; use name.safetensors, name.ckpt or a folder name"
    if init is not None and init.exists() and out.exists() and out.samefile(init):  # also a link, another case
        return f"--out {out} is the --init model itself; write the continued model to another file"
    if out.suffix == "" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        return f"--out {out}: already exists; the diffusers layout needs a new folder"
    try:
        if out.suffix:
            check_file_writable(out, "--out")
        else:
            check_writable(out)  # the diffusers layout: a folder
    except CLIError as e:
        return str(e)
    if out.is_file() and not os.access(out, os.W_OK):
        return f"--out {out}: is a file this user cannot write to; choose another --out"
    return ""


def check_run(args) -> str:
    """What is wrong with --run and --resume, in one line ('' if nothing)."""
    run = args.run
    if run.exists() and not run.is_dir():
        return f"--run {run}: is a file, not a folder"
    holds_run = run.exists() and any(run.iterdir())
    if holds_run and not args.resume:
        return f"{run} already holds a run; pass --resume to continue it or choose another --run"
    if args.resume and not holds_run:
        return f"--resume: {run} holds no run to continue; leave out --resume to start one"
    if not args.resume:
        return ""
    for name in STAGE_CHECKPOINTS:  # each stage reads its own when it starts; unreadable ones are told now
        if (run / name).exists():
            try:
                resume_from(run / name, lambda state: None)
            except ResumeError as e:
                return str(e)
    saved = run / "config.json"
    if saved.exists():
        try:
            before = json.loads(saved.read_text())
            if not isinstance(before, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            return (f"--resume: {saved} is damaged ({e}); it records the run's options: restore it, or delete it "
                    "to resume without comparing them")
        now = json.loads(json.dumps(vars(args), default=str))
        changed = [k for k in SAME_ON_RESUME if before.get(k) != now.get(k)]
        if changed:
            return ("--resume: this run was started with " + ", ".join(f"--{k} {before.get(k)}" for k in changed)
                    + "; its cached latents and captions need the same (other options may change)")
    return ""


PROG = "tinyworld.train"


def error(problem: str) -> int:
    """One line on stderr, as the other tools print it; the exit status of bad input."""
    print(f"{PROG}: error: {problem}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = args.run
    problem = check_run(args) or check_out(args.out, args.init)
    if problem:
        return error(problem)
    import ldm
    from ldm.cli import pick_device
    from ldm.files import read_metadata
    from ldm.model import StableDiffusion
    from tinyworld.world import IMAGE_SIZE
    start, parent_training = None, {}
    if args.init is not None:
        try:
            start = ldm.load(args.init)
            parent_training = json.loads(read_metadata(args.init).get("training", "{}"))
        except ldm.LoadError as e:
            return error(str(e))
        if start.config.image_size != IMAGE_SIZE:
            return error(f"{args.init} is a {start.config.image_size}-px model; --init takes a tiny-world "
                         f"model ({IMAGE_SIZE} px), such as weights/tiny.safetensors")
    cfg = tiny_model_config() if start is None else start.config
    problem = check_args(args, cfg, given_options(parser, argv))
    try:
        device = pick_device(args.device)
    except CLIError as e:
        problem = str(e)
    if problem:
        return error(problem)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(vars(args), default=str, indent=1))

    from tinyworld.world import make_dataset
    t0 = time.time()
    images, _, attrs = make_dataset(args.images, seed=args.seed, split="train")
    print(f"rendered {len(images)} training images in {time.time() - t0:.0f} s")

    try:  # each stage saves its checkpoint when it ends, however it ends
        vae = train_vae(args, cfg, images, run, start=None if start is None else start.vae, device=device)
        latents, scale_factor = cache_latents(vae, images, run)
        vae = train_decoder(args, vae, images, run, device=device)  # the latents are already cached
        cfg.vae.scale_factor = scale_factor
        print(f"latents {tuple(latents.shape)}, scale factor {scale_factor:.4f}")

        torch.manual_seed(args.seed)
        model = StableDiffusion(cfg) if start is None else start
        model.vae.load_state_dict(vae.state_dict())
        model, steps, seconds = train_diffusion(args, model, latents * scale_factor, attrs, run, device=device)
    except ResumeError as e:
        return error(str(e))
    except KeyboardInterrupt:
        print(f"\ninterrupted: what was learned is saved in {run}; continue with the same arguments and --resume",
              file=sys.stderr)
        return 130

    steps_of = lambda stage: load_checkpoint(run / stage)["step"] if (run / stage).exists() else 0  # as run
    training = {"diffusion_steps": steps, "diffusion_minutes": round(seconds / 60, 1),
                "vae_steps": steps_of("vae.pt"), "images": args.images, "seed": args.seed}
    if args.decoder_steps:
        training["decoder_steps"] = steps_of("decoder.pt")
    if args.max_timestep:
        training["max_timestep"] = args.max_timestep
    if start is not None:
        training = {"init": parent_training, "init_file": args.init.name, "anchor": args.anchor, **training}
    meta = {"training": json.dumps(training)}
    ldm.save(model.cpu(), args.out, dtype=torch.float16, metadata=meta)
    files = [args.out] if args.out.is_file() else [f for f in args.out.rglob("*") if f.is_file()]  # or a folder
    print(f"wrote {args.out} ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    from ldm.cli import run
    sys.exit(run(main, prog=PROG))
