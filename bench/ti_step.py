"""Textual Inversion training step: this repository's loop against diffusers' example loop.

    python bench/ti_step.py                 # SD v1.5 at 256 px, then the tiny model: 6 timed steps each (5 min)
    python bench/ti_step.py --only tiny --steps 20
    python bench/ti_step.py --repeats 3     # each side run 3 times, alternately: medians, and each run's ratio

The reference is the loop of diffusers' `examples/textual_inversion/textual_inversion.py`,
rebuilt here from diffusers and transformers components: the VAE encodes the batch every
step, the whole token-embedding matrix is trained by AdamW and every row but the new one is
restored after each step. Ours encodes each image (and its mirror image) once and trains only
the new vector. Both run the same architecture with the same random weights, the same batch,
fp32, on the CPU (or on a CUDA GPU with --device cuda); each side runs in its own process so its
peak memory is its own.

Configurations: the SD v1.5 architecture at 256 px (batch 1), and the tiny model (batch 8); on
CUDA also SD v1.5 at 512 px with batch 4, the recipe's own size.
With --precision bf16 both sides keep their frozen weights in bfloat16, as the example does with
--mixed_precision bf16 (it casts the U-Net and the VAE, keeps the text encoder in fp32 and runs
it under autocast); ours casts the text encoder too, since its learned vector lives apart in fp32.
With --half-weights our side keeps its linear, convolution and embedding weights in fp16 and
computes in fp32 (invert.py --half-weights: the same random weights, rounded to fp16), while the
reference keeps its weights in fp32.
Prints the median seconds per step, the peak resident memory while training (sampled from our
encoding of the images, done once, through the steps, and during the reference's steps: the
reference's setup, which builds it from our weights, is not counted), that peak less the model
weights and the interpreter's own memory (what the training itself costs), and our/reference
ratios. On CUDA the memory columns are the peak GPU memory allocated over the same span
(torch.cuda.max_memory_allocated), and that peak less the weights.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "sd15-256": dict(resolution=256, batch=1, n_images=4),
    "tiny": dict(resolution=32, batch=8, n_images=5),
    "sd15-512": dict(resolution=512, batch=4, n_images=4),  # SD's own recipe; by default on CUDA only
}
CPU_CONFIGS = ("sd15-256", "tiny")


def model_config(name):
    from ldm.config import ModelConfig
    if name == "tiny":
        from tinyworld.train import tiny_model_config
        return tiny_model_config()
    return ModelConfig()


def build_model(name):
    """Our model with deterministic random weights (random init, seeded)."""
    import torch
    from ldm.model import StableDiffusion
    torch.manual_seed(0)
    return StableDiffusion(model_config(name)).eval()


def dtype_of(precision):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


PROC_STATM = "/proc/self/statm"  # Linux: the process's pages, the second number resident


def current_rss_mb() -> float:
    """This process's resident memory now, in MB: from /proc on Linux, from psutil elsewhere
    (macOS, Windows), where `main` has checked that psutil is installed."""
    if os.path.exists(PROC_STATM):
        with open(PROC_STATM) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    import psutil
    return psutil.Process().memory_info().rss / 2 ** 20


def check_memory_meter(device) -> None:
    """On the CPU the peak comes from sampling the resident memory: say at once if this system can't."""
    if device == "cpu" and not os.path.exists(PROC_STATM) and importlib.util.find_spec("psutil") is None:
        from ldm.cli import CLIError
        raise CLIError("measuring memory here needs psutil (pip install psutil); on Linux /proc is read instead")


class CUDAPeak:
    """Peak GPU memory allocated while training, in MB (the setup of the models is not counted)."""

    def __enter__(self):
        import torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        import torch
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() / 2 ** 20


def memory_meter(device):
    return CUDAPeak() if device == "cuda" else RSSSampler()


def clock(device):
    """Seconds now, after the GPU's queued work is done."""
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
    return time.perf_counter()


def unet_alone(call, shapes, precision, device, steps):
    """Median seconds of the U-Net's forward and backward (to its text input) alone, at the step's
    shapes: the part of a step that both sides must do. shapes = (batch, latent (C, h, w), text (77, D))."""
    import torch
    batch, latent, text = shapes
    g = torch.Generator().manual_seed(0)
    dtype = dtype_of(precision)
    z = torch.randn(batch, *latent, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    context = torch.randn(batch, *text, generator=g).to(device, dtype).requires_grad_(True)
    times = []
    for _ in range(steps + 1):
        t0 = clock(device)
        call(z, t, context).float().pow(2).mean().backward()
        times.append(clock(device) - t0)
    return statistics.median(times[1:])


def step_shapes(name, model):
    from ldm.generate import latent_shape
    c = CONFIGS[name]
    return c["batch"], latent_shape(model, c["resolution"], c["resolution"]), (77, model.config.text.hidden_size)


class RSSSampler:
    """Highest resident memory seen while training (sampled every 5 ms): the setup of the models,
    which differs between the two sides (the reference is built from our weights), is not counted."""

    def __init__(self):
        import threading
        self.peak, self.running = 0.0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self):
        while self.running:
            self.peak = max(self.peak, current_rss_mb())
            time.sleep(0.005)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def run_ours(name, steps, precision, device, checkpointing=False, half_weights=False):
    import torch
    from inversion.textual_inversion import TIConfig, TextualInversion
    c = CONFIGS[name]
    model = build_model(name).to(device, dtype_of(precision)).requires_grad_(False)
    if half_weights:  # invert.py --half-weights: the same weights rounded to fp16, fp32 arithmetic
        from ldm.half_weights import keep_weights_in_fp16
        keep_weights_in_fp16(model)
    model.unet.gradient_checkpointing = checkpointing  # invert.py --gradient-checkpointing
    images = torch.rand(c["n_images"], 3, c["resolution"], c["resolution"]) * 2 - 1
    cfg = TIConfig(placeholder="<x>", init_word="object", batch=c["batch"], steps=10 ** 6)
    out = tempfile.TemporaryDirectory(prefix="bench_ti_")  # the trainer's folder: nothing is saved in it here
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 20
    times = []
    with memory_meter(device) as memory:
        # Building the trainer encodes the images once: the part of the reference's per-step
        # work that ours does before its steps, so its memory is counted with the steps'.
        trainer = TextualInversion(model, images, cfg, Path(out.name), ["a photo of a {}"], log=lambda s: None)
        for i in range(steps + 1):
            t = clock(device)
            trainer.train_step()
            times.append(clock(device) - t)
    unet = unet_alone(model.unet, step_shapes(name, model), precision, device, steps)
    out.cleanup()
    return times[1:], memory.peak, weights, unet


def run_reference(name, steps, precision, device, checkpointing=False):
    """diffusers' textual-inversion example loop, on the same weights."""
    import torch
    import torch.nn.functional as F
    import diffusers
    import transformers
    from ldm import convert
    c = CONFIGS[name]
    ours = build_model(name)
    cfg = ours.config
    unet_json, vae_json, text_json = convert.write_diffusers_configs(cfg)
    sd = ours.state_dict()
    take = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    unet = diffusers.UNet2DConditionModel.from_config(unet_json)
    unet.load_state_dict(convert.unet_compvis_to_diffusers(take(convert.PREFIX_UNET), cfg.unet))
    vae = diffusers.AutoencoderKL.from_config(vae_json)
    vae.load_state_dict(convert.vae_compvis_to_diffusers(take(convert.PREFIX_VAE), cfg.vae))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_json))
    text_sd = convert.text_compvis_to_diffusers(take(convert.PREFIX_TEXT))
    if not hasattr(text, "text_model"):
        text_sd = {k[len("text_model."):]: v for k, v in text_sd.items()}
    text.load_state_dict({k: v for k, v in text_sd.items() if not k.endswith("position_ids")}, strict=False)
    tokenizer = ours.tokenizer
    shapes = step_shapes(name, ours)
    del ours, text_sd
    sd = None  # (drop the last reference to our weights; `take` is not called again)
    import gc
    gc.collect()
    placeholder_id = tokenizer.add_token("<x>")
    text.resize_token_embeddings(placeholder_id + 1)
    embeddings = text.get_input_embeddings()
    with torch.no_grad():
        embeddings.weight[placeholder_id] = embeddings.weight[tokenizer.word_id("object")]
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text.requires_grad_(False)
    embeddings.weight.requires_grad_(True)
    text.train()
    unet.eval(), vae.eval()  # as from_pretrained gives them to the example
    if checkpointing:  # the example's --gradient_checkpointing
        unet.train()
        text.gradient_checkpointing_enable()
        unet.enable_gradient_checkpointing()
    text.to(device)
    optimizer = torch.optim.AdamW([embeddings.weight], lr=5e-3)
    original = embeddings.weight.detach().clone().to(device)
    weight_dtype = dtype_of(precision)  # the example's weight_dtype: U-Net and VAE only
    unet.to(device, weight_dtype)
    vae.to(device, weight_dtype)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision != "fp32")
    weights = sum(t.numel() * t.element_size() for m in (unet, vae, text) for t in m.state_dict().values()) / 2 ** 20
    scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        num_train_timesteps=1000)
    images = (torch.rand(c["n_images"], 3, c["resolution"], c["resolution"]) * 2 - 1).to(device)
    ids = tokenizer(["a photo of a <x>"] * c["batch"]).to(device)
    times = []
    sampler = memory_meter(device).__enter__()
    for i in range(steps + 1):
        t0 = clock(device)
        batch = images[torch.randint(0, len(images), (c["batch"],))]
        latents = vae.encode(batch.to(weight_dtype)).latent_dist.sample() * cfg.vae.scale_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (c["batch"],)).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        with autocast:
            states = text(ids)[0].to(weight_dtype)
        pred = unet(noisy, t, states).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            keep = torch.ones(len(original), dtype=torch.bool, device=device)
            keep[placeholder_id] = False
            embeddings.weight[keep] = original[keep]
        times.append(clock(device) - t0)
    sampler.__exit__()
    return times[1:], sampler.peak, weights, unet_alone(lambda *a: unet(*a).sample, shapes, precision, device, steps)


def child(side, name, steps, precision, device, checkpointing, half_weights):
    import torch
    # Each side imports what it runs on (ours never imports diffusers or transformers, about
    # 100 MB of the reference's resident memory); "above the weights" subtracts this baseline.
    if side == "ours":
        import inversion.textual_inversion  # noqa: F401
    else:
        import diffusers, transformers
        import ldm.convert  # noqa: F401
        # These load their classes on first use (about 100 MB): load them now, into the baseline.
        for module, names in ((diffusers, ("UNet2DConditionModel", "AutoencoderKL", "DDPMScheduler")),
                              (transformers, ("CLIPTextModel", "CLIPTextConfig")), (torch.optim, ("AdamW",))):
            for class_name in names:
                getattr(module, class_name)
    torch.manual_seed(0)
    baseline = current_rss_mb() if device == "cpu" else 0.0  # the interpreter and the libraries
    if side == "ours":
        times, peak, weights, unet = run_ours(name, steps, precision, device, checkpointing, half_weights)
    else:
        times, peak, weights, unet = run_reference(name, steps, precision, device, checkpointing)
    print(json.dumps({"seconds_per_step": statistics.median(times), "peak_rss_mb": peak,
                      "above_weights_mb": peak - baseline - weights, "unet_seconds": unet}))


def measure(side, name, steps, precision, device, checkpointing, half_weights):
    out = subprocess.run([sys.executable, __file__, "--child", side, "--only", name, "--steps", str(steps),
                          "--precision", precision, "--device", device]
                         + ["--gradient-checkpointing"] * checkpointing + ["--half-weights"] * half_weights,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{side} {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    from ldm.cli import CLIError, Parser, check_half_weights, positive_int
    p = Parser(prog="python bench/ti_step.py", description=__doc__.split("\n\n")[0],
               epilog="examples:\n" + __doc__.split("\n\n")[1])
    p.add_argument("--only", choices=list(CONFIGS), default=None,
                   help=f"one configuration (default: {' and '.join(CPU_CONFIGS)} on the CPU, all on CUDA)")
    p.add_argument("--steps", type=positive_int, default=6,
                   help="timed steps after one warm-up step; the median is printed (fewer: noisier ratios)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="run each side this many times, alternately, so that a slow spell of the machine falls on "
                        "both; prints the medians and each run's time ratio")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the frozen weights on both sides (bf16: the example's --mixed_precision bf16)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides run")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="both sides recompute the U-Net's activations in the backward pass instead of keeping them "
                        "(invert.py --gradient-checkpointing; the example's --gradient_checkpointing, which also "
                        "checkpoints its text encoder)")
    p.add_argument("--half-weights", action="store_true",
                   help="our side keeps its frozen weights in fp16 and computes in fp32 (invert.py --half-weights: "
                        "the same random weights, rounded to fp16); the reference keeps them in fp32")
    p.add_argument("--child", choices=("ours", "reference"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.only, args.steps, args.precision, args.device, args.gradient_checkpointing,
              args.half_weights)
        return
    check_half_weights(args.half_weights, args.precision, dtype_of(args.precision))  # as invert.py does
    import torch
    check_memory_meter(args.device)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise CLIError("--device cuda was asked for but no CUDA GPU is available")
        where, memory = torch.cuda.get_device_name(), "peak GPU memory"
    else:
        where, memory = f"{torch.get_num_threads()} threads, CPU", "peak RSS"
    print(f"torch {torch.__version__}, {where}, frozen weights in {args.precision}"
          + (", gradient checkpointing on both sides" if args.gradient_checkpointing else "")
          + (", ours stored in fp16 (--half-weights)" if args.half_weights else ""))
    print(f"| configuration | ours s/step | reference s/step | time ratio | ours {memory} | reference {memory} "
          "| RAM ratio | ours above the weights | reference above the weights | ratio | time ratio of each run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    names = [args.only] if args.only else list(CONFIGS) if args.device == "cuda" else list(CPU_CONFIGS)
    medians = {}
    for name in names:
        runs = [[measure(side, name, args.steps, args.precision, args.device, args.gradient_checkpointing,
                         args.half_weights)
                 for side in ("ours", "reference")]
                for _ in range(args.repeats)]
        ratios = [o["seconds_per_step"] / r["seconds_per_step"] for o, r in runs]
        o, r = ({key: statistics.median(run[side][key] for run in runs) for key in runs[0][side]} for side in (0, 1))
        medians[name] = o, r
        print(f"| {name} | {o['seconds_per_step']:.3f} | {r['seconds_per_step']:.3f} | "
              f"{statistics.median(ratios):.2f} | {o['peak_rss_mb']:.0f} MB | "
              f"{r['peak_rss_mb']:.0f} MB | {o['peak_rss_mb'] / r['peak_rss_mb']:.2f} | "
              f"{o['above_weights_mb']:.0f} MB | {r['above_weights_mb']:.0f} MB | "
              f"{o['above_weights_mb'] / r['above_weights_mb']:.2f} | {', '.join(f'{x:.2f}' for x in ratios)} |",
              flush=True)
    # What bounds the time ratio: the U-Net's forward and backward, which both sides must do.
    # With a U-Net as fast as the reference's, ours could not go under the reference's share.
    print("\nThe U-Net's forward and backward alone, at the same shapes (medians):\n")
    print("| configuration | ours s | reference s | U-Net ratio | share of our step | share of the reference's step |")
    print("|---|---|---|---|---|---|")
    for name, (o, r) in medians.items():
        print(f"| {name} | {o['unet_seconds']:.3f} | {r['unet_seconds']:.3f} | "
              f"{o['unet_seconds'] / r['unet_seconds']:.2f} | {o['unet_seconds'] / o['seconds_per_step']:.2f} | "
              f"{r['unet_seconds'] / r['seconds_per_step']:.2f} |")


if __name__ == "__main__":
    from ldm.cli import run
    sys.exit(run(main, prog="ti_step", memory_advice="try --only tiny, --gradient-checkpointing or --half-weights"))
