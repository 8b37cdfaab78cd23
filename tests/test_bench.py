"""bench/ti_step.py runs both sides at both precisions and prints one table row each, with each
run's time ratio (the numbers themselves are measurements, not asserted)."""
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("precision, repeats", [("fp32", 2), ("bf16", 1)])
def test_tiny_bench_row(precision, repeats):
    pytest.importorskip("diffusers")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "ti_step.py"), "--only", "tiny", "--steps", "1",
                          "--precision", precision, "--repeats", str(repeats)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"frozen weights in {precision}" in out.stdout
    row = [l for l in out.stdout.splitlines() if l.startswith("| tiny |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert len(cells) == 11
    seconds_ours, seconds_ref, ratio = (float(c) for c in cells[1:4])
    each_run = [float(x) for x in cells[10].split(",")]
    assert seconds_ours > 0 and seconds_ref > 0 and len(each_run) == repeats
    assert ratio == pytest.approx(sum(each_run) / repeats, abs=0.011)  # the median of 1 or 2 runs
    if repeats == 1:
        assert ratio == pytest.approx(seconds_ours / seconds_ref, abs=0.01)
