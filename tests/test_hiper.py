"""HiPer: the tail replaces the last K rows, only it learns, resume is exact, files are checked."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import ldm
import invert
import sample
from conftest import write_random_checkpoint
from inversion.files import BaseModel, base_model_hash
from inversion.hiper import (HiPer, HiPerConfig, TailFileError, edit_context, encode,
                             hiper_condition, load_tail, save_tail)
from inversion.trainer import TrainingError
from ldm.cli import run
from ldm.load import model_weights_hash

SOURCE = "a red circle on the left"
TARGET = "a red circle on the right"


@pytest.fixture
def image(images):
    return images[0]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
    return path


def make(model, image, tmp_path, **kw):
    cfg = HiPerConfig(**{**dict(source=SOURCE, tail=5, steps=4, batch=2, save_every=2), **kw})
    return HiPer(model, image, cfg, tmp_path, log=lambda s: None)


def test_the_tail_is_the_last_k_rows_of_the_source_encoding(model, image, tmp_path):
    t = make(model, image, tmp_path, tail=3)
    e_src = encode(model, SOURCE)[0]
    assert t.tail.shape == (3, 32) and torch.equal(t.tail.detach(), e_src[-3:])
    seen = []
    model.unet.register_forward_pre_hook(lambda m, args: seen.append(args[2].detach().clone()))
    t.run(progress=False)
    context = seen[-1]                                         # what the U-Net got at the last step
    assert context.shape == (2, 77, 32)
    assert torch.equal(context[:, :-3], e_src[:-3].expand(2, -1, -1))   # the source's words, unchanged
    assert not torch.equal(context[:, -3:], e_src[-3:].expand(2, -1, -1))  # the tail has moved...
    assert torch.equal(seen[-1][0, -3:], seen[-1][1, -3:])      # ...and is one tail for the batch
    assert torch.equal(t.context()[-3:], t.tail.detach())


def test_alpha_scales_the_tail_and_zero_gives_the_target_with_its_tail_rows_zeroed(model):
    tail = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    target = encode(model, TARGET)
    zeroed = target.clone()
    zeroed[:, -5:] = 0
    assert torch.equal(hiper_condition(model, TARGET, tail, alpha=0.0), zeroed)
    c = hiper_condition(model, TARGET, tail, alpha=0.8)
    assert c.shape == (1, 77, 32) and torch.equal(c[:, :-5], target[:, :-5])
    assert torch.allclose(c[0, -5:], 0.8 * tail)
    assert torch.equal(edit_context(target.expand(3, -1, -1), tail, 1.0)[2, -5:], tail)


def test_only_the_tail_learns_and_the_model_stays_bit_identical(model, image, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = make(model, image, tmp_path)
    start = t.tail_vectors()
    t.loss(0).backward()
    assert all(p.grad is None for p in model.parameters())
    assert t.tail.grad is not None and t.tail.grad.abs().sum() > 0
    assert t.optimizer.params == [t.tail]
    t.tail.grad = None
    t.run(progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(t.tail_vectors(), start)
    assert t.step == 4 and len(t.losses) == 4 and (tmp_path / "loss.csv").read_text().count("\n") == 5


def test_resume_is_bit_identical(model, image, tmp_path):
    full = make(model, image, tmp_path / "full")
    full.run(progress=False)
    part = make(model, image, tmp_path / "part", steps=2)
    part.run(progress=False)
    resumed = make(model, image, tmp_path / "part", steps=4)
    assert resumed.resume() and resumed.step == 2
    resumed.run(progress=False)
    assert torch.equal(full.tail_vectors(), resumed.tail_vectors())
    assert full.losses == resumed.losses


def test_resume_with_another_source_or_image_is_refused(model, image, tmp_path):
    make(model, image, tmp_path, steps=2).run(progress=False)
    with pytest.raises(TrainingError,
                       match="does not match this run .*--source '.*' in the checkpoint, 'a blue square' now"):
        make(model, image, tmp_path, source="a blue square").resume()
    with pytest.raises(TrainingError, match=r"does not match this run \(another image\)"):
        make(model, -image, tmp_path).resume()


def test_nan_loss_skips_the_step_and_ctrl_c_saves(model, image, tmp_path, monkeypatch):
    t = make(model, image, tmp_path, save_every=10)
    start = t.tail_vectors()
    monkeypatch.setattr(t, "loss", lambda step: torch.tensor(float("nan"), requires_grad=True))
    assert t.train_step() is None and t.step == 1 and torch.equal(t.tail_vectors(), start)
    monkeypatch.undo()

    saved = []
    calls = {"n": 0}
    real = t.train_step

    def interrupted():
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(t, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        t.run(on_save=lambda tr: saved.append(tr.step), progress=False)
    assert saved == [2] and (tmp_path / "checkpoint.pt").exists()


def test_save_load_round_trip_and_refusals(tmp_path, ckpt):
    tail = torch.randn(5, 32)
    model = ldm.load(ckpt)
    path = save_tail(tmp_path / "t.safetensors", tail, {**BaseModel(ckpt, model).metadata(), "source": SOURCE})
    loaded, meta = load_tail(path, width=32, base=BaseModel(ckpt, model))
    assert torch.equal(loaded, tail) and meta["tail"] == "5" and meta["source"] == SOURCE
    assert meta["method"] == "hiper"
    other = write_random_checkpoint(tmp_path, seed=5)
    with pytest.raises(TailFileError, match="another base model"):
        load_tail(path, width=32, base=BaseModel(other, ldm.load(other)))
    with pytest.raises(TailFileError, match="768 wide"):
        load_tail(path, width=768)
    torch.save(tail[None], tmp_path / "hiper_embeddings_step1000.pt")   # the paper's code's file
    assert torch.equal(load_tail(tmp_path / "hiper_embeddings_step1000.pt", width=32)[0], tail)
    assert not list(tmp_path.glob("*.tmp"))


def test_invert_hiper_end_to_end_and_sample_py_reads_the_tail(ckpt, image_file, tmp_path, capsys):
    out = tmp_path / "run"
    rc = run(invert.main, ["--method", "hiper", "--ckpt", str(ckpt), "--image", str(image_file), "--source", SOURCE,
                           "--steps", "3", "--batch", "2", "--save-every", "2", "--out", str(out)], prog="invert.py")
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    with safe_open(str(out / "hiper_tail.safetensors"), "pt") as f:
        meta, tail = f.metadata(), f.get_tensor("hiper_tail")
    assert tail.shape == (5, 32) and meta["tail"] == "5" and meta["source"] == SOURCE and meta["step"] == "3"
    assert meta["base_model_hash"] == base_model_hash(ckpt) and meta["base_model"] == ckpt.name
    assert meta["base_model_weights"] == model_weights_hash(ldm.load(ckpt))
    assert (out / "checkpoint.pt").exists() and (out / "samples" / "reconstruction.png").exists()
    assert len((out / "loss.csv").read_text().splitlines()) == 4
    assert f"edit with: python sample.py --hiper {out / 'hiper_tail.safetensors'} --prompt '{SOURCE}' --ckpt {ckpt}" \
        in cap.out

    s = tmp_path / "s"
    assert sample.main(["--ckpt", str(ckpt), "--hiper", str(out / "hiper_tail.safetensors"), "--prompt", TARGET,
                        "--n", "1", "--steps", "2", "--out", str(s)]) == 0
    hiper = np.asarray(Image.open(s / "00000-0.png"))
    assert Image.open(s / "00000-0.png").text["alpha"] == "0.8"
    sample.main(["--ckpt", str(ckpt), "--prompt", TARGET, "--n", "1", "--steps", "2", "--out", str(tmp_path / "p")])
    assert not np.array_equal(hiper, np.asarray(Image.open(tmp_path / "p" / "00000-0.png")))
    # the learned tail is used, not only the target's last rows dropped: α = 0 zeroes those rows
    sample.main(["--ckpt", str(ckpt), "--hiper", str(out / "hiper_tail.safetensors"), "--prompt", TARGET,
                 "--n", "1", "--steps", "2", "--alpha", "0", "--out", str(tmp_path / "a0")])
    assert not np.array_equal(hiper, np.asarray(Image.open(tmp_path / "a0" / "00000-0.png")))


def test_the_same_model_in_another_layout_or_in_fp16_takes_the_tail(ckpt, tmp_path, capsys):
    """The file hash differs, the weights hash does not: a diffusers folder and an fp16 file of
    the model a tail was learned on edit with it; another model is refused."""
    model = ldm.load(ckpt)
    tail = save_tail(tmp_path / "t.safetensors", torch.randn(5, 32),
                     {**BaseModel(ckpt, model).metadata(), "source": SOURCE})
    copies = [ldm.save(model, tmp_path / "folder"), ldm.save(model, tmp_path / "half.safetensors", torch.float16)]
    for copy in copies:
        assert base_model_hash(copy) != base_model_hash(ckpt)
        assert sample.main(["--ckpt", str(copy), "--hiper", str(tail), "--prompt", TARGET, "--n", "1",
                            "--steps", "2", "--out", str(tmp_path / copy.stem)]) == 0, capsys.readouterr().err
    other = write_random_checkpoint(tmp_path / "other", seed=5)
    capsys.readouterr()
    rc = run(sample.main, ["--ckpt", str(other), "--hiper", str(tail), "--prompt", TARGET, "--n", "1", "--steps", "2",
                           "--out", str(tmp_path / "o")], prog="sample.py")
    err = capsys.readouterr().err
    assert rc == 2 and "was learned on another base model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_tiny_world_demo_runs_without_an_image(ckpt, tmp_path, capsys):
    rc = run(invert.main, ["--method", "hiper", "--ckpt", str(ckpt), "--steps", "2", "--out", str(tmp_path / "d")],
             prog="invert.py")
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "position ->" in cap.out and "texture ->" in cap.out and "identity" in cap.out
    with safe_open(str(tmp_path / "d" / "hiper_tail.safetensors"), "pt") as f:
        assert f.metadata()["source"].startswith("a ")


def test_bad_input_gives_one_line_exit_2_and_no_files(ckpt, image_file, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = save_tail(tmp_path / "good.safetensors", torch.zeros(5, 32), {"base_model_hash": base_model_hash(ckpt)})
    other = save_tail(tmp_path / "other.safetensors", torch.zeros(5, 32), {"base_model_hash": "0123456789abcdef"})
    wide = save_tail(tmp_path / "wide.safetensors", torch.zeros(5, 768), {"base_model_hash": base_model_hash(ckpt)})
    long_prompt = " ".join(["red"] * 71)   # 73 tokens with start and end > 77 - 5
    train = ["--method", "hiper", "--ckpt", str(ckpt), "--steps", "1"]
    cases = [
        (invert.main, train + ["--image", str(broken), "--source", SOURCE], "broken.png"),
        (invert.main, train + ["--image", str(tmp_path / "none.png"), "--source", SOURCE], "no such file"),
        (invert.main, train + ["--image", str(image_file), "--source", long_prompt], "at most 72"),
        (invert.main, train + ["--image", str(image_file)], "--source"),
        (invert.main, train + ["--image", str(image_file), "--source", SOURCE, "--tail", "76"], "--tail"),
        (sample.main, ["--ckpt", str(ckpt), "--hiper", str(other), "--prompt", TARGET], "another base model"),
        (sample.main, ["--ckpt", str(ckpt), "--hiper", str(wide), "--prompt", TARGET], "768 wide"),
        (sample.main, ["--ckpt", str(ckpt), "--hiper", str(broken), "--prompt", TARGET], "unknown format"),
        (sample.main, ["--ckpt", str(ckpt), "--hiper", str(good), "--prompt", long_prompt], "target prompt"),
        (sample.main, ["--ckpt", str(ckpt), "--embedding", str(good), "--prompt", TARGET], "sample.py --hiper"),
        (sample.main, ["--ckpt", str(ckpt), "--prompt", TARGET, "--alpha", "0.5"], "--alpha needs --hiper"),
    ]
    for main, argv, message in cases:
        out = tmp_path / "out_bad"
        rc = run(main, argv + ["--out", str(out)], prog="x")
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, (argv, lines)
        assert len(lines) == 1 and message in lines[0], (message, lines)
        assert not out.exists(), argv


def test_results_table_command_runs_on_a_random_checkpoint(ckpt, tmp_path, capsys, monkeypatch):
    from tinyworld import hiper_eval
    grid = tmp_path / "grid.png"
    threads, train_tail = [], hiper_eval.train_tail
    monkeypatch.setattr(hiper_eval, "train_tail", lambda *a: threads.append(torch.get_num_threads()) or train_tail(*a))
    rc = run(hiper_eval.main, ["--ckpt", str(ckpt), "--n", "1", "--steps", "2", "--ti-steps", "2", "--samples", "1",
                               "--sample-steps", "2", "--alphas", "0,1", "--grid", str(grid), "--threads", "1"],
             prog="hiper_eval")
    out = capsys.readouterr().out
    assert rc == 0
    assert threads == [1] and "; 1 torch thread\n" in out
    assert "| target prompt |" in out and "| TI |" in out and "| HiPer α=0.8 |" in out
    assert "| 0 |" in out and "| 0.8 |" in out and "| 1 |" in out     # the sweep, with the paper's α added
    assert Image.open(grid).size[0] > 10 * 128                          # source + 3 edits x 3 methods


def test_texture_ceiling_learns_a_context_per_texture_and_seed(ckpt, monkeypatch, capsys):
    """--texture-ceiling: the images show the texture (the analyzer reads it on every one), and the
    table gives one share per seed and their mean, for each named texture."""
    from tinyworld import hiper_eval
    from tinyworld.analyze import analyze_batch
    for texture in hiper_eval.CEILING_TEXTURES:
        images = hiper_eval.texture_images(texture, 4, seed=0)
        assert [r["texture"] for r in analyze_batch(images)] == [texture] * 4
        assert not np.array_equal(images, hiper_eval.texture_images(texture, 4, seed=1))
    monkeypatch.setattr(hiper_eval, "CEILING_SEEDS", (0, 1))
    monkeypatch.setattr(hiper_eval, "CEILING_STEPS", 2)
    monkeypatch.setattr(hiper_eval, "CEILING_SAMPLES", 2)
    # On a random model every real share is 0%, which any mean would match: after each real
    # computation the wrappers hand the table known, distinct shares.
    ceiling, keeps, given = hiper_eval.texture_ceiling, hiper_eval.autoencoder_keeps, []

    def share(real):
        def wrapper(*args, **kwargs):
            real(*args, **kwargs)
            given.append((17 + 29 * len(given)) % 100 / 100)
            return given[-1]
        return wrapper
    monkeypatch.setattr(hiper_eval, "texture_ceiling", share(ceiling))
    monkeypatch.setattr(hiper_eval, "autoencoder_keeps", share(keeps))
    assert run(hiper_eval.main, ["--ckpt", str(ckpt), "--texture-ceiling", "--sample-steps", "2"], prog="x") == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ") and "%" in l]
    assert [r.split("|")[1].strip() for r in rows] == list(hiper_eval.CEILING_TEXTURES)
    for row, (seed0, seed1, kept_share) in zip(rows, zip(*[iter(given)] * 3)):  # per texture: 2 seeds, then kept
        mean, per_seed, kept = row.split("|")[2:5]
        assert kept.strip() == f"{kept_share:.0%}" and per_seed.strip() == f"{seed0:.0%}, {seed1:.0%}", row
        assert float(mean.strip().rstrip("%")) == pytest.approx(50 * (seed0 + seed1), abs=0.6)
    assert len(given) == 3 * len(rows)


class _RoundTrip(torch.nn.Module):
    """A stand-in autoencoder: `paint` maps the images (as latents) back to pixels."""
    def __init__(self, paint):
        super().__init__()
        self.paint = paint

    def encode(self, x):
        return SimpleNamespace(mean=x)

    def decode(self, z):
        return self.paint(z)


def test_the_autoencoder_column_reads_the_round_trip(ckpt):
    """An autoencoder that gives the image back keeps every texture; one that paints each object
    in its mean color keeps none."""
    from tinyworld import hiper_eval
    model = ldm.load(ckpt)
    model.first_stage_model = _RoundTrip(lambda z: z)
    assert [hiper_eval.autoencoder_keeps(model, t, n=8) for t in hiper_eval.CEILING_TEXTURES] == [1.0, 1.0]

    def flat(z):  # the object's pixels (those unlike the corner) get their mean color
        mask = ((z - z[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.1).float()
        mean = (z * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True)
        return z * (1 - mask) + mean * mask
    model.first_stage_model = _RoundTrip(flat)
    assert [hiper_eval.autoencoder_keeps(model, t, n=8) for t in hiper_eval.CEILING_TEXTURES] == [0.0, 0.0]


def test_the_evaluation_refuses_a_tail_its_prompts_leave_no_room_for(ckpt, capsys):
    """hiper_eval's source and edit prompts are up to 14 tokens: a tail of more than 63 rows
    would cut them (or fail after the training); refused first, in one line."""
    from ldm.cli import run
    from tinyworld import hiper_eval
    assert hiper_eval.longest_prompt(20, 0) == 14
    for tail in (64, 70):
        rc = run(hiper_eval.main, ["--ckpt", str(ckpt), "--n", "1", "--steps", "1", "--no-ti", "--tail", str(tail)],
                 prog="x")
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "a tail of at most 63 rows fits" in err[0], err
