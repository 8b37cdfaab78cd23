"""The tiny model's training command, in a few steps, and the shipped model."""
import hashlib
import json
import os

import pytest
import torch

from conftest import ROOT
import ldm
from ldm.files import read_metadata
from tinyworld import train

SHIPPED = ROOT / "weights" / "tiny.safetensors"


def test_training_smoke_run_exports_a_loadable_model_and_resumes(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    argv = ["--run", str(tmp_path / "run"), "--out", str(out), "--images", "64", "--vae-steps", "3",
            "--vae-batch", "4", "--steps", "2", "--batch", "4", "--eval-every", "0", "--checkpoint-every", "1",
            "--threads", "1"]
    assert train.main(argv) == 0
    model = ldm.load(out)
    expected = train.tiny_model_config()
    assert (model.config.unet, model.config.text, model.config.image_size) == (expected.unet, expected.text, 32)
    assert model.config.vae.scale_factor != 0.18215  # measured from the cached latents
    state = torch.load(tmp_path / "run" / "diffusion.pt", weights_only=True)
    assert state["step"] == 2
    # a second run refuses to overwrite, and --resume continues to more steps
    capsys.readouterr()
    assert train.main(argv) == 2 and "--resume" in capsys.readouterr().err
    # ... and a resume on other images would pair the cached latents with other captions
    assert train.main([*argv, "--resume", "--steps", "3", "--images", "65"]) == 2
    assert "--images" in capsys.readouterr().err
    assert train.main([*argv, "--resume", "--steps", "3", "--warmup", "0"]) == 0  # 0: no warm-up
    assert torch.load(tmp_path / "run" / "diffusion.pt", weights_only=True)["step"] == 3
    assert json.loads(read_metadata(out)["training"])["vae_steps"] == 3

    # --init continues from that model: with no steps in either stage it comes back unchanged,
    # and the new file records where it came from
    again = tmp_path / "again.safetensors"
    small = ["--images", "64", "--vae-batch", "4", "--batch", "4", "--eval-every", "0", "--threads", "1"]
    assert train.main(["--init", str(out), "--run", str(tmp_path / "run2"), "--out", str(again),
                       "--vae-steps", "0", "--steps", "0", *small]) == 0
    before, after = ldm.load(out).state_dict(), ldm.load(again).state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    training = json.loads(read_metadata(again)["training"])
    assert training["init_file"] == out.name and training["init"]["diffusion_steps"] == 3
    assert training["vae_steps"] == 0  # the steps it ran
    # the diffusers layout, a folder: the size printed is its files' (was the folder entry's, "0.0 MB")
    capsys.readouterr()
    assert train.main(["--init", str(out), "--run", str(tmp_path / "run5"), "--out", str(tmp_path / "folder"),
                       "--vae-steps", "0", "--steps", "0", *small]) == 0
    size = sum(f.stat().st_size for f in (tmp_path / "folder").rglob("*") if f.is_file()) / 1e6
    assert size > 0.1 and f"wrote {tmp_path / 'folder'} ({size:.1f} MB)" in capsys.readouterr().out
    # with steps, the autoencoder and the U-Net move
    moved = tmp_path / "moved.safetensors"
    assert train.main(["--init", str(out), "--run", str(tmp_path / "run3"), "--out", str(moved),
                       "--vae-steps", "2", "--steps", "2", *small]) == 0
    after = ldm.load(moved).state_dict()
    for prefix in ("first_stage_model.decoder.", "model.diffusion_model."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    # --decoder-steps alone moves the decoder and nothing else: the latents the U-Net learned stay
    decoded = tmp_path / "decoder.safetensors"
    assert train.main(["--init", str(out), "--run", str(tmp_path / "run4"), "--out", str(decoded),
                       "--vae-steps", "0", "--decoder-steps", "2", "--steps", "0", *small]) == 0
    after = ldm.load(decoded).state_dict()
    decoder = ("first_stage_model.decoder.", "first_stage_model.post_quant_conv.")
    moved_keys = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved_keys and all(k.startswith(decoder) for k in moved_keys)
    assert any(k.startswith("first_stage_model.decoder.up") for k in moved_keys)
    assert json.loads(read_metadata(decoded)["training"])["decoder_steps"] == 2
    assert torch.load(tmp_path / "run4" / "decoder.pt", weights_only=True)["step"] == 2


def interrupt_on_call(n, real):
    """`real`, except that its n-th call raises KeyboardInterrupt, as Ctrl-C would."""
    calls = []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)
    return wrapped


@pytest.mark.parametrize("stage, function, checkpoint", [("autoencoder", "object_weight", "vae.pt"),
                                                        ("diffusion", "ema_update", "diffusion.pt")])
def test_ctrl_c_saves_the_stage_it_stops_and_resume_continues(tmp_path, capsys, monkeypatch, stage, function,
                                                              checkpoint):
    run = tmp_path / "run"
    argv = ["--run", str(run), "--out", str(tmp_path / "tiny.safetensors"), "--images", "32", "--vae-steps", "4",
            "--vae-batch", "4", "--steps", "4", "--batch", "4", "--eval-every", "0", "--checkpoint-every", "100",
            "--threads", "1"]
    monkeypatch.setattr(train, function, interrupt_on_call(3, getattr(train, function)))
    assert train.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "interrupted" in err[-1] and "--resume" in err[-1] and str(run) in err[-1]
    assert torch.load(run / checkpoint, weights_only=True)["step"] == 2  # saved where it stopped, not at 100
    assert not (tmp_path / "tiny.safetensors").exists()
    monkeypatch.undo()
    assert train.main([*argv, "--resume"]) == 0
    assert torch.load(run / checkpoint, weights_only=True)["step"] == 4


def test_anchor_holds_the_encoder_means_near_the_starting_ones(tmp_path):
    from conftest import randomize, tiny_config
    from ldm.vae import AutoencoderKL
    from tinyworld.world import make_dataset
    cfg = tiny_config()
    images = make_dataset(16, seed=0, split="train")[0]
    start = randomize(AutoencoderKL(cfg.vae), seed=1, std=0.05)
    x = train.to_tensor(images[:8])
    with torch.no_grad():
        before = start.encode(x).mean
    drift = {}
    for weight in ("0", "1000"):
        args = train.build_parser().parse_args(["--vae-steps", "5", "--vae-batch", "4", "--anchor", weight])
        (tmp_path / weight).mkdir()  # a run folder each
        vae = train.train_vae(args, cfg, images, tmp_path / weight, start=start)
        with torch.no_grad():
            drift[weight] = float((vae.encode(x).mean - before).pow(2).mean())
    assert 0 < drift["1000"] < 0.5 * drift["0"], drift


def test_max_timestep_trains_on_the_low_noise_steps_only(tmp_path):
    from conftest import tiny_config
    from ldm.model import StableDiffusion
    from tinyworld.world import make_dataset
    attrs = make_dataset(8, seed=0, split="train")[2]
    seen = {}
    for limit in ("0", "5"):
        model = StableDiffusion(tiny_config())
        ts = []
        model.unet.register_forward_pre_hook(lambda module, inputs: ts.append(inputs[1].clone()))
        args = train.build_parser().parse_args(["--steps", "3", "--batch", "4", "--max-timestep", limit,
                                                "--eval-every", "0"])
        (tmp_path / limit).mkdir()
        train.train_diffusion(args, model, torch.randn(8, 4, 4, 4), attrs, tmp_path / limit)
        seen[limit] = torch.cat(ts)
    assert len(seen["5"]) == 12 and int(seen["5"].max()) < 5
    assert int(seen["0"].max()) >= 5  # all 1000 timesteps otherwise


@pytest.mark.parametrize("case", ["not a model", "wrong size", "max timestep", "anchor", "anchor without init",
                                  "decoder lr without decoder steps",
                                  "minutes", "device", "out suffix", "out is init", "out is init, linked",
                                  "init missing", "out folder not new",
                                  "out under a file", "resume nothing", "run is a file"])
def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    from conftest import write_random_checkpoint
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    (tmp_path / "m32").mkdir()
    argv = {"not a model": ["--init", str(bad)],
            "wrong size": ["--init", str(write_random_checkpoint(tmp_path, image_size=16))],
            "max timestep": ["--max-timestep", "1001"],
            "anchor": ["--anchor", "-1", "--init", str(write_random_checkpoint(tmp_path / "m32", image_size=32))],
            "anchor without init": ["--anchor", "2"],   # was ignored
            "decoder lr without decoder steps": ["--decoder-lr", "1e-4"],  # was ignored
            "minutes": ["--minutes", "0"],
            "device": ["--device", "tpu"],
            # were found only after the training, or not at all
            "out suffix": ["--out", str(tmp_path / "model.txt")],
            "out is init": ["--init", str(bad), "--out", str(bad)],
            # another name for the same file (a link; on macOS and Windows, another case of its name)
            "out is init, linked": ["--init", str(bad), "--out", str(tmp_path / "link.safetensors")],
            # an --out that exists beside an --init that does not: told by the loader, not by a stat
            "init missing": ["--init", str(tmp_path / "missing.safetensors"), "--out", str(bad)],
            "out folder not new": ["--out", str(tmp_path / "m32")],
            "out under a file": ["--out", str(bad / "model.safetensors")],
            "resume nothing": ["--resume"],
            "run is a file": ["--run", str(bad)]}[case]
    small = ["--images", "16", "--vae-steps", "1", "--vae-batch", "2", "--steps", "1", "--batch", "2",
             "--eval-every", "0", "--threads", "1"]  # a short run, were the input let through
    default = ["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out.safetensors")]
    (tmp_path / "m32" / "keep.txt").write_text("")
    os.link(bad, tmp_path / "link.safetensors")
    assert train.main([*small, *default, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinyworld.train: error: ") and err.count("\n") == 1, err
    expected = {"not a model": "cannot be read as safetensors", "wrong size": "is a 16-px model",
                "max timestep": "--max-timestep", "minutes": "--minutes", "device": "unknown device 'tpu'",
                "init missing": "missing.safetensors: no such file"}
    assert expected.get(case, "--" + case.split()[0]) in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.safetensors").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A two-step training run's folder and the arguments that made it."""
    folder = tmp_path_factory.mktemp("finished")
    argv = ["--run", str(folder / "run"), "--out", str(folder / "tiny.safetensors"), "--images", "16",
            "--vae-steps", "2", "--vae-batch", "2", "--steps", "2", "--batch", "2", "--eval-every", "0",
            "--threads", "1"]
    assert train.main(argv) == 0
    return folder / "run", argv


def damage(path, how):
    if how == "cut short":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "another state":  # a readable file that is not this stage's checkpoint
        torch.save({"step": "three", "vae": {"x": torch.zeros(1)}, "model": [], "opt": {}}, path)
    else:
        path.write_text("{not json")


@pytest.mark.parametrize("name, how", [("config.json", "garbled"), ("vae.pt", "cut short"),
                                       ("diffusion.pt", "cut short"), ("vae.pt", "another state"),
                                       ("diffusion.pt", "another state")])
def test_resume_on_a_damaged_checkpoint_is_one_line_naming_it(finished_run, name, how, tmp_path, capsys):
    import shutil
    run, argv = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damage(copy / name, how)
    argv = [*argv, "--resume", "--steps", "3", "--run", str(copy), "--out", str(tmp_path / "again.safetensors")]
    assert train.main(argv) == 2  # was a traceback
    err = capsys.readouterr().err
    assert err.count("tinyworld.train: error: ") == 1 and f"{copy / name} is damaged" in err.splitlines()[-1], err
    assert "Traceback" not in err and not (tmp_path / "again.safetensors").exists()


@pytest.mark.parametrize("how", ["cut short", "another state"])
def test_resume_computes_a_damaged_latent_cache_again(finished_run, how, tmp_path, capsys):
    import shutil
    run, argv = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    kept = torch.load(copy / "latents.pt", weights_only=True)
    damage(copy / "latents.pt", how)
    out = tmp_path / "again.safetensors"
    assert train.main([*argv, "--resume", "--steps", "3", "--run", str(copy), "--out", str(out)]) == 0
    if how == "cut short":  # another run's cache is stale, and computed again without a word
        assert "computing the latents again" in capsys.readouterr().err
    again = torch.load(copy / "latents.pt", weights_only=True)
    assert torch.equal(again["latents"], kept["latents"]) and again["vae_step"] == kept["vae_step"]
    assert torch.load(copy / "diffusion.pt", weights_only=True)["step"] == 3


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


def test_cached_latents_follow_an_autoencoder_that_trained_on(tmp_path):
    """A run stopped by --vae-minutes and resumed trains its autoencoder further: the latents
    cached from the earlier autoencoder must not be used again."""
    from conftest import tiny_config
    from tinyworld.world import make_dataset
    cfg = tiny_config()
    images = make_dataset(16, seed=0, split="train")[0]
    run = tmp_path / "run"
    run.mkdir()
    args = train.build_parser().parse_args(["--vae-steps", "2", "--vae-batch", "4"])
    first, _ = train.cache_latents(train.train_vae(args, cfg, images, run), images, run)
    vae = train.train_vae(args, cfg, images, run)
    encoded = []
    vae.encode = lambda x: encoded.append(x) or type(vae).encode(vae, x)
    again, _ = train.cache_latents(vae, images, run)
    assert torch.equal(first, again) and not encoded  # nothing trained in between: the cache is read
    args = train.build_parser().parse_args(["--vae-steps", "4", "--vae-batch", "4"])
    vae = train.train_vae(args, cfg, images, run)
    later, _ = train.cache_latents(vae, images, run)
    with torch.no_grad():
        expected = vae.encode(train.to_tensor(images)).mean
    assert not torch.equal(first, later) and torch.allclose(later, expected, atol=1e-6)


def test_vae_minutes_stops_the_autoencoder_stage_and_keeps_its_step(tmp_path):
    from conftest import tiny_config
    from tinyworld.world import make_dataset
    images = make_dataset(16, seed=0, split="train")[0]
    args = train.build_parser().parse_args(["--vae-steps", "1000", "--vae-batch", "2", "--vae-minutes", "1e-9"])
    train.train_vae(args, tiny_config(), images, tmp_path)
    step = torch.load(tmp_path / "vae.pt", weights_only=True)["step"]
    assert 0 <= step < 1000  # stopped by the clock, and the checkpoint says where


def test_worker_processes_draw_the_same_batches_as_the_trainer():
    import itertools
    from clip import Tokenizer
    from tinyworld.world import make_dataset
    attrs, tokenizer = make_dataset(50, seed=0, split="train")[2], Tokenizer()
    draws = {}
    for workers in ("0", "2"):
        args = train.build_parser().parse_args(["--batch", "6", "--workers", workers, "--seed", "3"])
        batches = train.draw_batches(args, attrs, tokenizer, first=5)  # as a resumed run at step 5
        draws[workers] = list(itertools.islice(batches, 12))  # more than the workers keep ahead
        batches.close()
    assert len(draws["0"]) == len(draws["2"]) == 12
    for (idx, ids), (idx2, ids2) in zip(draws["0"], draws["2"]):
        assert ids.shape == (6, 77) and (idx == idx2).all() and (ids == ids2).all()
    assert not (draws["0"][0][1] == draws["0"][1][1]).all()  # each step draws afresh
    assert (draws["0"][0][0] == train.draw_batch(5)[0]).all()
