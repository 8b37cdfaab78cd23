"""Reading and writing tensor files safely, and saying in one line why one cannot be read.

    read_tensors("model.safetensors")        # {name: tensor}, metadata; also .ckpt/.pt/.bin
    atomic_write(path, lambda tmp: ...)      # a temporary file, then a rename: never half a file

Pickled files (`.ckpt`, `.pt`, `.bin`) are read only with `torch.load(weights_only=True)`,
which refuses code execution; the non-tensor objects that real SD checkpoints pickle beside
their weights are let through as an inert stand-in. A file that cannot be read gets a reason a
user can act on (a Git LFS pointer, a text file renamed .ckpt, a download cut short), and a
write that fails names the file meant, not its temporary name. Model weights are read here
(`read_tensors`); the readers of learned files and checkpoints open their own files but take
their error lines from here, and every file the tools write goes through `atomic_write`.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

CONFIG_METADATA_KEY = "ldm_config"   # our single files carry their ModelConfig as JSON here
ADDED_TOKENS_METADATA_KEY = "added_tokens"  # ... and the names of words added to the token table: {word: id}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # PyTorch's own files, read with weights_only=True


# ----------------------------------------------------------------------------- reading

class LoadError(Exception):
    """A file that cannot be loaded; the message is one line meant for the user."""


class _TrainingState:
    """Stand-in for the non-tensor objects that training frameworks pickle beside the weights.

    The original CompVis checkpoints were written by PyTorch Lightning: next to `state_dict`
    they pickle its `ModelCheckpoint` callback class and numpy scalars. Loading with
    `weights_only=True` refuses any global it does not know; these names are let through as
    this inert class, which takes any arguments and state and runs no code of the file."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# The globals that real SD v1 `.ckpt` files pickle besides tensors (the same list that
# AUTOMATIC1111's safe unpickler allows), each read as an inert _TrainingState.
TRAINING_STATE_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                          "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
                          "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                          "numpy.ndarray", "numpy.dtype")


def unsafe_pickle(error: BaseException) -> Optional[str]:
    """What a weights_only refusal names ("GLOBAL a.b.C was not allowed"), or 'objects other than
    tensors' when it names none; None when the error is not a refusal (a damaged file, say)."""
    import re
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(error))   # some torch versions color the name
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return found.group(1)
    if "unrecognized function" in message or "Can only create new object" in message:
        return "objects other than tensors"
    return None


def not_a_file(path: Path) -> str:
    """Why `path`, which is no regular file, cannot be read as one: 'no such file', or 'is not a
    regular file' (a device or a pipe, whose read could block for ever)."""
    return "is not a regular file" if path.exists() else "no such file"


def load_error_reason(error: BaseException) -> str:
    """The informative line of a failure to read a file (torch.load, safetensors): for a
    weights_only refusal, what the unpickler met (torch's first lines are about its defaults),
    else the error's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        after = [l for l in lines[1:] if not l.startswith(("Please file", "Check the documentation"))]
        return (after[0] if after else "the unpickler refused it")[:120]
    first = lines[0] if lines else type(error).__name__
    if len(first) <= 160:
        return first
    sentence = first[:160].rsplit(". ", 1)[0]  # whole sentences, or whole words, not half a word
    return sentence + "." if len(sentence) < 160 else first[:160].rsplit(" ", 1)[0] + " ..."


def _first_bytes(path: Path) -> Tuple[bytes, int]:
    """A file's first 9 bytes and its size ((b"", 0) if it cannot be read): enough to tell a
    safetensors header (an 8-byte little-endian length, then '{'), a zip, a pickle or a text file."""
    try:
        with open(path, "rb") as f:
            return f.read(9), path.stat().st_size
    except OSError:
        return b"", 0


def file_format(path: Path) -> str:
    """"safetensors" or "pickle": from the first bytes where they show a safetensors header (a
    safetensors file named .bin, as diffusers' textual-inversion script once wrote them), else
    from the suffix, in any case (.CKPT); "" for neither."""
    head, size = _first_bytes(path)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= size:
        return "safetensors"  # an 8-byte header length, then the JSON header
    suffix = path.suffix.lower()
    return "safetensors" if suffix == ".safetensors" else "pickle" if suffix in PICKLE_SUFFIXES else ""


def read_failure(path: Path, error: BaseException) -> str:
    """Why `path` could not be read: that it is not the format its name says, when its first
    bytes show it (a text file renamed .ckpt, a download's error page), else the error's line."""
    head, size = _first_bytes(path)
    if head.startswith(b"version h"):  # "version https://git-lfs.github.com/spec/v1"
        return "it is a Git LFS pointer, not the file itself: fetch the file (git lfs pull)"
    suffix = path.suffix.lower()
    if suffix == ".safetensors" and len(head) == 9:
        header = int.from_bytes(head[:8], "little")
        if head[8:9] != b"{":
            return "it is not a safetensors file: it does not start with a safetensors header"
        if header + 8 > size:
            return (f"it is cut off: its header alone is {header + 8:,} bytes and the file has {size:,}; "
                    "download it again")
    if suffix in PICKLE_SUFFIXES and head and not head.startswith((b"PK\x03\x04", b"\x80")):
        return "it is not a PyTorch file: neither a zip archive nor a pickle"
    return load_error_reason(error)


def unreadable(path: Path, what: str, error: BaseException, advice: str = " — download it again") -> str:
    """The one line for a file that cannot be read as `what`: why, and when its first bytes do
    not already tell what it is, that it may be truncated."""
    reason = read_failure(path, error)
    if reason.startswith("it is "):  # a text file, an LFS pointer, another format: no use downloading again
        return f"{path}: cannot be read as {what} ({reason})"
    return f"{path}: cannot be read as {what} ({reason}); the file ({path.stat().st_size:,} bytes) may be " \
           f"truncated or corrupt{advice}"


def _read_pickle(path: Path) -> Tuple[dict, Dict[str, str]]:
    import zipfile
    allowed = [(_TrainingState, name) for name in TRAINING_STATE_GLOBALS]
    try:
        with torch.serialization.safe_globals(allowed):
            # mmap reads the tensors lazily, but only from the zip format of torch >= 1.6
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # zip errors, unpickling refusals, truncation
        name = unsafe_pickle(e)
        if name:
            raise LoadError(f"{path}: refuses to load safely (it pickles {name}, which could run code); "
                            "convert it to .safetensors with a tool you trust") from None
        raise LoadError(unreadable(path, "a PyTorch checkpoint", e)) from None
    metadata = {}
    for key in (CONFIG_METADATA_KEY, ADDED_TOKENS_METADATA_KEY):
        if isinstance(obj, dict) and isinstance(obj.get(key), str):
            metadata[key] = obj[key]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoadError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    return obj, metadata


def read_tensors(path: Path, skip: Tuple[str, ...] = ()) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Every tensor of a .safetensors/.ckpt/.pt/.bin file, and the safetensors metadata.
    Keys starting with `skip` are not read from a .safetensors file (pickles are memory-mapped)."""
    path = Path(path)
    form = file_format(path)
    if form == "safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys() if not (skip and k.startswith(skip))}, metadata
        except Exception as e:
            raise LoadError(unreadable(path, "safetensors", e)) from None
    if form == "pickle":
        return _read_pickle(path)
    raise LoadError(f"{path}: unknown format '{path.suffix}'; expected .safetensors, .ckpt, .pt, .bin "
                    "or a diffusers folder")


def read_metadata(path) -> Dict[str, str]:
    """The metadata of a weights file alone (a safetensors header is read without its tensors)."""
    path = Path(path)
    if file_format(path) == "safetensors":
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                return dict(f.metadata() or {})
        except Exception:
            pass  # read_tensors words the error
    return read_tensors(path)[1]


# ----------------------------------------------------------------------------- writing and hashing

def file_hash(path) -> str:
    """sha256 of a weights file (first 16 hex digits), used to tie learned embeddings to their base model."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def write_error(error: BaseException, path: Path) -> Optional[OSError]:
    """The OSError to report for a failed write of `path`, naming `path` (not the temporary
    file): OSErrors, and what torch.save (RuntimeError) and safetensors raise when the disk
    fills up. None for anything else (Ctrl-C, a bug), which is raised as it is."""
    if isinstance(error, OSError):
        return OSError(error.errno, error.strerror or str(error), str(path))
    if isinstance(error, RuntimeError) or type(error).__name__ == "SafetensorError":
        full = shutil.disk_usage(path.parent).free < 2 ** 20
        reason = "No space left on device" if full else f"could not be written ({load_error_reason(error)})"
        return OSError(errno.ENOSPC if full else errno.EIO, reason, str(path))
    return None


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the usual permissions
        replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:  # gone already, or it cannot be: the first error is the one to tell
            pass
        raise write_error(e, path) or e


WINDOWS = os.name == "nt"


def replace(tmp: str, path: Path, tries: int = 5) -> None:
    """os.replace. On Windows a file that another program holds open (a virus scanner reading
    the file just written, an editor showing it) cannot be replaced: tried again for 2 s."""
    for i in range(tries):
        try:
            return os.replace(tmp, path)
        except PermissionError:
            if not WINDOWS or i == tries - 1:
                raise
            time.sleep(0.2 * (i + 1))
