"""bench/ti_step.py runs both sides at both precisions and prints one table row each, with each
run's time ratio, and the U-Net's share of each step (the numbers themselves are measurements,
not asserted)."""
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("precision, repeats, checkpointing, half", [
    ("fp32", 2, False, False), ("bf16", 1, False, False), ("fp32", 1, True, False), ("fp32", 1, False, True)])
def test_tiny_bench_row(precision, repeats, checkpointing, half):
    pytest.importorskip("diffusers")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "ti_step.py"), "--only", "tiny", "--steps", "1",
                          "--precision", precision, "--repeats", str(repeats)]
                         + ["--gradient-checkpointing"] * checkpointing + ["--half-weights"] * half,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"frozen weights in {precision}" in out.stdout
    assert ("gradient checkpointing on both sides" in out.stdout) == checkpointing
    assert ("ours stored in fp16 (--half-weights)" in out.stdout) == half
    row, unet = [l for l in out.stdout.splitlines() if l.startswith("| tiny |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 11
    seconds_ours, seconds_ref, ratio = (float(c) for c in cells[1:4])
    each_run = [float(x) for x in cells[10].split(",")]
    assert seconds_ours > 0 and seconds_ref > 0 and len(each_run) == repeats
    assert ratio == pytest.approx(sum(each_run) / repeats, abs=0.011)  # the median of 1 or 2 runs
    if repeats == 1:
        assert ratio == pytest.approx(seconds_ours / seconds_ref, rel=0.05, abs=0.01)
    # the U-Net alone: its seconds on both sides, their ratio, and its share of each side's step
    alone_ours, alone_ref, unet_ratio, share_ours, share_ref = (float(c) for c in unet.strip("|").split("|")[1:])
    assert alone_ours > 0 and alone_ref > 0
    # ratios of seconds printed to 3 decimals: a few percent off the printed ratio, which used the exact ones
    assert unet_ratio == pytest.approx(alone_ours / alone_ref, rel=0.05, abs=0.03)
    if repeats == 1:
        assert share_ours == pytest.approx(alone_ours / seconds_ours, rel=0.05, abs=0.03)
        assert share_ref == pytest.approx(alone_ref / seconds_ref, rel=0.05, abs=0.03)


def test_conv_bench_lists_every_convolution_of_sd_and_the_way_ldm_conv_takes(tmp_path):
    """bench/conv_cpu.py at 64 px (the SD v1.5 U-Net on an 8×8 latent): a row per kind of
    convolution, the matrix product marked exactly where ldm.conv's rule says, and the whole step."""
    import re
    from ldm import conv
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "conv_cpu.py"), "--resolution", "64", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [l for l in out.stdout.splitlines() if re.match(r"\| \d+→\d+ ", l)]
    layers = 0
    for row in rows:
        kind, shape, count, *_, way = [c.strip() for c in row.strip("|").split("|")]
        c_in, c_out, k = map(int, re.match(r"(\d+)→(\d+) (\d)×", kind).groups())
        stride = 2 if kind.endswith("/2") else 1
        _, h, w = map(int, shape.split("×"))
        positions = ((h + 2 * (k // 2) - k) // stride + 1) * ((w + 2 * (k // 2) - k) // stride + 1)  # per image
        takes = c_in * c_out * k * k >= conv.MATMUL_MIN_WEIGHT and positions <= conv.MATMUL_MAX_POSITIONS
        assert way == ("matrix product" if takes else "PyTorch"), row
        layers += int(count)
    from ldm.config import ModelConfig
    from ldm.unet import UNetModel
    import torch
    with torch.device("meta"):  # the architecture without its 3.4 GB of weights
        unet = UNetModel(ModelConfig().unet)
    assert layers == sum(isinstance(m, conv.Conv2d) for m in unet.modules())  # each convolution, once
    assert any("matrix product" in r for r in rows) and any(r.endswith("PyTorch |") for r in rows)
    found = re.search(r"ldm.conv ([\d.]+) s, .* ([\d.]+) s, ratio ([\d.]+) \(each pair: ([\d., ]+)\)", out.stdout)
    ratio, pairs = float(found.group(3)), sorted(float(r) for r in found.group(4).split(", "))
    assert len(pairs) == 5 and ratio == pairs[2]  # the median pair


def test_conv_bench_refuses_a_resolution_the_unet_cannot_take():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "conv_cpu.py"), "--resolution", "100"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and ("--resolution must be a multiple of 64 (the U-Net halves "
                                            "the 1/8-size latent three times), got 100") in out.stderr


def test_memory_is_read_from_proc_on_linux_and_from_psutil_elsewhere(monkeypatch):
    """macOS and Windows have no /proc: the resident memory comes from psutil there, and
    without psutil the bench says so in one line before running anything."""
    import types
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import ti_step
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from ldm.cli import CLIError
    if sys.platform.startswith("linux"):
        assert 10 < ti_step.current_rss_mb() < 100_000
    monkeypatch.setattr(ti_step, "PROC_STATM", "/nonexistent/statm")
    fake = types.SimpleNamespace(Process=lambda: types.SimpleNamespace(
        memory_info=lambda: types.SimpleNamespace(rss=300 * 2 ** 20)))
    monkeypatch.setitem(sys.modules, "psutil", fake)
    assert ti_step.current_rss_mb() == 300
    monkeypatch.setattr(ti_step.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CLIError, match=r"needs psutil \(pip install psutil\)"):
        ti_step.main(["--only", "tiny", "--steps", "1"])
    ti_step.check_memory_meter("cuda")  # on a GPU the memory is CUDA's own count


def test_half_weights_with_bf16_is_one_line():
    """--half-weights keeps fp16 weights for fp32 arithmetic: with --precision bf16, refused as
    invert.py refuses it, before anything runs."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "ti_step.py"), "--half-weights", "--precision", "bf16"],
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "add --precision fp32" in lines[0], out.stderr
    assert out.stdout == ""
