"""What the tools say when a file cannot be read or written: the file's own name, and the
reason in words a user can act on."""
import os

import pytest

from ldm.load import atomic_write, load_error_reason, read_failure


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
    import importlib
    import os
    load = importlib.import_module("ldm.load")
    real, calls = os.replace, []

    def held_twice(src, dst):  # what Windows says while a virus scanner reads the file just written
        calls.append(dst)
        if len(calls) <= 2:
            raise PermissionError(13, "The process cannot access the file", str(dst))
        real(src, dst)
    monkeypatch.setattr(load.os, "replace", held_twice)
    monkeypatch.setattr(load.time, "sleep", lambda s: None)
    monkeypatch.setattr(load, "WINDOWS", True)
    atomic_write(tmp_path / "loss.csv", lambda tmp: open(tmp, "w").write("step,loss\n"))
    assert len(calls) == 3 and (tmp_path / "loss.csv").read_text() == "step,loss\n"
    calls.clear()
    monkeypatch.setattr(load, "WINDOWS", False)  # elsewhere a refusal is final: no waiting
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
