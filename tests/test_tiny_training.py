"""The tiny model's training command, in a few steps, and the shipped model."""
import hashlib

import pytest
import torch

from conftest import ROOT
import ldm
from tinyworld import train

SHIPPED = ROOT / "weights" / "tiny.safetensors"


def test_training_smoke_run_exports_a_loadable_model_and_resumes(tmp_path):
    out = tmp_path / "tiny.safetensors"
    argv = ["--run", str(tmp_path / "run"), "--out", str(out), "--images", "64", "--vae-steps", "3",
            "--vae-batch", "4", "--steps", "2", "--batch", "4", "--eval-every", "0", "--checkpoint-every", "1",
            "--threads", "1"]
    assert train.main(argv) == 0
    model = ldm.load(out)
    assert model.config == ldm.load(out).config and model.config.image_size == 32
    assert model.config.vae.scale_factor != 0.18215  # measured from the cached latents
    state = torch.load(tmp_path / "run" / "diffusion.pt", weights_only=True)
    assert state["step"] == 2
    # a second run refuses to overwrite, and --resume continues to more steps
    assert train.main(argv) == 2
    assert train.main([*argv, "--resume", "--steps", "3"]) == 0
    assert torch.load(tmp_path / "run" / "diffusion.pt", weights_only=True)["step"] == 3


@pytest.mark.skipif(not SHIPPED.exists(), reason="the tiny model is not trained yet")
def test_shipped_model_loads_and_matches_its_recorded_hash():
    recorded = (ROOT / "weights" / "tiny.sha256").read_text().split()[0]
    assert hashlib.sha256(SHIPPED.read_bytes()).hexdigest() == recorded
    model = ldm.load(SHIPPED)
    assert model.config.image_size == 32
    assert SHIPPED.stat().st_size <= 25_000_000


@pytest.mark.skipif(not SHIPPED.exists(), reason="the tiny model is not trained yet")
def test_shipped_model_draws_what_it_is_told():
    from ldm.generate import generate
    from tinyworld.evaluate import to_uint8
    from tinyworld.analyze import analyze_batch
    model = ldm.load(SHIPPED)
    images = to_uint8(generate(model, ["a large blue circle on the left"] * 4, seeds=[0, 1, 2, 3], steps=25))
    reads = analyze_batch(images)
    right = [r["shape"] == "circle" and r["color"] == "blue" and r["position"] == "left" for r in reads]
    assert sum(right) >= 3, reads
