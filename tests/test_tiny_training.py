"""The tiny model's training command, in a few steps, and the shipped model."""
import hashlib
import json

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

    # --init continues from that model: with no steps in either stage it comes back unchanged,
    # and the new file records where it came from
    again = tmp_path / "again.safetensors"
    small = ["--images", "64", "--vae-batch", "4", "--batch", "4", "--eval-every", "0", "--threads", "1"]
    assert train.main(["--init", str(out), "--run", str(tmp_path / "run2"), "--out", str(again),
                       "--vae-steps", "0", "--steps", "0", *small]) == 0
    before, after = ldm.load(out).state_dict(), ldm.load(again).state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    from ldm.load import read_tensors
    training = json.loads(read_tensors(again)[1]["training"])
    assert training["init_file"] == out.name and training["init"]["diffusion_steps"] == 3
    # with steps, the autoencoder moves (its anchor holds it near) and so does the U-Net
    moved = tmp_path / "moved.safetensors"
    assert train.main(["--init", str(out), "--run", str(tmp_path / "run3"), "--out", str(moved),
                       "--vae-steps", "2", "--steps", "2", *small]) == 0
    after = ldm.load(moved).state_dict()
    for prefix in ("first_stage_model.decoder.", "model.diffusion_model."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix


def test_init_refuses_a_file_that_is_not_a_model(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    assert train.main(["--init", str(bad), "--run", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "run").exists()  # nothing written


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
