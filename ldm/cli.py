"""What the command-line tools share: argument parsing that fails in one line, number types,
the output-folder check, device choice, and `run`, which turns expected failures into one line."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Optional

import torch

from ldm.files import PICKLE_SUFFIXES


class CLIError(Exception):
    """Bad input: the message is printed as one line and the tool exits with status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is nothing to show (None, off for
    a switch, an empty text or list) or where the option's own help already says what it is."""

    def _get_help_string(self, action):
        nothing = action.default is None or action.default is False or action.default in ("", [])
        if nothing or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        """Text with line breaks of its own (examples in an epilog) is shown as written; a
        one-line text (a description) is wrapped to the terminal."""
        if "\n" in text.strip():
            return "".join(indent + line for line in text.strip("\n").splitlines(keepends=True))
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)

    def _split_lines(self, text, width):
        """An option's help, wrapped at spaces only: argparse's own wrapping also breaks after a
        hyphen, which splits a name such as `--init-word` over two lines."""
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and a single-line error instead of usage + error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise CLIError(f"{message} (see --help)")

    def given_options(self, argv=None) -> set:
        return given_options(self, argv)


def given_options(parser: argparse.ArgumentParser, argv=None) -> set:
    """The names (dests) of the options written on the command line, in whatever spelling
    argparse accepted: parse again with every default suppressed, so only those are set. An
    option can then keep its real default (shown in --help) and still be refused when it is
    given where it has nothing to do."""
    actions = parser._actions  # argparse keeps its options here; there is no public accessor
    defaults = [a.default for a in actions]
    try:
        for a in actions:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, default in zip(actions, defaults):
            a.default = default


def counted(n: int, noun: str) -> str:
    """'1 step', '2 steps'."""
    return f"{n} {noun}{'s' * (n != 1)}"


def flags(dests) -> str:
    """"--steps, --no-eval" from option names (dests) ("steps", "no_eval")."""
    return ", ".join("--" + d.replace("_", "-") for d in dests)


def checked_number(convert, what: str, ok, requirement: str):
    """An argparse type: `convert` the text (int or float), then require ok(value)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):  # also refuses nan, whose comparisons are all False
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return parse


positive_int = checked_number(int, "a whole number", lambda v: v >= 1, "at least 1")
nonnegative_int = checked_number(int, "a whole number", lambda v: v >= 0, ">= 0")
positive_float = checked_number(float, "a number", lambda v: 0 < v < float("inf"), "a number > 0")
nonnegative_float = checked_number(float, "a number", lambda v: 0 <= v < float("inf"), "a number >= 0")
# Adam moves each learned number by about the learning rate every step, and the numbers are
# about 0.01 to 1 in size: a rate above 1 only throws them about (or overflows float32).
learning_rate = checked_number(float, "a number", lambda v: 0 < v <= 1,
                               "> 0 and at most 1 (Adam moves each number by about that much a step)")
seed_int = checked_number(int, "a whole number", lambda v: 0 <= v < 2 ** 63, "between 0 and 2**63 - 1")


def at_most(most: int, why: str):
    """An argparse type: a whole number from 1 to `most` (larger ones overflow, or need far more
    memory than any machine has, only after the model is loaded)."""
    return checked_number(int, "a whole number", lambda v: 1 <= v <= most, f"between 1 and {most} ({why})")


# torch starts every thread at once; tens of thousands crash the process, and more threads
# than cores only slow the work down.
MAX_THREADS = 1024
thread_count = at_most(MAX_THREADS, "more threads than cores only slow torch down")


def progress_bar(total: int, desc: str, initial: int = 0, unit: str = "step", disable: bool = False, **kwargs):
    """A tqdm bar on stderr. Redirected to a log file, it writes a line every 30 s rather than ten a
    second (set its postfix with refresh=False, or each call writes one), and a bar opened inside
    another (a validation grid during training) writes its lines after the other's rather than
    moving the cursor up to a line of its own, which a file would keep as escape codes."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    if not tty:
        kwargs.setdefault("position", 0)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                mininterval=0.1 if tty else 30, **kwargs)


def counting(bar):
    """A `progress` argument for ldm.generate.generate (and the samplers): passes the denoising
    steps through, advancing `bar` by one after each."""
    def progress(steps):
        for step in steps:
            yield step
            bar.update(1)
    return progress


def shell_command(*words, windows: bool = os.name == "nt") -> str:
    """A command line to print for the user to paste: each word quoted where the shell needs it
    (a path with a space, a placeholder with a '$' or a quote). Windows' shells take double quotes
    only (cmd.exe reads '<ring>' outside them as a redirection)."""
    if not windows:
        return shlex.join(str(w) for w in words)

    def quoted(word: str) -> str:
        special = not word or re.search(r'[\s"&|<>^%()]', word)
        return '"' + word.replace('"', '\\"') + '"' if special else word
    return " ".join(quoted(str(w)) for w in words)


def path_arg(text: str) -> Path:
    """An argparse type for a file or folder: empty text is refused (Path("") would quietly be
    the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a file or folder")
    return Path(text)


def word_arg(text: str) -> str:
    """An argparse type for a word or a prompt that must not be empty (empty would quietly
    mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty")
    return text


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # PIL's names
IMAGE_SUFFIXES = tuple(IMAGE_FORMATS)


def image_path_arg(text: str) -> Path:
    """An argparse type for an image to write (a grid of samples): a .png, .jpg or .webp name,
    written in that format (ldm.generate.save_image)."""
    path = path_arg(text)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text}: name a {', '.join(IMAGE_SUFFIXES)} file")
    return path


def can_write_in(folder: Path) -> bool:
    """Whether a file can be made in `folder`: tried, with a temporary file, since os.access does
    not read Windows' access lists (every folder looks writable to it there)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def blocking_path(folder: Path) -> Optional[Path]:
    """Why `folder` (made if missing) cannot be written in: the nearest existing path at or above
    it, when that is no folder or not a writable one (or the drive, when none of it exists: a
    missing drive or network share); None when it can. A link to nothing blocks: no folder can
    be made where it is."""
    folder = folder.absolute()
    existing = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), None)
    if existing is None:
        return Path(folder.anchor or folder)
    return None if existing.is_dir() and can_write_in(existing) else existing


def check_file_writable(path: Path, option: str) -> None:
    """A file that a long run writes at its end: checked before any work, so that hours of work are
    not lost to a folder that cannot be made (its folder is made when it is written)."""
    if path.is_dir():
        raise CLIError(f"{option} {path}: is a folder; name a file")
    blocked = blocking_path(path.parent)
    if blocked is not None:
        raise CLIError(f"{option} {path}: cannot write there ({blocked} is not a writable folder)")


def distinct_seeds(seeds, option: str = "--seeds") -> None:
    """Each seed once: a repeated seed would count the same run twice in a mean."""
    if len(set(seeds)) != len(seeds):
        raise CLIError(f"{option} {' '.join(map(str, seeds))}: give each seed once")


# Names of files the tools write or read: given as a new --out, they are a file meant, not a folder
# (`--out my-word.safetensors` would make a folder of that name and write the learned files in it).
FILE_SUFFIXES = (*IMAGE_SUFFIXES, ".safetensors", *PICKLE_SUFFIXES)


def check_writable(out: Path) -> None:
    """--out must be a folder, or a path where one can be made (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: is a file, not a folder")
    if not out.exists() and out.suffix.lower() in FILE_SUFFIXES:
        raise CLIError(f"--out {out}: looks like a file's name, but --out is the folder the files are written in; "
                       f"give a folder, such as --out {out.with_suffix('')}")
    if out.is_dir():  # tried once, here: blocking_path would try the same folder again
        if not can_write_in(out):
            raise CLIError(f"--out {out}: is a folder this user cannot write to; choose another --out")
        return
    blocked = blocking_path(out)
    if blocked is not None:
        raise CLIError(f"--out {out}: cannot make a folder there ({blocked} is not a writable folder)")


def check_output_names(out: Path, files=(), folders=()) -> None:
    """Inside --out, a name the run writes a file under must not be a folder, and a name it
    writes a folder under must not be a file: found before the work, not at its first save."""
    for name in (*files, *folders):
        if (out / name).is_symlink() and not (out / name).exists():
            raise CLIError(f"{out / name} is a link to something that does not exist; remove it or choose another "
                           "--out")
    for name in files:
        if (out / name).is_dir():
            raise CLIError(f"{out / name} is a folder, and this run writes a file there; move it or choose another "
                           "--out")
    for name in folders:
        if (out / name).exists() and not (out / name).is_dir():
            raise CLIError(f"{out / name} is a file, and this run writes a folder there; move it or choose another "
                           "--out")


def pick_device(name: str = "auto") -> torch.device:
    """cuda if present, else Apple's mps, else the CPU; or the device named."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise CLIError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError("--device cuda was asked for but no CUDA GPU is available")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                           "numbered from cuda:0")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CLIError("--device mps was asked for but this machine or PyTorch build has no Apple GPU support")
        if device.type not in ("cpu", "cuda", "mps"):
            raise CLIError(f"--device {name}: this project runs on cpu, cuda or mps")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --precision's names


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[precision]


def check_half_weights(half_weights: bool, precision: str, dtype: torch.dtype) -> None:
    """--half-weights keeps fp16 weights for fp32 arithmetic: the weights' dtype must be fp32."""
    if half_weights and dtype != torch.float32:
        raise CLIError(f"--half-weights keeps fp16 weights for fp32 arithmetic, and --precision {precision} is "
                       f"{str(dtype).removeprefix('torch.')} here: add --precision fp32")


def check_text(argv) -> None:
    """Every argument must be text: bytes that are not UTF-8 would fail only when the first
    file named after them is written, after all the work."""
    for arg in argv:
        try:
            str(arg).encode("utf-8")
        except UnicodeEncodeError:
            raise CLIError(f"the argument {ascii(arg)} is not valid UTF-8 text") from None


# What a RuntimeError says when memory ran out: the CPU allocator on Linux and on Windows, and
# Apple's GPU (mps), which raises no OutOfMemoryError.
OUT_OF_MEMORY_TEXTS = ("can't allocate memory", "not enough memory", "MPS backend out of memory")


def out_of_memory(error: BaseException) -> bool:
    """Python's, the GPU's, or the CPU allocator's out-of-memory error (a RuntimeError that says so)."""
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or any(text in str(error) for text in OUT_OF_MEMORY_TEXTS))


def memory_hint(error: BaseException) -> str:
    """What an out-of-memory error says about the allocation that failed, in a few words:
    'could not allocate 12.0 GiB' (the CPU allocator's message gives bytes), or the first
    sentence of the GPU's ('CUDA out of memory. Tried to allocate 20.00 MiB')."""
    text = str(error).strip()
    found = re.search(r"tried to allocate (\d+) bytes", text)
    if found:
        return f"could not allocate {int(found.group(1)) / 2 ** 30:.1f} GiB"
    found = re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", text)
    if found:
        return found.group(0)
    first = (text.splitlines() or [type(error).__name__])[0]
    return first if len(first) <= 100 else first[:100].rsplit(" ", 1)[0] + " ..."


def os_error_line(error: OSError) -> str:
    """'PATH: No space left on device', without Python's '[Errno 28]' in front."""
    if error.strerror and error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    return error.strerror or str(error)


def stop_like_ctrl_c(signum, frame):
    """SIGTERM (`kill`, a job scheduler's time limit) stops a run the way Ctrl-C does, so a
    training run saves what it learned instead of dying with it."""
    raise KeyboardInterrupt


# What every method of invert.py takes; the other tools pass their own advice to run().
MEMORY_ADVICE = "try a smaller --batch, or --gradient-checkpointing or --half-weights"


def tolerant_output() -> None:
    """Text the terminal's encoding cannot show (an α in a table, a prompt in another script,
    printed into a log on Windows, whose files default to cp1252) is written escaped, '\\u03b1',
    rather than stopping the tool after its work (stderr already does this)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a text file of the io module
            pass


def run(main, argv=None, prog: str = "", memory_advice: str = MEMORY_ADVICE) -> int:
    """Call main(argv); turn expected failures into one line on stderr and a non-zero status
    (out of memory: the allocation that failed, then `memory_advice`, which names the tool's
    own options). While it runs, SIGTERM is handled as Ctrl-C."""
    tolerant_output()
    try:
        # Ctrl-C raises KeyboardInterrupt again (the scripts exit at once while torch loads)
        previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                    signal.SIGTERM: signal.signal(signal.SIGTERM, stop_like_ctrl_c)}
    except ValueError:  # not the main thread: signals stay as they are
        previous = {}
    try:
        return _run(main, argv, prog, memory_advice)
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(signum, handler)


def _run(main, argv, prog: str, memory_advice: str) -> int:
    from ldm.generate import SamplingError
    from ldm.files import LoadError
    try:
        check_text(sys.argv[1:] if argv is None else argv)
        return main(argv) or 0
    except (CLIError, LoadError, SamplingError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):
            raise
        print(f"{prog}: error: out of memory ({memory_hint(e)}); {memory_advice}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a disk that is full or read-only, a folder that vanished, ...
        print(f"{prog}: error: {os_error_line(e)}", file=sys.stderr)
        return 1
