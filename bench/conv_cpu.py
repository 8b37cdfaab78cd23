"""CPU convolutions of SD's U-Net: PyTorch's own (oneDNN) against one matrix product (ldm.conv).

    python bench/conv_cpu.py                      # 256 px, about 4 minutes on 2 cores
    python bench/conv_cpu.py --resolution 512 --batch 2

Runs the SD v1.5 U-Net (random weights) once to record the input shape of every convolution,
then times each distinct (layer, shape) both ways: forward and backward to the input, as a
Textual Inversion step runs it (the weights are frozen). Prints the layers ldm.conv computes as
a matrix product and the others with their ratio, then the whole U-Net's training step (forward
and backward to the text) with ldm.conv's choice against every layer on PyTorch's convolution.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def main(argv=None):
    from ldm.cli import Parser, positive_int
    p = Parser(prog="python bench/conv_cpu.py", description=__doc__.split("\n\n")[0],
               epilog="examples:\n" + __doc__.split("\n\n")[1])
    p.add_argument("--resolution", type=positive_int, default=256, help="image size in pixels (latent: /8)")
    p.add_argument("--batch", type=positive_int, default=1, help="latents per U-Net call")
    p.add_argument("--repeats", type=positive_int, default=5, help="timings per layer and way; the best is kept")
    args = p.parse_args(argv)
    if args.resolution % 64:
        p.error(f"--resolution must be a multiple of 64 (the U-Net halves the 1/8-size latent three times), "
                f"got {args.resolution}")
    import torch
    import torch.nn.functional as F
    from ldm import conv
    from ldm.config import ModelConfig
    from ldm.unet import UNetModel

    torch.manual_seed(0)
    cfg = ModelConfig().unet
    unet = UNetModel(cfg).eval().requires_grad_(False)
    size = args.resolution // 8
    x = torch.randn(args.batch, cfg.in_channels, size, size)
    t = torch.full((args.batch,), 500)
    text = torch.randn(args.batch, 77, cfg.context_dim)

    shapes = {}  # (c_in, c_out, k, stride, input shape) -> [a layer of that kind, how many]

    def record(m, inputs):
        key = (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], tuple(inputs[0].shape))
        shapes.setdefault(key, [m, 0])[1] += 1

    hooks = [m.register_forward_pre_hook(record) for m in unet.modules() if isinstance(m, conv.Conv2d)]
    with torch.no_grad():
        unet(x, t, text)
    for h in hooks:
        h.remove()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD v1.5 U-Net at {args.resolution} px, "
          f"batch {args.batch}; forward + backward to the input, best of {args.repeats}")
    print("| convolution | input | layers | PyTorch ms | matrix product ms | ratio | ldm.conv uses |")
    print("|---|---|---|---|---|---|---|")
    for (c_in, c_out, k, stride, shape), (m, count) in sorted(shapes.items(), key=lambda kv: -kv[0][4][-1]):
        inp = torch.randn(shape, requires_grad=True)
        grad = torch.randn_like(m(inp.detach()))
        ways = {"PyTorch": lambda: torch.autograd.grad(F.conv2d(inp, m.weight, m.bias, m.stride, m.padding), inp, grad),
                "matmul": lambda: torch.autograd.grad(conv.conv2d_as_matmul(inp, m.weight, m.bias, m.stride, m.padding),
                                                      inp, grad)}
        ms = {name: best_ms(fn, args.repeats) for name, fn in ways.items()}
        print(f"| {c_in}→{c_out} {k}×{k}{' /2' if stride == 2 else ''} | {shape[0]}×{shape[2]}×{shape[3]} | {count} | "
              f"{ms['PyTorch']:.1f} | {ms['matmul']:.1f} | {ms['matmul'] / ms['PyTorch']:.2f} | "
              f"{'matrix product' if m.use_matmul(inp) else 'PyTorch'} |", flush=True)

    def step():
        c = text.clone().requires_grad_(True)
        unet(x, t, c).square().mean().backward()

    chosen, never = [], []
    for _ in range(5):  # alternate, so a slow spell of the machine falls on both
        chosen.append(best_ms(step, 1) / 1000)
        with mock.patch.object(conv, "MATMUL_MIN_WEIGHT", float("inf")):
            never.append(best_ms(step, 1) / 1000)
    ratios = [a / b for a, b in zip(chosen, never)]
    print(f"\nU-Net forward + backward to the text (medians of 5, alternately): ldm.conv "
          f"{statistics.median(chosen):.2f} s, PyTorch's convolution everywhere {statistics.median(never):.2f} s, "
          f"ratio {statistics.median(ratios):.2f} (each pair: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    from ldm.cli import run
    sys.exit(run(main, prog="conv_cpu", memory_advice="try a smaller --batch or --resolution"))
