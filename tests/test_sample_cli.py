"""sample.py end to end on a tiny random checkpoint, and its one-line errors."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from conftest import ROOT, write_random_checkpoint
import sample


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), image_size=32, seed=3)


def test_writes_pngs_with_metadata_and_a_grid(ckpt, tmp_path):
    out = tmp_path / "out"
    rc = sample.main(["--prompt", "a red circle", "--ckpt", str(ckpt), "--steps", "3", "--n", "3",
                      "--batch-size", "2", "--seed", "5", "--out", str(out)])
    assert rc == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["00000-5.png", "00001-6.png", "00002-7.png", "grid-00000.png"]
    im = Image.open(out / "00001-6.png")
    assert im.size == (32, 32) and im.mode == "RGB"
    assert im.text["prompt"] == "a red circle" and im.text["seed"] == "6" and im.text["steps"] == "3"
    assert "Seed: 6" in im.text["parameters"]
    # the model by its name, as AUTOMATIC1111 writes it, and not where it lies on this disk
    assert im.text["model"] == ckpt.name and im.text["parameters"].endswith(f", Model: {ckpt.stem}")
    assert Image.open(out / "grid-00000.png").size == (64, 64)  # 3 images on a 2x2 grid
    assert not list(out.glob(".*tmp"))
    first_run = {p.name: p.read_bytes() for p in out.glob("*.png")}
    rc = sample.main(["--prompt", "a blue square", "--ckpt", str(ckpt), "--steps", "2", "--n", "2", "--seed", "5",
                      "--out", str(out)])  # a second run into the same folder adds, and overwrites nothing
    assert rc == 0 and sorted(p.name for p in out.glob("*.png")) == sorted(
        [*first_run, "00003-5.png", "00004-6.png", "grid-00003.png"])
    assert all((out / name).read_bytes() == data for name, data in first_run.items())
    assert Image.open(out / "00003-5.png").text["prompt"] == "a blue square"


def batch_of_two_and_one(ckpt, out, device, sampler=()):
    """Image 1 of a batch of 2 (seeds 0, 1) and the image of seed 1 alone: (pixels, pixels, image 0's)."""
    sample.main(["--prompt", "a", "--ckpt", str(ckpt), "--steps", "2", "--n", "2", "--batch-size", "2",
                 "--device", device, "--out", str(out / "a"), *sampler])
    sample.main(["--prompt", "a", "--ckpt", str(ckpt), "--steps", "2", "--n", "1", "--seed", "1",
                 "--device", device, "--out", str(out / "b"), *sampler])
    read = lambda path: np.asarray(Image.open(path), dtype=np.int16)
    return read(out / "a" / "00001-1.png"), read(out / "b" / "00000-1.png"), read(out / "a" / "00000-0.png")


@pytest.mark.parametrize("sampler", [(), ("--eta", "1"), ("--sampler", "ddpm")])
def test_same_seed_same_image_whatever_the_batch(ckpt, tmp_path, sampler):
    # On the CPU, bit for bit: each image's noise, the starting noise and the noise that DDPM and
    # DDIM with eta > 0 add at each step, comes from its own seed (the step noise was the first
    # image's, so an image changed with the seed before it in its batch).
    in_batch, alone, other = batch_of_two_and_one(ckpt, tmp_path, "cpu", sampler)
    assert np.array_equal(in_batch, alone)
    assert not np.array_equal(in_batch, other)


def test_same_seed_same_image_on_the_default_device(ckpt, tmp_path):
    # On a GPU the kernels picked for a batch of 2 and of 1 differ in rounding (and the weights
    # are float16 there), so a pixel may move by a level or two, never the picture.
    in_batch, alone, other = batch_of_two_and_one(ckpt, tmp_path, "auto")
    assert np.abs(in_batch - alone).max() <= 2
    assert np.abs(in_batch - other).max() > 2


def test_ddpm_sampler_and_negative_prompt_change_the_image(ckpt, tmp_path):
    def image(name, *options):
        assert sample.main(["--prompt", "a red circle", "--ckpt", str(ckpt), "--steps", "4", "--n", "1",
                            "--out", str(tmp_path / name), *options]) == 0
        return np.asarray(Image.open(tmp_path / name / "00000-0.png"))
    ddim = image("ddim")
    assert np.array_equal(ddim, image("ddim-again"))
    assert not np.array_equal(ddim, image("ddpm", "--sampler", "ddpm"))       # ancestral: other steps, fresh noise
    assert not np.array_equal(ddim, image("negative", "--negative", "blue"))  # the guidance pushes away from it
    assert Image.open(tmp_path / "negative" / "00000-0.png").text["negative_prompt"] == "blue"


def test_width_and_height_and_precision(ckpt, tmp_path):
    assert sample.main(["--prompt", "a red circle", "--ckpt", str(ckpt), "--steps", "2", "--n", "1",
                        "--width", "64", "--height", "32", "--out", str(tmp_path / "wide")]) == 0
    wide = Image.open(tmp_path / "wide" / "00000-0.png")
    assert wide.size == (64, 32) and wide.text["width"] == "64" and wide.text["height"] == "32"
    fp32 = sample.main(["--prompt", "a red circle", "--ckpt", str(ckpt), "--steps", "2", "--n", "1",
                        "--out", str(tmp_path / "fp32")])
    bf16 = sample.main(["--prompt", "a red circle", "--ckpt", str(ckpt), "--steps", "2", "--n", "1",
                        "--precision", "bf16", "--out", str(tmp_path / "bf16")])
    assert fp32 == bf16 == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "00000-0.png"), dtype=np.int16) for d in ("fp32", "bf16"))
    assert not np.array_equal(a, b) and np.abs(a - b).mean() < 4  # bf16 weights: the same picture, rounded (0.5)
    settings = Image.open(tmp_path / "bf16" / "00000-0.png").text   # which is recorded with the image
    assert settings["precision"] == "bf16" and settings["device"] == "cpu"
    assert Image.open(tmp_path / "fp32" / "00000-0.png").text["precision"] == "fp32"


def test_auto_device_and_precision(monkeypatch):
    from ldm.cli import CLIError, pick_device, pick_dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type in ("cpu", "mps")
    with pytest.raises(CLIError, match="no CUDA GPU"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda") and pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(CLIError, match="has 2 CUDA GPU"):
        pick_device("cuda:2")
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16   # sampling: fp16 weights on a GPU
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "missing.safetensors"], "no such file"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--sampler", "euler"], "invalid choice"),
    (["--height", "30"], "multiple of"),
    (["--sampler", "ddpm", "--eta", "0.5"], "--eta"),              # was ignored
    (["--ema"], "leave out --ema"),                                 # a file without EMA weights
    (["--steps", "5000"], "at most 1000"),                          # were tracebacks
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--scale", "1e309"], "--scale"),
    (["--device", "mps"], "--device mps"),
    (["--eta", "1.5"], "--eta: must be between 0 and 1"),            # its noise would pass the schedule's
    (["--seed", str(2 ** 63 - 1), "--n", "2"], "give a smaller --seed"),  # image 2's seed could not be given back
    (["--out="], "--out: is empty"),                                # would be the current folder
    (["--n", "1001"], "--n: must be between 1 and 1000"),            # 10**12 was killed for memory
    (["--alpha", "11"], "--alpha: must be between 0 and 10"),        # 1e38 drew black images
    (["--width", "16000000"], "--width: must be between 1 and 2048"),  # was killed for memory
    *([(["--hiper", os.devnull], "is not a regular file"),          # was "no such file"
       (["--neti", os.devnull], "is not a regular file")] if os.name == "posix" else []),
])
def test_bad_input_gives_one_line_and_nonzero_exit(ckpt, tmp_path, args, message):
    argv = ["--prompt", "x", "--out", str(tmp_path / "o")]
    if "--ckpt" not in args:
        argv += ["--ckpt", str(ckpt)]
    proc = subprocess.run([sys.executable, "sample.py", *argv, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_a_prompt_longer_than_the_text_encoder_reads_is_warned(ckpt, tmp_path):
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", str(ckpt), "--prompt", "red circle " * 40,
                           "--n", "1", "--steps", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "warning: --prompt is 82 tokens; the text encoder reads the first 77" in proc.stderr


def test_ema_samples_with_the_files_ema_unet(tmp_path):
    """A full file whose EMA copy is another model's U-Net: --ema draws that model's images."""
    import ldm
    import torch
    from safetensors.torch import load_file, save_file
    from ldm.files import read_metadata
    first = write_random_checkpoint(tmp_path / "a", image_size=16, seed=3)
    second = write_random_checkpoint(tmp_path / "b", image_size=16, seed=4)
    sd, other = load_file(first), load_file(second)
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    mixed = {**sd, **{k: other[k] for k in unet_keys}}       # first's VAE and text encoder, second's U-Net
    for k in unet_keys:
        sd["model_ema." + k[len("model."):].replace(".", "")] = other[k]
    full, mixed_file = tmp_path / "full.safetensors", tmp_path / "mixed.safetensors"
    save_file(sd, full, metadata=read_metadata(first))
    save_file(mixed, mixed_file, metadata=read_metadata(first))
    assert torch.equal(ldm.load(full).unet.input_blocks[0][0].weight, ldm.load(first).unet.input_blocks[0][0].weight)

    def draw(ckpt, *flags):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert sample.main(["--prompt", "a", "--ckpt", str(ckpt), "--steps", "2", "--n", "1", "--out", str(out),
                            *flags]) == 0
        return np.asarray(Image.open(out / "00000-0.png"))

    ema, plain = draw(full, "--ema"), draw(full)
    assert np.array_equal(ema, draw(mixed_file)) and not np.array_equal(ema, plain)
    assert np.array_equal(plain, draw(first))


def test_an_out_that_cannot_be_a_folder_is_one_line_before_any_work(ckpt, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "run"):   # were "[Errno 17] File exists" / a traceback from mkdir
        proc = subprocess.run([sys.executable, "sample.py", "--prompt", "x", "--ckpt", str(ckpt), "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "--out" in lines[0], proc.stderr
    assert blocker.read_text() == "not a folder"


def test_unknown_format_is_one_line(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00" * 10)
    proc = subprocess.run([sys.executable, "sample.py", "--prompt", "x", "--ckpt", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown format" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_help_shows_defaults_only_where_there_is_one(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for nothing in ("(default: None)", "(default: )", "(default: [])", "(default: False)"):
        assert nothing not in text
    assert "(default: 0)" in text and "(default: 7.5)" in text   # a zero is still a default


@pytest.mark.parametrize("name, fmt", [("grid.png", "PNG"), ("grid.jpg", "JPEG"), ("grid.JPEG", "JPEG"),
                                       ("grid.webp", "WEBP")])
def test_an_image_is_written_in_the_format_its_name_says(name, fmt, tmp_path):
    from ldm.cli import image_path_arg
    from ldm.generate import save_image
    path = image_path_arg(str(tmp_path / name))   # what --grid takes
    save_image(Image.new("RGB", (8, 8), (200, 10, 10)), path)
    with Image.open(path) as im:
        assert im.format == fmt  # a .jpg name held PNG bytes


def test_an_interrupted_png_write_leaves_no_file(tmp_path, monkeypatch):
    """Every image the tools write (samples, grids, validation grids) goes through save_image."""
    from ldm.generate import save_image
    image = Image.new("RGB", (8, 8), (200, 10, 10))

    def cut_short(self, fp, *args, **kwargs):  # a Ctrl-C in the middle of writing
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        save_image(image, tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_image(image, tmp_path / "a.png", upscale=4)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (32, 32) and im.getpixel((31, 31)) == (200, 10, 10)


def test_a_refused_run_prints_its_error_alone(ckpt, tmp_path, capsys):
    """Warnings come after every check, so a refused run prints one line: its error."""
    from inversion.hiper import save_tail
    from ldm.cli import run
    from inversion.files import save_embeddings
    tail = save_tail(tmp_path / "tail.safetensors", torch.zeros(5, 32))
    word = save_embeddings(tmp_path / "w.safetensors", {"<w>": torch.zeros(1, 32)})
    long = "red " * 80
    for argv, error in ((["--hiper", str(tail), "--prompt", long], "the target prompt is 82 tokens"),
                        (["--prompt", long + "<x>", "--height", "33"], "height 33 must be a positive multiple"),
                        (["--prompt", "a red circle", "--embedding", str(word), "--width", "33"],
                         "width 33 must be a positive multiple")):
        rc = run(sample.main, ["--ckpt", str(ckpt), "--n", "1", "--steps", "1", "--out", str(tmp_path / "o"), *argv],
                 prog="sample.py")
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and error in err[0], err


def test_a_learned_word_past_the_77_tokens_and_guidance_that_ignores_input_are_warned(ckpt, tmp_path):
    from safetensors.torch import save_file
    word = tmp_path / "word.safetensors"
    save_file({"<toy>": torch.randn(1, 32)}, word)
    base = [sys.executable, "sample.py", "--ckpt", str(ckpt), "--n", "1", "--steps", "1", "--out", str(tmp_path / "o")]
    proc = subprocess.run(base + ["--embedding", str(word), "--prompt", "red circle " * 40 + "<toy>"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "learned word '<toy>' comes after the text encoder's 77 tokens" in proc.stderr
    proc = subprocess.run(base + ["--embedding", str(word), "--prompt", "a <toy> " + "red circle " * 40],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "comes after" not in proc.stderr  # the word is read; only the tail is cut
    proc = subprocess.run(base + ["--prompt", "x", "--negative", "blue", "--scale", "1"], cwd=ROOT,
                          capture_output=True, text=True)
    assert "--negative has no effect at --scale 1" in proc.stderr and "wrote 1 image (" in proc.stdout
    proc = subprocess.run(base + ["--prompt", "x", "--scale", "0"], cwd=ROOT, capture_output=True, text=True)
    assert "--scale 0 draws without the prompt" in proc.stderr


def test_generate_refuses_a_scale_or_seed_that_would_give_nonsense():
    from types import SimpleNamespace
    from ldm.generate import generate
    model = SimpleNamespace()  # refused before the model is used
    for kw, message in ((dict(seeds=[0], scale=float("nan")), "scale"), (dict(seeds=[-1]), "seeds"),
                        (dict(seeds=[2 ** 63]), "seeds")):
        with pytest.raises(ValueError, match=message):
            generate(model, ["a"], **kw)


def test_guidance_that_overflows_is_one_line_and_writes_no_black_images(ckpt, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", str(ckpt), "--prompt", "x", "--out", str(out),
                           "--scale", "1e38", "--steps", "2"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the progress bar
    assert "NaN or infinite" in last and "guidance scale 1e+38" in last and "nothing written" in last
    assert not out.exists() or not list(out.iterdir())


def test_generate_raises_on_images_that_overflowed_and_a_validation_row_is_skipped(ckpt, tmp_path, capsys):
    import ldm
    from ldm.generate import SamplingError, generate, save_prompt_row
    model = ldm.load(ckpt)
    cond = model.encode_prompts(["a red circle"])
    with pytest.raises(SamplingError, match="NaN or infinite"):
        generate(model, ["a red circle"], [0], steps=2, cond=cond * float("nan"))
    with pytest.raises(SamplingError):  # a learned vector too large for float32
        generate(model, ["a red circle"], [0], steps=2, cond=cond * 1e38)
    save_prompt_row(model, ["a red circle"], tmp_path / "row.png", steps=2, cond=cond * float("nan"))
    assert not (tmp_path / "row.png").exists()  # a training run goes on, with a warning
    assert "row.png not written" in capsys.readouterr().err


def test_validation_row_is_each_prompt_with_its_seed(ckpt, tmp_path):
    import ldm
    from ldm.generate import generate, save_prompt_row, to_pil
    model = ldm.load(ckpt)
    prompts = ["a red circle", "a blue square on the left"]
    save_prompt_row(model, prompts, tmp_path / "row.png", steps=2, upscale=2)
    row = np.asarray(Image.open(tmp_path / "row.png"))
    assert row.shape == (64, 128, 3)  # two 32-px images side by side, each pixel drawn 2 x 2
    for i, prompt in enumerate(prompts):  # image i: prompt i with seed i
        alone = np.asarray(to_pil(generate(model, [prompt], [i], steps=2))[0])
        assert np.array_equal(row[::2, 64 * i:64 * (i + 1):2], alone)


def test_progress_bar_counts_every_batch_and_ends_full(ckpt, tmp_path, capsys):
    # 5 images in batches of 2: 3 batches of 4 denoising steps (it stopped at 4/20 when it counted images)
    assert sample.main(["--prompt", "a red circle", "--ckpt", str(ckpt), "--steps", "4", "--n", "5",
                        "--batch-size", "2", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "sampling: 100%" in err and "12/12" in err


def test_text_the_output_cannot_show_is_escaped_not_fatal():
    """--help holds an α. Redirected on Windows, stdout is cp1252, which has none; on some systems, ASCII."""
    for encoding in ("cp1252", "ascii"):
        proc = subprocess.run([sys.executable, "sample.py", "--help"], cwd=ROOT, capture_output=True,
                              env={**os.environ, "PYTHONIOENCODING": encoding})
        assert proc.returncode == 0 and b"weight \\u03b1 of the tail" in proc.stdout, proc.stderr[-500:]


def test_the_command_to_paste_is_quoted_for_its_shell():
    from ldm.cli import shell_command
    words = ["python", "sample.py", "--embedding", r"out dir\learned_embeds.safetensors", "--prompt", "<ring>"]
    assert shell_command(*words, windows=False) == \
        "python sample.py --embedding 'out dir\\learned_embeds.safetensors' --prompt '<ring>'"
    # cmd.exe takes double quotes only, and reads a bare <ring> as a redirection
    assert shell_command(*words, windows=True) == \
        'python sample.py --embedding "out dir\\learned_embeds.safetensors" --prompt "<ring>"'
    assert shell_command("say", 'a "b"', windows=True) == 'say "a \\"b\\""'


def test_writable_folders_are_found_by_trying(tmp_path, monkeypatch):
    from ldm import cli
    assert cli.can_write_in(tmp_path) and not cli.can_write_in(tmp_path / "missing")
    cli.check_writable(tmp_path / "new" / "run")  # a folder that can be made: no error
    # a file's name for a folder that does not exist yet: the user meant a file; one that exists is used
    for name in ("my-word.safetensors", "grid.PNG", "cat.pt", "model.pth"):
        expected = (f"--out {tmp_path / name}: looks like a file's name, but --out is the folder the files are "
                    f"written in; give a folder, such as --out {tmp_path / Path(name).stem}")
        with pytest.raises(cli.CLIError, match=re.escape(expected) + "$"):
            cli.check_writable(tmp_path / name)
        assert not (tmp_path / name).exists()
    (tmp_path / "old.png").mkdir()
    cli.check_writable(tmp_path / "old.png")
    cli.check_writable(tmp_path / "run.v2")
    # os.access says yes to every folder on Windows; what counts is whether a file can be made
    monkeypatch.setattr(cli, "can_write_in", lambda folder: False)
    with pytest.raises(cli.CLIError, match="this user cannot write to"):
        cli.check_writable(tmp_path)
    with pytest.raises(cli.CLIError, match="is not a writable folder"):
        cli.check_file_writable(tmp_path / "grid.png", "--grid")
    monkeypatch.undo()
    # no part of the path exists (a drive or network share that is not there): its drive is named
    monkeypatch.setattr(Path, "exists", lambda self: False)
    assert cli.blocking_path(Path("/no-such-share/runs")) == Path("/")
