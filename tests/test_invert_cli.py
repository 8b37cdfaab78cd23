"""invert.py end to end on a tiny random checkpoint: outputs, interop with sample.py, bad input."""
import copy
import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import invert
import sample
from ldm.cli import run


@pytest.fixture(scope="module")
def images(image_folder):
    """conftest's image_folder, under the name these tests give the training images."""
    return image_folder


def call(argv, capsys):
    rc = run(invert.main, argv, prog="invert.py")
    return rc, capsys.readouterr()


def method_data(method: str, images) -> list:
    """The arguments naming what a method learns from: HiPer one image and its prompt, the others a folder."""
    return (["--image", str(images / "0.png"), "--source", "a toy"] if method == "hiper"
            else ["--images", str(images), "--placeholder", "<toy>", "--init-word", "toy"])


def one_step_run(ckpt, images, out, capsys, method):
    """(its arguments, checkpoint path, checkpoint) of a one-step run of `method` into `out`."""
    base = ["--method", method, "--ckpt", str(ckpt), *method_data(method, images), "--batch", "1", "--steps", "1",
            "--out", str(out)]
    assert call(base, capsys)[0] == 0
    path = out / "checkpoint.pt"
    return base, path, torch.load(path, weights_only=True)


def test_training_writes_every_output_and_sample_py_reads_them(ckpt, images, tmp_path, capsys):
    out = tmp_path / "run"
    rc, cap = call(["--ckpt", str(ckpt), "--images", str(images), "--placeholder", "<toy>", "--init-word", "toy",
                    "--steps", "4", "--batch", "2", "--save-every", "2", "--out", str(out)], capsys)
    assert rc == 0, cap.err
    assert "effective lr = 0.005 x batch 2 = 0.01" in cap.out
    hint = (f"sample with: python sample.py --embedding {out / 'learned_embeds.safetensors'} "
            f"--prompt 'a photo of a <toy>' --ckpt {ckpt}")  # quoted for the shell, ready to paste
    assert hint in cap.out.splitlines()
    ours = load_file(out / "learned_embeds.safetensors")
    assert list(ours) == ["<toy>"] and ours["<toy>"].shape == (1, 32)
    # AUTOMATIC1111 calls a word by its file name, and 'toy' is already a word: toy-embedding.pt
    a1111 = torch.load(out / "toy-embedding.pt", weights_only=True)
    assert torch.equal(a1111["string_to_param"]["*"], ours["<toy>"]) and a1111["step"] == 4
    assert (out / "toy-embedding.safetensors").exists() and (out / "checkpoint.pt").exists()
    assert (out / "loss.csv").read_text().splitlines()[0] == "step,loss"
    assert len((out / "loss.csv").read_text().splitlines()) == 5
    assert (out / "samples" / "step-000004.png").exists()
    from safetensors import safe_open
    with safe_open(str(out / "learned_embeds.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["init_word"] == "toy" and meta["step"] == "4" and len(meta["base_model_hash"]) == 16
    assert meta["base_model"] == ckpt.name  # its name, not where it lies on this disk (the file gets shared)

    rc = sample.main(["--ckpt", str(ckpt), "--prompt", "a photo of <toy>", "--embedding",
                      str(out / "learned_embeds.safetensors"), "--n", "1", "--steps", "2", "--out", str(tmp_path / "s")])
    assert rc == 0
    pixels = lambda folder: np.asarray(Image.open(tmp_path / folder / "00000-0.png"))
    learned = pixels("s")
    for a1111_file in ("toy-embedding.pt", "toy-embedding.safetensors"):  # sample.py reads them, by that name
        folder = a1111_file.split(".")[1]
        rc = sample.main(["--ckpt", str(ckpt), "--prompt", "a photo of toy-embedding", "--embedding",
                          str(out / a1111_file), "--n", "1", "--steps", "2", "--out", str(tmp_path / folder)])
        assert rc == 0 and np.array_equal(pixels(folder), learned)  # the same vector in every file
    sample.main(["--ckpt", str(ckpt), "--prompt", "a photo of toy", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "init")])
    assert not np.array_equal(pixels("init"), learned)  # the word moved from its init word's embedding


@pytest.mark.parametrize("method", ["ti", "neti"])
def test_each_validation_grid_is_drawn_once(ckpt, images, tmp_path, capsys, monkeypatch, method):
    # --sample-every dividing --steps: the last grid was drawn by the loop and again at the end
    module = invert if method == "ti" else importlib.import_module("inversion.neti_cli")
    drawn, draw = [], module.write_validation_grid
    monkeypatch.setattr(module, "write_validation_grid", lambda *a, **kw: drawn.append(a[3].name) or draw(*a, **kw))
    rc, cap = call(["--method", method, "--ckpt", str(ckpt), "--images", str(images), "--placeholder", "<toy>",
                    "--init-word", "toy", "--steps", "2", "--batch", "2", "--sample-every", "1",
                    "--out", str(tmp_path / method)], capsys)
    assert rc == 0, cap.err
    assert drawn == ["step-000001.png", "step-000002.png"]


def test_resume_continues_to_the_same_result(ckpt, images, tmp_path, capsys):
    base = ["--ckpt", str(ckpt), "--images", str(images), "--placeholder", "<toy>", "--init-word", "toy",
            "--batch", "2", "--save-every", "2"]
    assert call(base + ["--steps", "4", "--out", str(tmp_path / "full")], capsys)[0] == 0
    assert call(base + ["--steps", "2", "--out", str(tmp_path / "part")], capsys)[0] == 0
    rc, cap = call(base + ["--steps", "4", "--out", str(tmp_path / "part"), "--resume"], capsys)
    assert rc == 0 and "resuming at step 2" in cap.out
    a = load_file(tmp_path / "full" / "learned_embeds.safetensors")["<toy>"]
    b = load_file(tmp_path / "part" / "learned_embeds.safetensors")["<toy>"]
    assert torch.equal(a, b)


def bad_cases(ckpt, images, tmp_path):
    unreadable = tmp_path / "bad_imgs"
    unreadable.mkdir()
    (unreadable / "broken.png").write_bytes(b"not a png")
    empty = tmp_path / "empty"
    empty.mkdir()
    used = tmp_path / "used"
    used.mkdir()
    (used / "checkpoint.pt").write_bytes(b"x")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    common = ["--ckpt", str(ckpt), "--images", str(images), "--placeholder", "<toy>", "--init-word", "toy"]
    return [
        (["--ckpt", str(tmp_path / "nope.safetensors"), "--images", str(images), "--placeholder", "<a>",
          "--init-word", "toy"], "no such file"),
        (["--ckpt", str(ckpt), "--images", str(tmp_path / "none"), "--placeholder", "<a>", "--init-word", "toy"],
         "no such file"),
        (["--ckpt", str(ckpt), "--images", str(unreadable), "--placeholder", "<a>", "--init-word", "toy"], "broken.png"),
        (["--ckpt", str(ckpt), "--images", str(empty), "--placeholder", "<a>", "--init-word", "toy"], "no images"),
        (["--ckpt", str(ckpt), "--images", str(images), "--placeholder", "<a>", "--init-word", "gold fish tank"],
         "one token"),
        (["--ckpt", str(ckpt), "--images", str(images), "--placeholder", "cat", "--init-word", "toy"], "already a word"),
        (["--ckpt", str(ckpt), "--images", str(images), "--placeholder", "hoto", "--init-word", "toy"],
         "part of the training prompt 'a photo of a {}'"),     # would turn 'photo' into 'p' + the new word
        (["--ckpt", str(ckpt), "--images", str(images)], "--placeholder"),
        (["--ckpt", str(ckpt), "--init-word", "gold fish tank"], "one token"),   # tiny world: nothing rendered
        (common + ["--steps", "0"], "--steps"),
        (common + ["--resume", "--out", str(tmp_path / "fresh")], "--resume"),
        (common + ["--out", str(used)], "already holds a run"),
        (common + ["--lr", "0"], "--lr"),                       # 0 was taken as "the default"
        (common + ["--lr", "-1"], "--lr"),                      # was a traceback from the optimizer
        (common + ["--progressive-every", "-1"], "--progressive-every"),
        (common + ["--sample-every", "-2"], "--sample-every"),
        (common + ["--resolution", "33"], "--resolution 33 must be a multiple of 4 for this model"),  # its U-Net
        (["--ckpt", str(ckpt), "--resolution", "64"], "--resolution"),  # tiny world: it would be ignored
        (common + ["--out", str(blocker / "run")], "--out"),    # was a traceback from mkdir
        (common + ["--out", str(blocker)], "--out"),
        (common + ["--method", "neti", "--lr", "0"], "--lr"),
        (common + ["--method", "hiper", "--lr", "-1"], "--lr"),
        # an option of another method would be ignored without a word
        (common + ["--tail", "3"], "--tail is not an option of --method ti; it belongs to --method hiper"),
        (common + ["--grad-accum", "2"], "--grad-accum is not an option of --method ti"),
        (["--ckpt", str(ckpt), "--method", "hiper", "--num-vectors", "2"], "--num-vectors is not an option"),
        (["--ckpt", str(ckpt), "--method", "hiper", "--images", str(images)], "belongs to --method ti and neti"),
        (["--ckpt", str(ckpt), "--method", "hiper", "--tai=3", "--sample-every", "5"], "--sample-every"),
        # an option that the other options leave nothing to do
        (common + ["--concept", "hourglass"], "with --images they have nothing to do"),
        (common + ["--method", "neti", "--num-images", "3"], "with --images they have nothing to do"),
        (common + ["--per-image-prob", "0.3"], "needs --per-image-tokens"),
        (common + ["--per-image-tokens", "--per-image-prob", "1.5"], "--per-image-prob: must be between 0 and 1"),
        (common + ["--progressive-every", "10"], "--num-vectors 2 or more"),
        # were tracebacks, or failed only after training
        (common + ["--seed", "-1"], "--seed"),
        (common + ["--reg-weight", "inf"], "--reg-weight"),
        (common + ["--resolution", "100000"], "--resolution"),
        (common[:4] + ["--placeholder", " ", "--init-word", "toy"], "is empty"),  # blank: refused as it is parsed
        (common[:4] + ["--placeholder", "<" + "q" * 300 + ">", "--init-word", "toy"], "at most 64"),
        (common + ["--num-vectors", "100"], "has room for"),
        (common + ["--placeholder", "<a\udcffb>"], "not valid UTF-8"),
        (["--ckpt", str(ckpt), "--num-images", "100000"], "--num-images"),
        (["--ckpt", str(ckpt), "--method", "hiper", "--image", str(images / "0.png"), "--source", " "], "--source is empty"),
        (["--ckpt", str(ckpt), "--method", "hiper", "--image", str(images), "--source", "a dog"], "is a folder"),
        # overflowed only after the model was loaded, or named a file too long for the disk after training
        (common + ["--batch", str(2 ** 64)], "--batch: must be between 1 and 1024"),
        (common + ["--method", "neti", "--grad-accum", str(10 ** 20)], "--grad-accum: must be between 1 and 1024"),
        (common[:4] + ["--placeholder", "\U0001d400" * 64, "--init-word", "toy"],
         "256 bytes in UTF-8; at most 64 and 128"),
        *([(["--ckpt", str(ckpt), "--method", "hiper", "--image", os.devnull, "--source", "a dog"],
            "is not a regular file")] if os.name == "posix" else []),
    ]


def test_bad_input_gives_one_line_nonzero_exit_and_no_files(ckpt, images, tmp_path, capsys):
    for argv, message in bad_cases(ckpt, images, tmp_path):
        out = tmp_path / "out_bad"
        if "--out" not in argv:
            argv = argv + ["--out", str(out)]
        rc, cap = call(argv, capsys)
        lines = cap.err.strip().splitlines()
        assert rc == 2, (argv, cap.err)
        assert len(lines) == 1 and message in lines[0], (message, cap.err)
        assert not out.exists() or not any(out.rglob("*.*")), argv


@pytest.mark.parametrize("damage", [b"garbage", None], ids=["text", "cut-short"])
def test_a_damaged_checkpoint_on_resume_is_one_line(ckpt, images, tmp_path, capsys, damage):
    base = ["--ckpt", str(ckpt), "--images", str(images), "--placeholder", "<toy>", "--init-word", "toy",
            "--batch", "2", "--steps", "2", "--out", str(tmp_path)]
    assert call(base, capsys)[0] == 0
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(damage if damage is not None else checkpoint.read_bytes()[:2000])
    rc, cap = call(base + ["--steps", "4", "--resume"], capsys)
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "checkpoint.pt is damaged" in lines[0], cap.err
    assert "Weights only load failed" not in lines[0]   # torch's preamble; the reason is what follows it


def test_resume_refuses_other_images(ckpt, images, tmp_path, capsys):
    base = ["--ckpt", str(ckpt), "--placeholder", "<toy>", "--init-word", "toy", "--batch", "2", "--steps", "2",
            "--out", str(tmp_path / "run")]
    assert call(base + ["--images", str(images)], capsys)[0] == 0
    other = tmp_path / "other"
    other.mkdir()
    for f in images.iterdir():
        Image.open(f).transpose(Image.FLIP_TOP_BOTTOM).save(other / f.name)
    rc, cap = call(base + ["--images", str(other), "--steps", "4", "--resume"], capsys)
    assert rc == 2 and "other images" in cap.err


@pytest.mark.parametrize("method", ["ti", "neti", "hiper"])
def test_resume_refuses_a_checkpoint_of_another_base_model_and_takes_the_same_one_in_another_layout(
        ckpt, images, tmp_path, capsys, method):
    """The checkpoint records the base model as the learned files do (file and weights hashes):
    --resume on another model is one line; the diffusers folder of the same weights resumes."""
    import ldm
    from conftest import write_random_checkpoint
    data = method_data(method, images)
    base = ["--method", method, *data, "--batch", "1", "--out", str(tmp_path / "run")]
    assert call(base + ["--ckpt", str(ckpt), "--steps", "1"], capsys)[0] == 0
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["base_model"]
    assert saved["base_model"] == ckpt.name and len(saved["base_model_weights"]) == 16
    other = write_random_checkpoint(tmp_path / "other", seed=7)
    rc, cap = call(base + ["--ckpt", str(other), "--steps", "2", "--resume"], capsys)
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, cap.err
    assert "checkpoint.pt was trained on another base model (hash " in lines[0]
    assert f"resume with the --ckpt it was trained on ({ckpt.name})" in lines[0]
    folder = ldm.save(ldm.load(ckpt), tmp_path / "folder")
    rc, cap = call(base + ["--ckpt", str(folder), "--steps", "2", "--resume"], capsys)
    assert rc == 0 and "resuming at step 1" in cap.out, cap.err


@pytest.mark.parametrize("method, learned", [("ti", "learned_embeds.safetensors"), ("neti", "neti_mapper.safetensors"),
                                             ("hiper", "hiper_tail.safetensors")])
def test_gradient_checkpointing_learns_the_same_numbers(ckpt, images, tmp_path, capsys, monkeypatch, method, learned):
    """--gradient-checkpointing changes what the backward pass keeps, not what it computes: the
    learned file is the same bit for bit, and the U-Net really ran with it."""
    import ldm.unet
    data = method_data(method, images)
    base = ["--method", method, "--ckpt", str(ckpt), *data, "--batch", "2", "--steps", "2"]
    blocks = []
    run_block = ldm.unet.UNetModel.run_block
    monkeypatch.setattr(ldm.unet.UNetModel, "run_block",
                        lambda self, *a: blocks.append(self.gradient_checkpointing) or run_block(self, *a))
    files = {}
    for flag in ([], ["--gradient-checkpointing"]):
        out = tmp_path / ("gc" if flag else "plain")
        blocks.clear()
        assert call(base + flag + ["--out", str(out)], capsys)[0] == 0
        assert blocks and any(blocks) == bool(flag)
        files[bool(flag)] = load_file(out / learned)
    assert files[True].keys() == files[False].keys()
    assert all(torch.equal(files[True][k], files[False][k]) for k in files[False])


def test_out_of_memory_is_one_line(capsys):
    def main(argv):   # what the CPU allocator raises for a --batch that does not fit
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")
    assert run(main, [], prog="invert.py") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0] and "smaller --batch" in err[0]
    assert run(lambda argv: (_ for _ in ()).throw(MemoryError()), [], prog="invert.py") == 1
    capsys.readouterr()
    elsewhere = {  # the CPU allocator on Windows; Apple's GPU, which raises a plain RuntimeError
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate "
        "2147483648 bytes.": "could not allocate 2.0 GiB",
        "MPS backend out of memory (MPS allocated: 17.82 GB, other allocations: 1.20 GB, max allowed: 18.13 GB). "
        "Tried to allocate 640.00 MiB on private pool.": "Tried to allocate 640.00 MiB"}
    for message, hint in elsewhere.items():
        def main(argv, message=message):
            raise RuntimeError(message)
        assert run(main, [], prog="invert.py") == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"out of memory ({hint})" in err[0], err


@pytest.mark.parametrize("method", ["ti", "neti", "hiper"])
def test_out_of_memory_advice_names_only_options_of_the_method(method, monkeypatch, capsys, tmp_path):
    import re

    def no_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    monkeypatch.setattr(invert, "load_model", no_memory)
    rc = run(invert.main, ["--method", method, "--out", str(tmp_path / "o")], prog="invert.py")
    err = capsys.readouterr().err.strip()
    advised = {flag[2:].replace("-", "_") for flag in re.findall(r"--[a-z][a-z-]*", err)}
    assert rc == 1 and "Tried to allocate 20.00 MiB" in err and advised, err
    assert advised <= invert.build_parser().method_options[method], err  # was --resolution, refused by hiper


def test_the_pair_of_files_for_automatic1111_never_takes_a_name_that_is_taken():
    from clip import Tokenizer
    names = lambda word: [p.name for p in invert.output_files(Path("out"), word, Tokenizer())]
    assert names("<cat-toy>") == ["learned_embeds.safetensors", "cat-toy.pt", "cat-toy.safetensors"]
    assert names("<toy>")[1] == "toy-embedding.pt"  # a word of the vocabulary
    # our own file, which it would overwrite, and Windows' devices, in any case: no files there
    for word, safe in [("<learned_embeds>", "learned_embeds"), ("<NUL>", "NUL"), ("<com1>", "com1"),
                       ("<Lpt9>", "Lpt9"), ("<checkpoint>", "checkpoint")]:
        assert names(word)[1:] == [f"{safe}-embedding.pt", f"{safe}-embedding.safetensors"], word


def test_one_image_is_allowed_with_a_warning(ckpt, tmp_path, capsys):
    folder = tmp_path / "one"
    folder.mkdir()
    Image.new("RGB", (16, 16), "red").save(folder / "a.png")
    rc, cap = call(["--ckpt", str(ckpt), "--images", str(folder), "--placeholder", "<r>", "--init-word", "toy",
                    "--steps", "1", "--batch", "1", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0 and "one training image" in cap.err


def test_each_method_takes_its_options_and_only_those():
    """Every option belongs to some method; a method's help lists the shared options it takes;
    the options given are found in any spelling argparse accepts, defaults are left as they were."""
    parser = invert.build_parser()
    every = {a.dest for a in parser._actions} - {"help"}
    assert set().union(*parser.method_options.values()) == every
    assert {"tail", "image", "source"} <= parser.method_options["hiper"] - parser.method_options["ti"]
    assert {"grad_accum", "no_bypass"} <= parser.method_options["neti"] - parser.method_options["ti"]
    assert "num_vectors" in parser.method_options["ti"] - parser.method_options["neti"]
    assert parser.given_options(["--method", "hiper", "--tai=3", "--no-ev", "--steps", "2"]) == \
        {"method", "tail", "no_eval", "steps"}
    assert parser.given_options([]) == set()
    assert parser.parse_args([]).tail == 5 and parser.parse_args([]).method == "ti"
    helps = {g.title: g.description or "" for g in parser._action_groups}
    assert "also uses --steps, --lr" in helps["HiPer (--method hiper)"]
    assert "--init-word" in helps["NeTI (--method neti)"]


def test_help_shows_defaults_only_where_there_is_one(capsys):
    with pytest.raises(SystemExit):
        invert.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "how many to render (default: 5)" in text
    assert "(default: weights/tiny.safetensors)" in text and text.count("tiny.safetensors") == 1


def test_help_shows_the_examples_as_written(capsys):
    for main in (invert.main, sample.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        lines = capsys.readouterr().out.splitlines()
        examples = [l for l in lines if l.startswith("    python ")]
        assert len(examples) >= 2 and all(l in main.__globals__["__doc__"] for l in examples)


@pytest.mark.parametrize("columns", ["60", "80", "100"])
def test_help_never_splits_an_option_name_over_two_lines(columns, monkeypatch, capsys):
    import re
    monkeypatch.setenv("COLUMNS", columns)  # argparse wraps to it
    for main in (invert.main, sample.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) > 20 and not [l for l in lines if re.search(r"[A-Za-z]-$", l)], main.__module__


def test_an_os_error_mid_run_is_one_line(capsys):
    def main(argv):   # e.g. a disk that fills up while a run writes its files
        raise OSError(28, "No space left on device", "outputs/inversion/loss.csv")
    assert run(main, [], prog="invert.py") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["invert.py: error: outputs/inversion/loss.csv: No space left on device"]


def test_an_os_error_without_a_path_keeps_its_reason(capsys):
    def main(argv):
        raise OSError(5, "Input/output error")
    assert run(main, [], prog="sample.py") == 1
    assert capsys.readouterr().err.strip() == "sample.py: error: Input/output error"


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_sigterm_saves_what_was_learned_like_ctrl_c(ckpt, images, tmp_path, signum):
    """`kill` or a job scheduler's time limit (SIGTERM) stops training as Ctrl-C (SIGINT) does: the
    word and the checkpoint are saved where it stopped, one line says so, and --resume continues."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    out = tmp_path / "run"
    argv = [sys.executable, "invert.py", "--ckpt", str(ckpt), "--images", str(images), "--placeholder", "<toy>",
            "--init-word", "toy", "--batch", "1", "--save-every", "100000", "--steps", "100000", "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("training '<toy>'")
    time.sleep(3)  # some steps
    proc.send_signal(getattr(signal, signum))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "(continue with --resume)" in last and "Traceback" not in err
    step = int(last.split("interrupted at step ")[1].split(":")[0])
    assert step > 0 and torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step
    assert load_file(out / "learned_embeds.safetensors")["<toy>"].shape == (1, 32)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="finds torch loading in /proc (Linux)")
@pytest.mark.parametrize("script", ["invert.py", "sample.py"])
def test_ctrl_c_while_torch_loads_is_one_line(script):
    """Ctrl-C in the first second or two, while the script's imports load torch, ends the program
    as a later Ctrl-C does: status 130 and one line, no traceback from inside torch."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    proc = subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.time() + 60
    while "libtorch" not in maps.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)  # until torch's library is loaded: the import goes on for a while after it
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == f"{script}: interrupted" and out == ""


def test_files_of_invert_py_given_to_the_wrong_option_say_where_they_go(ckpt, images, tmp_path, capsys):
    """Every file a run writes, handed to --ckpt (or a checkpoint to --embedding), is named in one
    line that says where it goes."""
    import ldm
    from ldm.files import LoadError
    common = ["--ckpt", str(ckpt), "--steps", "1", "--batch", "1", "--no-eval"]
    word = ["--images", str(images), "--placeholder", "<toy>", "--init-word", "toy"]
    for method, extra in (("ti", word), ("neti", word), ("hiper", [])):
        rc, cap = call(["--method", method, *common, *extra, "--out", str(tmp_path / method)], capsys)
        assert rc == 0, cap.err
    expected = {"ti/checkpoint.pt": "invert.py's training checkpoint (for --resume)",
                "neti/checkpoint.pt": "invert.py's training checkpoint (for --resume)",
                "hiper/checkpoint.pt": "invert.py's training checkpoint (for --resume)",
                "ti/learned_embeds.safetensors": "textual-inversion embedding, not a model; load it with sample.py --embedding",
                "ti/toy-embedding.safetensors": "textual-inversion embedding",
                "ti/toy-embedding.pt": "textual-inversion embedding",
                "neti/neti_mapper.safetensors": "NeTI mapper, not a model; load it with sample.py --neti",
                "hiper/hiper_tail.safetensors": "HiPer tail, not a model; load it with sample.py --hiper"}
    for name, message in expected.items():
        with pytest.raises(LoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ldm.load(tmp_path / name)
    rc = run(sample.main, ["--ckpt", str(ckpt), "--prompt", "a <toy>", "--embedding", str(tmp_path / "ti/checkpoint.pt"),
                           "--out", str(tmp_path / "s")], prog="sample.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is invert.py's training checkpoint (for --resume)" in err[0]
    assert not (tmp_path / "s").exists()
    for option, folder, file in (("--neti", "neti", "neti_mapper.safetensors"), ("--hiper", "hiper", "hiper_tail.safetensors")):
        rc = run(sample.main, ["--ckpt", str(ckpt), "--prompt", "a <toy>", option, str(tmp_path / folder),
                               "--out", str(tmp_path / "s")], prog="sample.py")
        assert rc == 2 and f"is a folder; give the file in it ({file})" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ti", "neti"])
def test_the_validation_grid_is_drawn_at_the_training_resolution(ckpt, images, tmp_path, capsys, method):
    """--resolution 32 on a 16-px model: the grid's images are 32 px (they were drawn at the
    model's size, which for SD v1 at --resolution 256 meant 512-px grids: minutes on a CPU)."""
    rc, cap = call(["--method", method, "--ckpt", str(ckpt), "--images", str(images), "--placeholder", "<toy>",
                    "--init-word", "toy", "--steps", "1", "--batch", "1", "--resolution", "32",
                    "--validation-prompt", "a <toy>", "--out", str(tmp_path / "run")], capsys)
    assert rc == 0 and "trained 1 step in" in cap.out, cap.err  # was "1 steps"
    with Image.open(tmp_path / "run" / "samples" / "step-000001.png") as grid:
        assert grid.size == (4 * 32, 4 * 32)  # one 32-px image, shown 4x


def test_a_slow_picture_of_a_training_run_has_a_progress_bar(ckpt, tmp_path, capsys):
    import ldm
    from ldm.generate import save_prompt_row
    model = ldm.load(ckpt)
    save_prompt_row(model, ["a toy", "a cat"], tmp_path / "grid.png", steps=3, desc="validation grid")
    err = capsys.readouterr().err
    assert "validation grid" in err and "3/3" in err and (tmp_path / "grid.png").exists()
    save_prompt_row(model, ["a toy"], tmp_path / "quiet.png", steps=3)  # the tiny world's: no bar
    assert capsys.readouterr().err == ""


def test_a_bar_inside_another_writes_no_escape_codes_to_a_log_file(ckpt, tmp_path, capsys):
    """Into a file (here pytest's capture), the validation grid's bar, opened while the training bar
    is, does not move the cursor up: a log file would keep the escape code."""
    import ldm
    from ldm.cli import progress_bar
    from ldm.generate import save_prompt_row
    model = ldm.load(ckpt)
    training = progress_bar(2, "training")
    training.update(1)
    save_prompt_row(model, ["a toy"], tmp_path / "grid.png", steps=3, desc="validation grid")
    training.update(1)
    training.close()
    err = capsys.readouterr().err
    assert "validation grid" in err and "3/3" in err and "2/2" in err
    assert "\x1b[" not in err


@pytest.mark.parametrize("method", ["ti", "neti"])
def test_validation_prompts_make_the_grid(ckpt, images, tmp_path, capsys, method):
    base = ["--method", method, "--ckpt", str(ckpt), "--images", str(images), "--placeholder", "<toy>",
            "--init-word", "toy", "--steps", "1", "--batch", "1"]
    rc, cap = call(base + ["--out", str(tmp_path / "run"), "--validation-prompt", "a <toy> on the left",
                           "--validation-prompt", "a blue <toy>", "--validation-prompt", "<toy>"], capsys)
    assert rc == 0, cap.err
    with Image.open(tmp_path / "run" / "samples" / "step-000001.png") as grid:
        assert grid.size == (3 * 4 * 16, 4 * 16)  # one 16-px image per prompt, shown 4x
    rc, cap = call(base + ["--out", str(tmp_path / "bad"), "--validation-prompt", "a dog"], capsys)
    assert rc == 2 and cap.err.strip().splitlines() == [
        "invert.py: error: --validation-prompt 'a dog' does not use the word '<toy>'; write it in the prompt, "
        "e.g. 'a <toy> on the beach'"]
    assert not (tmp_path / "bad").exists()
    rc, cap = call(base + ["--out", str(tmp_path / "long"), "--validation-prompt", "red " * 80 + "<toy>"], capsys)
    assert rc == 2 and "would be cut off" in cap.err and not (tmp_path / "long").exists()


def test_a_run_does_not_import_the_compiler_stack(ckpt, images, tmp_path):
    """Loading a model, training a word and sampling with it import nothing of torch._dynamo (70 MB, 1.7 s):
    no random draw on the meta device, the optimizer written out (inversion/adam.py)."""
    import subprocess
    import sys
    from conftest import ROOT
    code = ("import sys, invert\n"
            f"rc = invert.main(['--ckpt', {str(ckpt)!r}, '--images', {str(images)!r}, '--placeholder', '<toy>', "
            f"'--init-word', 'toy', '--steps', '2', '--batch', '1', '--out', {str(tmp_path / 'run')!r}])\n"
            "import sample\n"
            f"rc += sample.main(['--ckpt', {str(ckpt)!r}, '--prompt', 'a <toy>', '--n', '1', '--steps', '2', "
            f"'--embedding', {str(tmp_path / 'run' / 'learned_embeds.safetensors')!r}, '--out', {str(tmp_path / 's')!r}])\n"
            "print(rc, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 False"


@pytest.mark.parametrize("method", ["ti", "neti", "hiper"])
def test_ctrl_c_in_each_method_names_what_it_saved_and_resume_finishes(ckpt, images, tmp_path, capsys, monkeypatch,
                                                                        method):
    from pathlib import Path
    from inversion.hiper import HiPer
    from inversion.neti import NeTI
    from inversion.textual_inversion import TextualInversion
    trainer_class = {"ti": TextualInversion, "neti": NeTI, "hiper": HiPer}[method]
    step = trainer_class.train_step

    def stopped_at_step_2(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(trainer_class, "train_step", stopped_at_step_2)
    data = method_data(method, images)
    argv = ["--method", method, "--ckpt", str(ckpt), *data, "--steps", "4", "--batch", "1", "--out", str(tmp_path)]
    rc, cap = call(argv, capsys)
    last = cap.err.strip().splitlines()[-1]
    assert rc == 130 and last.startswith("interrupted at step 2: saved "), cap.err
    learned, checkpoint = last.split("saved ")[1].split(" (continue")[0].split(" and ")
    assert Path(learned).is_file() and Path(checkpoint) == tmp_path / "checkpoint.pt" and Path(checkpoint).is_file()
    monkeypatch.undo()
    rc, cap = call(argv + ["--resume"], capsys)
    assert rc == 0 and "resuming at step 2" in cap.out, cap.err


def test_ctrl_c_in_the_last_validation_grid_says_the_training_is_complete(ckpt, images, tmp_path, capsys,
                                                                         monkeypatch):
    """After the last step only the validation grid is left: a Ctrl-C there does not send the
    user to --resume, which has nothing left to train."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(invert, "write_validation_grid", interrupted)
    rc, cap = call(["--ckpt", str(ckpt), "--images", str(images), "--placeholder", "<toy>", "--init-word", "toy",
                    "--steps", "2", "--batch", "1", "--out", str(tmp_path)], capsys)
    last = cap.err.strip().splitlines()[-1]
    assert rc == 130 and last.startswith("interrupted after the last step, 2: saved "), cap.err
    assert last.endswith("the training is complete, its last validation grid was not drawn")
    assert (tmp_path / "learned_embeds.safetensors").is_file()


@pytest.mark.parametrize("method", ["ti", "neti", "hiper"])
def test_a_step_that_makes_the_values_nan_stops_in_one_line_and_saves_nothing(ckpt, images, tmp_path, capsys,
                                                                              monkeypatch, method):
    from inversion.adam import AdamW
    real_step = AdamW.step

    def overflowing_step(self):  # what a step far too large does to the numbers (in float16, say)
        real_step(self)
        for p in self.params:
            p.data.fill_(float("inf"))
    monkeypatch.setattr(AdamW, "step", overflowing_step)
    data = method_data(method, images)
    rc, cap = call(["--method", method, "--ckpt", str(ckpt), *data, "--steps", "2", "--batch", "1",
                    "--out", str(tmp_path)], capsys)
    err = cap.err.strip().splitlines()
    assert rc == 2 and "made the learned values NaN or infinite" in err[-1] and "lower --lr" in err[-1], cap.err
    assert not any(p.suffix in (".safetensors", ".pt") for p in tmp_path.iterdir())


def test_a_learning_rate_above_1_is_refused(capsys):
    """Adam moves each number by about the learning rate a step: 1000 only threw the vector about
    (the loss stayed small), and 1e37 overflowed float32 in the optimizer (a traceback)."""
    for lr in ("1000", "1e37", "1.5"):
        rc, cap = call(["--lr", lr, "--steps", "1"], capsys)
        assert rc == 2 and "--lr: must be > 0 and at most 1" in cap.err, cap.err


@pytest.mark.parametrize("option", ["--out", "--placeholder", "--init-word", "--ckpt", "--images"])
def test_an_empty_value_is_refused_not_taken_as_the_default_or_the_current_folder(tmp_path, capsys, monkeypatch,
                                                                                  option):
    monkeypatch.chdir(tmp_path)
    rc, cap = call([f"{option}=", "--steps", "1"], capsys)
    hint = "; give a file or folder" if option in ("--out", "--ckpt", "--images") else ""
    assert rc == 2 and cap.err.strip().splitlines() == [f"invert.py: error: argument {option}: is empty{hint} (see --help)"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["ti", "neti", "hiper"])
@pytest.mark.parametrize("alter", ["no optimizer", "wrong shape", "optimizer of more tensors"])
def test_an_altered_checkpoint_on_resume_is_one_line(ckpt, images, tmp_path, capsys, method, alter):
    base, path, state = one_step_run(ckpt, images, tmp_path, capsys, method)
    if alter == "no optimizer":
        del state["optimizer"]
    elif alter == "optimizer of more tensors":
        state["optimizer"]["param_groups"][0]["params"] += [99]
    else:
        learned = next(k for k in ("vectors", "mapper", "tail") if k in state)
        state[learned] = ([torch.zeros(7, 3)] if learned == "vectors" else
                          {k: torch.zeros(3) for k in state[learned]} if learned == "mapper" else torch.zeros(7, 3))
    torch.save(state, path)
    rc, cap = call(base[:-4] + ["--steps", "2", "--resume", "--out", str(tmp_path)], capsys)
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "is an incomplete or altered checkpoint" in lines[0], cap.err


@pytest.mark.parametrize("method, name, kind", [
    ("ti", "samples", "file"), ("ti", "learned_embeds.safetensors", "folder"), ("ti", "toy-embedding.pt", "folder"),
    ("ti", "loss.csv", "folder"), ("neti", "neti_mapper.safetensors", "folder"), ("hiper", "source.png", "folder"),
    ("hiper", "hiper_tail.safetensors", "folder"), ("ti", "samples", "broken link")])
def test_an_output_name_taken_by_the_other_kind_inside_out_is_refused_before_training(ckpt, images, tmp_path, capsys,
                                                                                      method, name, kind):
    data = method_data(method, images)
    if kind == "broken link":  # trained to the end, then "File exists"
        (tmp_path / name).symlink_to(tmp_path / "nowhere" / "x")
        kind = "link to something that does not exist"
    else:
        (tmp_path / name).mkdir() if kind == "folder" else (tmp_path / name).write_text("")
    rc, cap = call(["--method", method, "--ckpt", str(ckpt), *data, "--batch", "1", "--steps", "2",
                    "--out", str(tmp_path)], capsys)
    lines = cap.err.strip().splitlines()
    # was a traceback, or "Is a directory", at the first save: after the training
    assert rc == 2 and len(lines) == 1 and f"{tmp_path / name} is a {kind}" in lines[0], cap.err
    assert [p.name for p in tmp_path.iterdir()] == [name]


def altered(state: dict, how: str) -> dict:
    """A copy of a checkpoint with one field changed the way a hand or another tool might."""
    state = copy.deepcopy(state)
    learned = next(k for k in ("vectors", "mapper", "tail") if k in state)
    if how == "step as text":
        state["step"] = "1"
    elif how == "negative step":
        state["step"] = -5
    elif how == "losses as a list":
        state["losses"] = [[1, 0.5]]
    elif how == "losses of another shape":
        state["losses"] = torch.zeros(3)
    elif how == "one number for many":  # copy_ broadcast it over every learned number
        if learned == "mapper":
            state["mapper"] = {k: v.flatten()[:1] for k, v in state["mapper"].items()}
        else:
            state[learned] = ([v.flatten()[:1] for v in state[learned]] if learned == "vectors"
                              else state[learned].flatten()[:1])
    elif how == "no vectors":  # zip() over nothing restored nothing
        state[learned] = [] if learned == "vectors" else {} if learned == "mapper" else torch.zeros(0)
    elif how == "NaN values":
        if learned == "mapper":
            state["mapper"] = {k: v * float("nan") for k, v in state["mapper"].items()}
        else:
            state[learned] = [v * float("nan") for v in state[learned]] if learned == "vectors" \
                else state[learned] * float("nan")
    elif how == "moments of another shape":
        for moments in state["optimizer"]["state"].values():
            moments["exp_avg"] = moments["exp_avg"].flatten()[:1]
    elif how == "Adam's step count negative":  # divided by zero at the next step
        for moments in state["optimizer"]["state"].values():
            moments["step"] = torch.tensor(-1.0)
    elif how == "Adam's step count as text":
        for moments in state["optimizer"]["state"].values():
            moments["step"] = "x"
    elif how == "NaN losses":  # failed as loss.csv was written, after the training
        state["losses"] = torch.full((2, 2), float("nan"))
    elif how == "base model hash as a number":
        state["base_model"] = {"base_model_hash": 5}
    return state


@pytest.mark.parametrize("method", ["ti", "neti", "hiper"])
def test_a_checkpoint_with_fields_of_another_type_or_shape_is_one_line_on_resume(ckpt, images, tmp_path, capsys,
                                                                                  method):
    base, path, state = one_step_run(ckpt, images, tmp_path, capsys, method)
    learned = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".safetensors", ".pt"))
    for how in ("step as text", "negative step", "losses as a list", "losses of another shape", "one number for many",
                "no vectors", "NaN values", "moments of another shape", "Adam's step count negative",
                "Adam's step count as text", "NaN losses", "base model hash as a number"):
        torch.save(altered(state, how), path)
        before = {name: (tmp_path / name).read_bytes() for name in learned if name != "checkpoint.pt"}
        rc, cap = call(base[:-4] + ["--steps", "2", "--resume", "--out", str(tmp_path)], capsys)
        lines = cap.err.strip().splitlines()
        # were tracebacks, a run resumed from the initial vectors, or "lower --lr" for numbers never learned
        assert rc == 2 and len(lines) == 1 and "is an incomplete or altered checkpoint" in lines[0], (how, cap.err)
        assert "--lr" not in lines[0], (how, lines)
        assert all((tmp_path / name).read_bytes() == data for name, data in before.items()), how  # untouched


def test_resume_of_a_finished_run_asks_for_more_steps_and_short_progressive_runs_are_warned(ckpt, images, tmp_path,
                                                                                            capsys):
    base = ["--ckpt", str(ckpt), "--images", str(images), "--placeholder", "<toy>", "--init-word", "toy",
            "--batch", "1", "--num-vectors", "3", "--progressive-every", "2", "--out", str(tmp_path / "my run $x")]
    rc, cap = call(base + ["--steps", "3"], capsys)
    assert rc == 0 and "warning: --steps 3 ends before the word has its 3 vectors" in cap.err
    import shlex
    hint = next(line for line in cap.out.splitlines() if line.startswith("sample with: "))
    assert shlex.split(hint[len("sample with: "):])[3] == str(tmp_path / "my run $x" / "learned_embeds.safetensors")
    rc, cap = call(base + ["--steps", "3", "--resume"], capsys)
    assert rc == 2 and "is at step 3 already; give --steps above 3" in cap.err
    rc, cap = call(base + ["--steps", "5", "--resume"], capsys)
    assert rc == 0 and "resuming at step 3" in cap.out and "ends before" not in cap.err


def test_a_refused_resume_leaves_the_rendered_training_images_as_they_were(ckpt, tmp_path, capsys):
    base = ["--ckpt", str(ckpt), "--num-images", "2", "--batch", "1", "--no-eval", "--out", str(tmp_path)]
    assert call(base + ["--steps", "1"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "train_images").iterdir()}
    rc, cap = call(base + ["--steps", "2", "--seed", "1", "--num-images", "3", "--resume"], capsys)
    assert rc == 2 and "other images" in cap.err
    assert {p.name: p.read_bytes() for p in (tmp_path / "train_images").iterdir()} == before


def test_each_method_has_its_own_default_output_folder(ckpt, images, tmp_path, monkeypatch, capsys):
    """Without --out, each method writes to outputs/<method>, so that the README's commands run one
    after another: a NeTI or HiPer run is not refused because a Textual Inversion run came first."""
    monkeypatch.chdir(tmp_path)
    word = ["--images", str(images), "--placeholder", "<toy>", "--init-word", "toy"]
    image = sorted(images.iterdir())[0]
    runs = {"textual_inversion": (word, "learned_embeds.safetensors"),
            "neti": (["--method", "neti", *word], "neti_mapper.safetensors"),
            "hiper": (["--method", "hiper", "--image", str(image), "--source", "a red circle"], "hiper_tail.safetensors")}
    for folder, (argv, learned) in runs.items():
        rc, cap = call(["--ckpt", str(ckpt), "--steps", "1", "--batch", "1", *argv], capsys)
        assert rc == 0, cap.err
        assert (tmp_path / "outputs" / folder / learned).is_file() and (tmp_path / "outputs" / folder / "checkpoint.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == sorted(runs)
    rc, cap = call(["--ckpt", str(ckpt), "--steps", "1", "--batch", "1", *word], capsys)  # the same run again
    assert rc == 2 and f"{Path('outputs') / 'textual_inversion'} already holds a run: pass --resume" in cap.err
