"""bench/ti_step.py runs both sides at both precisions and prints one table row each (the
numbers themselves are measurements, not asserted)."""
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiny_bench_row(precision):
    pytest.importorskip("diffusers")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "ti_step.py"), "--only", "tiny", "--steps", "1",
                          "--precision", precision], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"frozen weights in {precision}" in out.stdout
    row = [l for l in out.stdout.splitlines() if l.startswith("| tiny |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert len(cells) == 10
    seconds_ours, seconds_ref, ratio = (float(c) for c in cells[1:4])
    assert seconds_ours > 0 and seconds_ref > 0 and ratio == pytest.approx(seconds_ours / seconds_ref, abs=0.01)
