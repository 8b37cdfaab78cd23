"""What the tools say when a file cannot be read or written: the file's own name, and the
reason in words a user can act on."""
import os

import pytest

from ldm.files import atomic_write, load_error_reason, read_failure


def test_a_text_file_named_as_a_checkpoint_is_said_to_be_no_such_file(tmp_path):
    for name, expected in (("x.ckpt", "not a PyTorch file"), ("x.pt", "not a PyTorch file"),
                           ("x.safetensors", "not a safetensors file")):
        path = tmp_path / name
        path.write_text("<html>not found</html>\n" * 20)
        assert expected in read_failure(path, KeyError("101"))
    cut = tmp_path / "cut.safetensors"  # a safetensors header that promises more than the file holds
    cut.write_bytes((5000).to_bytes(8, "little") + b'{"a": ' + bytes(100))
    assert read_failure(cut, KeyError("101")) == ("it is cut off: its header alone is 5,008 bytes and the file "
                                                  "has 114; download it again")
    good = tmp_path / "zip.ckpt"
    good.write_bytes(b"PK\x03\x04" + bytes(100))  # a zip archive's start: the error's own words are kept
    assert read_failure(good, RuntimeError("bad zip")) == "bad zip"


def test_a_long_reason_ends_at_a_sentence_or_a_word():
    long = "The file is damaged. " + "If you are seeing this error, there is a high chance " * 5
    assert load_error_reason(RuntimeError(long)) == "The file is damaged."
    words = load_error_reason(RuntimeError("word " * 60))
    assert words.endswith(" ...") and len(words) <= 165 and "wor ..." not in words


def test_a_failed_write_names_the_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "learned.safetensors"

    def fails(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("basic_ios::clear: iostream error")   # what torch.save raises on a full disk

    with pytest.raises(OSError) as e:
        atomic_write(target, fails)
    assert e.value.filename == str(target) and "could not be written" in e.value.strerror
    assert list(tmp_path.iterdir()) == []
    folder = tmp_path / "grid.png"
    folder.mkdir()
    with pytest.raises(OSError) as e:
        atomic_write(folder, lambda tmp: open(tmp, "wb").write(b"png"))
    assert e.value.filename == str(folder) and [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_a_bug_in_the_writer_is_raised_as_it_is(tmp_path):
    with pytest.raises(ValueError):
        atomic_write(tmp_path / "x", lambda tmp: (_ for _ in ()).throw(ValueError("a bug")))
    assert list(tmp_path.iterdir()) == []


def test_a_file_held_open_on_windows_is_tried_again(tmp_path, monkeypatch):
    import os
    import ldm.files as files
    real, calls = os.replace, []

    def held_twice(src, dst):  # what Windows says while a virus scanner reads the file just written
        calls.append(dst)
        if len(calls) <= 2:
            raise PermissionError(13, "The process cannot access the file", str(dst))
        real(src, dst)
    monkeypatch.setattr(files.os, "replace", held_twice)
    monkeypatch.setattr(files.time, "sleep", lambda s: None)
    monkeypatch.setattr(files, "WINDOWS", True)
    atomic_write(tmp_path / "loss.csv", lambda tmp: open(tmp, "w").write("step,loss\n"))
    assert len(calls) == 3 and (tmp_path / "loss.csv").read_text() == "step,loss\n"
    calls.clear()
    monkeypatch.setattr(files, "WINDOWS", False)  # elsewhere a refusal is final: no waiting
    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "other.csv", lambda tmp: open(tmp, "w").write("x"))
    assert len(calls) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["loss.csv"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX's")
def test_a_named_pipe_given_as_a_file_is_refused_not_read(tmp_path):
    """Reading a pipe blocks until something writes to it: --ckpt, --embedding and --images
    FILE waited for ever. In a child process, so that a regression fails here instead of hanging."""
    import subprocess
    import sys
    from conftest import ROOT
    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)
    code = """if True:
        import sys, ldm
        from inversion.data import DataError, image_files
        from inversion.files import EmbeddingError, load_embeddings
        for read, error in ((ldm.load, ldm.LoadError), (load_embeddings, EmbeddingError),
                            (lambda p: image_files([p]), DataError)):
            try:
                read(sys.argv[1])
            except error as e:
                print(e)
        """
    try:
        out = subprocess.run([sys.executable, "-c", code, str(pipe)], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a read of the pipe blocked")
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 3, out.stderr[-500:]
    assert "is not a regular file or a folder" in lines[0] and "is not a regular file or a folder" in lines[1]
    assert "it is not a regular file" in lines[2]


def learned_file_writers():
    """(name, save(path, value), load(path) -> tensor) for each kind of file a run writes again
    and again as it learns: ours, AUTOMATIC1111's two, HiPer's tail and NeTI's mapper."""
    import torch
    from inversion.files import load_embeddings, save_a1111, save_embeddings
    from inversion.hiper import load_tail, save_tail
    from inversion.neti import MapperConfig, NeTIMapper, load_mapper, save_mapper

    def mapper(value):
        m = NeTIMapper(MapperConfig(width=8, num_layers=2))
        torch.nn.init.constant_(m.output.weight, value)
        return m
    return [
        ("learned_embeds.safetensors", lambda p, v: save_embeddings(p, {"<x>": torch.full((1, 8), v)}),
         lambda p: load_embeddings(p)[0][0][1]),
        ("x.pt", lambda p, v: save_a1111(p, "<x>", torch.full((1, 8), v), step=1),
         lambda p: load_embeddings(p)[0][0][1]),
        ("x.safetensors", lambda p, v: save_a1111(p, "<x>", torch.full((1, 8), v), step=1),
         lambda p: load_embeddings(p)[0][0][1]),
        ("hiper_tail.safetensors", lambda p, v: save_tail(p, torch.full((5, 8), v)), lambda p: load_tail(p)[0]),
        ("neti_mapper.safetensors", lambda p, v: save_mapper(p, mapper(v), {"placeholder": "<x>"}),
         lambda p: load_mapper(p)[0].output.weight),
    ]


@pytest.mark.parametrize("index", range(5))
def test_an_interrupted_save_of_a_learned_file_keeps_the_one_before(index, tmp_path, monkeypatch):
    """Each learned file is written again at every checkpoint: a Ctrl-C (or a full disk) in the
    middle of a write leaves the previous file whole, and no temporary file beside it."""
    import safetensors.torch
    import torch
    name, save, load = learned_file_writers()[index]
    path = tmp_path / name
    save(path, 1.0)

    def cut_short(*args, **kwargs):  # writes part of the file, then the user presses Ctrl-C
        target = args[1] if len(args) > 1 else kwargs.get("filename", kwargs.get("f"))
        with open(target, "wb") as f:
            f.write(b"\x00" * 10)
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", cut_short)
    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        save(path, 2.0)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (load(path) == 1.0).all()
