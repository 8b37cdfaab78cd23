"""Training images and prompt templates for Textual Inversion.

The paper trains on 3-5 photos of a concept. Each photo is turned upright (EXIF
orientation), made RGB, resized so its short side is the model's resolution (bicubic),
and cut to the centre square; pixels go to [-1, 1] as the VAE expects. Random flips
and template choice are each method's `loss()` (textual_inversion.py, neti.py).

A training caption is a neutral template with the placeholder word in it: "a photo of
a {}" for an object, "a painting in the style of {}" for a style.
"""
from __future__ import annotations

import ast
import hashlib
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a dim photo of a {}",
    "a blurry photo of the {}",
    "a sharp photo of a {}",
    "a photo of my {}",
    "a photo of the small {}",
    "a photo of the large {}",
    "a good photo of a {}",
    "a snapshot of the {}",
    "a picture of a {}",
    "a low-resolution photo of the {}",
    "an old photo of a {}",
    "a photo of one {}",
    "a well-lit photo of the {}",
    "a framed photo of a {}",
    "a close photo of the {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a picture in the style of {}",
    "a drawing in the style of {}",
    "an illustration in the style of {}",
    "a sketch in the style of {}",
    "artwork in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "a cropped painting in the style of {}",
    "a detailed painting in the style of {}",
    "a bright picture in the style of {}",
    "a dark picture in the style of {}",
    "a landscape in the style of {}",
    "a portrait in the style of {}",
    "a still life in the style of {}",
]


class DataError(ValueError):
    """Training data that cannot be used; the message is one line."""


def templates(property: str) -> List[str]:
    """The caption templates for what is learned: "object" or "style"."""
    lists = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
    if property not in lists:
        raise DataError(f"unknown property {property!r}; choose 'object' or 'style'")
    return list(lists[property])


def validation_prompts(placeholder: str, property: str, given: Sequence[str] = (), tokenizer=None) -> List[str]:
    """The prompts of the validation grid: the given ones, each with the placeholder in it
    ("a <my-toy> on the beach"), or the first four training templates."""
    for prompt in given:
        if placeholder not in prompt:
            raise DataError(f"--validation-prompt {prompt!r} does not use the word {placeholder!r}; write it in "
                            f"the prompt, e.g. 'a {placeholder} on the beach'")
        if tokenizer is not None and words_cut_off(tokenizer, prompt, [placeholder]):
            raise DataError(f"--validation-prompt {prompt[:40]!r}...: the word {placeholder!r} comes after the "
                            f"text encoder's {tokenizer.context_length} tokens and would be cut off; shorten it")
    return list(given) or [t.format(placeholder) for t in templates(property)[:4]]


def words_cut_off(tokenizer, text: str, words: Sequence[str]) -> List[str]:
    """The learned words that `text` uses only past the text encoder's 77 tokens (start and
    end included), where they are cut off and do nothing."""
    ids = tokenizer.encode(text)
    kept = set(ids[: tokenizer.context_length - 1])  # the encoder keeps 76 ids; its end token takes the last place
    cut = []
    for word in words:
        word_ids = tokenizer.encode(word)[1:-1]
        if word_ids and word_ids[0] in ids and word_ids[0] not in kept:
            cut.append(word)
    return cut


def image_files(paths_or_dir: Union[str, Path, Sequence[Union[str, Path]]],
                warn: Optional[Callable[[str], None]] = None) -> List[Path]:
    """A folder's images (by extension, sorted by name), or the given list of files. What a
    folder holds beside them (subfolders, which are not searched, other files) `warn` is told."""
    if isinstance(paths_or_dir, (str, Path)) and Path(paths_or_dir).is_dir():
        folder = Path(paths_or_dir)
        entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
        files = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        others = [p.name + "/" * p.is_dir() for p in entries if p not in files]
        if not files:
            raise DataError(f"no images found in {folder} (looked for {' '.join(IMAGE_EXTENSIONS)}"
                            + (", not in subfolders" if any(n.endswith("/") for n in others) else "") + ")")
        if others and warn is not None:
            warn(f"{folder}: skipped {len(others)} entr{'ies' if len(others) > 1 else 'y'} that "
                 f"{'are' if len(others) > 1 else 'is'} not {' '.join(IMAGE_EXTENSIONS)} images "
                 f"({', '.join(others[:3])}{', ...' * (len(others) > 3)}; subfolders are not searched)")
        return files
    files = [Path(paths_or_dir)] if isinstance(paths_or_dir, (str, Path)) else [Path(p) for p in paths_or_dir]
    if not files:
        raise DataError("no training images given")
    for f in files:
        if not f.exists():
            raise DataError(f"cannot read {f}: no such file or folder")
        if not f.is_file():  # a pipe would block the read until it is written to
            raise DataError(f"cannot read {f}: it is not a regular file")
    return files


def to_rgb(image, png: bool = False):
    """Any PIL mode -> RGB; transparency is laid over white, 16-bit grey is scaled to 8 bits.
    `png`: the image was read from a PNG file (whose "I" images are 16-bit grey)."""
    from PIL import Image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        grey = np.asarray(image, dtype=np.float64)
        # 16-bit grey (PNG's only integer mode beyond 8 bits; older Pillows open it as "I") spans
        # 0..65535 whatever its content; for other 32-bit images, the range is guessed from the values
        sixteen = image.mode.startswith("I;16") or png
        scale = 255.0 / 65535.0 if sixteen or grey.max() > 255 else 1.0
        image = Image.fromarray(np.clip(grey * scale, 0, 255).round().astype(np.uint8), "L")
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image, resolution: int):
    """The centre square, resized to `resolution` (bicubic): the short side scaled to
    `resolution` and the long one cropped to it. The square is cut first, so a very long
    image is never enlarged whole."""
    from PIL import Image
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square if side == resolution else square.resize((resolution, resolution), Image.BICUBIC)


def load_image(path: Union[str, Path], resolution: int,
               warn: Optional[Callable[[str], None]] = None) -> torch.Tensor:
    """One training image -> (3, R, R) float32 in [-1, 1]. An image whose short side is under
    half of R is enlarged more than twice, into a blurry picture that would be learned, and
    one more than twice as long as wide (or high) loses most of itself to the centre crop:
    `warn` is told of both."""
    from PIL import Image, ImageOps
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give one image file")
    with warnings.catch_warnings():
        # PIL's two-line warning for 90-180 megapixels, given as it opens and again as it crops:
        # such an image is read (and resized) as any other
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                im.load()  # decode now, so a truncated file fails here
                image = to_rgb(ImageOps.exif_transpose(im), png=im.format == "PNG")  # the copy has no format
        except Image.DecompressionBombError:  # PIL's guard against images of hundreds of megapixels
            raise DataError(f"cannot read {path}: it has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, "
                            "too many to open safely; resize it first") from None
        except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"cannot read {path}: {reason}") from None
        side = min(image.size)
        if warn is not None and 2 * side < resolution:
            warn(f"{path.name} is {image.width}x{image.height} px: its centre square is enlarged "
                 f"{resolution / side:.1f}x to {resolution} px, so what is learned is a blurry picture (images of "
                 f"{resolution} px or more work best)")
        if warn is not None and max(image.size) > 2 * side:
            warn(f"{path.name} is {image.width}x{image.height} px: only its centre square is used, "
                 f"{1 - side / max(image.size):.0%} of it is cut off (crop it to the subject first)")
        array = np.asarray(resize_center_crop(image, resolution), dtype=np.float32)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def load_images(paths_or_dir: Union[str, Path, Sequence[Union[str, Path]]], resolution: int,
                warn: Optional[Callable[[str], None]] = None) -> torch.Tensor:
    """A folder of images or a list of files -> (N, 3, R, R) float32 in [-1, 1]."""
    if resolution <= 0:
        raise DataError(f"resolution must be positive, got {resolution}")
    return torch.stack([load_image(p, resolution, warn) for p in image_files(paths_or_dir, warn)])


def image_digest(images: torch.Tensor) -> str:
    """A short hash of training images, so that a resumed run refuses other images."""
    return hashlib.sha256(images.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# The settings whose command-line option is not simply --name-with-dashes; the switches that turn
# a setting off; the settings that hold the digest of the training images (Trainer.digest_key).
OPTION_OF = {"learnable_property": "--property"}
SWITCHED_OFF_BY = {"flip": "--no-flip", "bypass": "--no-bypass"}
IMAGE_DIGEST_KEYS = {"images": "other images", "image": "another image"}


def method_of(settings: dict) -> str:
    """Which method wrote a checkpoint's settings, by a setting only it has ('' if none)."""
    for key, method in (("tail", "HiPer (--method hiper)"), ("sigma_t", "NeTI (--method neti)"),
                        ("num_vectors", "Textual Inversion (--method ti)")):
        if key in settings:
            return method
    return ""


def settings_difference(saved: str, now: str) -> str:
    """What differs between a checkpoint's settings and this run's, both `str(dict)` as the
    trainers' `settings()` write them: "other images; --lr 0.005 in the checkpoint, 0.01 now".
    For the one line that refuses to resume; "other settings" if the saved ones cannot be read."""
    try:
        old, new = ast.literal_eval(saved), ast.literal_eval(now)  # literals only: no code runs
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return "other settings"
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "other settings"
    if len(old.keys() ^ new.keys()) > 3:
        return f"a {method_of(old)} run's settings" if method_of(old) else "another method's settings"
    shown = lambda d, key: repr(d[key]) if key in d else "unset"
    parts = []
    for key in sorted(old.keys() | new.keys()):
        if (key in old, old.get(key)) != (key in new, new.get(key)):
            if key in IMAGE_DIGEST_KEYS:
                parts.append(IMAGE_DIGEST_KEYS[key])
            elif isinstance(old.get(key), bool) and isinstance(new.get(key), bool):  # a switch, given or not
                switch = SWITCHED_OFF_BY.get(key, "--" + key.replace("_", "-"))
                # a --no-X switch was given when its setting is False, a plain switch when it is True
                given_before = old[key] != (key in SWITCHED_OFF_BY)
                parts.append(f"{switch} in the checkpoint, not now" if given_before
                             else f"{switch} now, not in the checkpoint")
            else:
                option = OPTION_OF.get(key, "--" + key.replace("_", "-"))
                parts.append(f"{option} {shown(old, key)} in the checkpoint, {shown(new, key)} now")
    if len(parts) > 3:  # one line: name the first few
        parts = parts[:3] + [f"{len(parts) - 3} more"]
    return "; ".join(parts) or "other settings"


def resume_mismatch(checkpoint: Path, saved, now: str) -> Optional[str]:
    """The one line that refuses to resume `checkpoint`, whose settings are `saved`, in a run
    whose settings are `now`; None if they are the same."""
    if saved == now:
        return None
    return (f"{checkpoint} does not match this run ({settings_difference(str(saved), now)}); resume with the "
            "same arguments, or start a new --out folder")
