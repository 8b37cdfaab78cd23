"""The tiny world: procedural 32x32 images of one object, their captions, and datasets.

Every image shows one object on a uniform background.  The object is described by six
attributes (:class:`Attributes`); the caption words are the attribute values themselves.

=============  ======================================================  =====================
attribute      named in captions                                       held out (never named)
=============  ======================================================  =====================
shape          circle, square, triangle, cross                         ring, hourglass
color          red, yellow, green, teal, blue, purple                  --
size           small (~9 px across), large (~13 px across)             --
position       left, center, right (x = 8, 16, 24 of 32)               --
background     black, white, gray, navy, beige                         --
texture        plain, striped (horizontal), dotted                     checkered
=============  ======================================================  =====================

Held-out shapes and the held-out texture are drawn in the training images but never named:
a held-out shape is captioned with a generic noun ("object", "shape", "thing"), a held-out
texture simply has no texture word.  Textual Inversion later learns new words for them from
:func:`concept_images`.

Why these held-out shapes: a thick *ring* (annulus, hole diameter half the outer one) is the
only shape with a hole, and an *hourglass* (two triangles meeting at a narrow waist) is the
only shape wide at the top and bottom and narrow in the middle.  Both keep these features at
9 px and under blur, so the analyzer separates them from every named shape and from each
other (diamonds and stars were rejected: at 9 px they are blobs close to a circle).

Colors are six hues about 60 degrees apart (drawn at red 0, yellow 54, green 120, teal 180,
blue 234, purple 297; the analyzer reads each as the nearest of 0, 60, ..., 300), all strongly
saturated, so hue alone identifies them under small color shifts.
Every color word and background word is a single CLIP BPE token (that is why "teal" and not
"cyan").  A (color, background) pair whose colors are closer than :data:`MIN_CONTRAST` (RGB
distance) is never drawn: of the palette, only yellow on beige (:func:`compatible`).

Textures mix the object color ("primary") with a second shade of the same hue: a darker
shade (40 % of the color) on light backgrounds, a lighter tint (mixed 55 % towards white) on
dark backgrounds, so both shades stay far from the background.  Patterns have a period of
4 px for striped (2-px horizontal bands) and dotted (2x2-px dots on a 4-px grid), 6 px for
checkered (3x3-px checkerboard: 2-px cells would blur into a uniform color).

Every shape fits in an s x s box (s = size across): circle / ring diameter s (ring hole
s/2), square side 0.94 s, triangle base and height s, cross arms s long and 0.36 s thick,
hourglass s wide at top and bottom, 0.2 s at the waist and 0.95 s high.  Even at the largest size (14 px)
and jitter, the footprints of "left" (x <= 16) and "right" (x >= 16) never share a pixel.

Rendering supersamples 4x4 per pixel and box-filters (anti-aliased edges).  With
``jitter=True``: center x +-1 px, y +-2 px, size +-1 px, each RGB channel of the object
+-10, background brightness +-10 and each of its channels +-4, texture phase 0..3 px
(0..5 for checkered).

Sampling is uniform over every attribute's values (all six shapes, all four textures), so
held-out concepts are frequent in training; incompatible color/background pairs are redrawn.

Held-out combinations: a fixed 15 % (52 of 348) of the named (shape, color, position,
background) combinations, chosen by a salted SHA-256 hash (:func:`heldout_combos`), never
appear in the ``"train"`` split; the ``"eval"`` split draws only from them.

Captions (:func:`caption`): empty with probability 0.1 (for classifier-free guidance);
otherwise one of several templates, with size / position / background / texture each
dropped with some probability.  The color word is dropped with probability 0.1, and the
named shape word (replaced by a generic noun) with probability 0.1 when the color is kept
(0.09 in all), never both.  "plain" is
said for plain objects with probability 0.15.  :func:`prompt` builds the canonical full
evaluation prompt ``"a large red circle on the left on a black background"``.

Run ``python -m tinyworld.world --grid out.png`` to write a grid of samples with captions.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# --------------------------------------------------------------------------------------
# The world's vocabulary
# --------------------------------------------------------------------------------------

IMAGE_SIZE = 32
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "cross")          # named in captions
HELDOUT_SHAPES = ("ring", "hourglass")                       # drawn, never named
ALL_SHAPES = SHAPES + HELDOUT_SHAPES
GENERIC_NOUNS = ("object", "shape", "thing")                 # what held-out shapes are called

COLORS = ("red", "yellow", "green", "teal", "blue", "purple")
SIZES = ("small", "large")
POSITIONS = ("left", "center", "right")
BACKGROUNDS = ("black", "white", "gray", "navy", "beige")
TEXTURES = ("plain", "striped", "dotted")                    # named in captions
HELDOUT_TEXTURES = ("checkered",)                            # drawn, never named
ALL_TEXTURES = TEXTURES + HELDOUT_TEXTURES

HELDOUT_CONCEPTS = HELDOUT_SHAPES + HELDOUT_TEXTURES
ATTRIBUTE_NAMES = ("shape", "color", "size", "position", "background", "texture")
VALUES = {
    "shape": ALL_SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS,
    "background": BACKGROUNDS, "texture": ALL_TEXTURES,
}

COLOR_RGB = {
    "red": (225, 35, 35),        # hue   0
    "yellow": (235, 215, 30),    # hue  54
    "green": (40, 200, 40),      # hue 120
    "teal": (30, 190, 190),      # hue 180
    "blue": (40, 60, 235),       # hue 234
    "purple": (210, 40, 220),    # hue 297 (magenta-ish)
}
COLOR_HUE = {"red": 0.0, "yellow": 60.0, "green": 120.0, "teal": 180.0, "blue": 240.0,
             "purple": 300.0}

BACKGROUND_RGB = {
    "black": (12, 12, 12),
    "white": (243, 243, 243),
    "gray": (128, 128, 128),
    "navy": (20, 30, 100),
    "beige": (225, 205, 150),
}
DARK_BACKGROUNDS = ("black", "navy")   # textures use a light tint there, a dark shade elsewhere

SHADE_FACTOR = 0.40      # secondary = 0.40 * color            (light backgrounds)
TINT_FACTOR = 0.55       # secondary = color + 0.55 (255-color) (dark backgrounds)
MIN_CONTRAST = 125.0     # smallest RGB distance between background and either object shade

SIZE_PX = {"small": 9.0, "large": 13.0}         # "across" of the object, in pixels
POSITION_X = {"left": 8.0, "center": 16.0, "right": 24.0}
CENTER_Y = 16.0
JITTER_X, JITTER_Y, JITTER_SIZE, JITTER_COLOR, JITTER_BG_TINT = 1.0, 2.0, 1.0, 10, 4

HELDOUT_COMBO_FRACTION = 0.15
HELDOUT_COMBO_SALT = "tinyworld-heldout-v1"


@dataclass(frozen=True)
class Attributes:
    shape: str
    color: str
    size: str
    position: str
    background: str
    texture: str = "plain"

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v not in VALUES[f.name]:
                raise ValueError(f"unknown {f.name} {v!r}; expected one of {VALUES[f.name]}")

    def as_dict(self) -> dict:
        return {n: getattr(self, n) for n in ATTRIBUTE_NAMES}

    @property
    def combo(self) -> tuple:
        return (self.shape, self.color, self.position, self.background)


# --------------------------------------------------------------------------------------
# Colors
# --------------------------------------------------------------------------------------

def secondary_rgb(primary: np.ndarray, background: str) -> np.ndarray:
    """The second shade of a textured object: same hue, far from the background."""
    primary = np.asarray(primary, dtype=np.float64)
    if background in DARK_BACKGROUNDS:
        return primary + TINT_FACTOR * (255.0 - primary)
    return SHADE_FACTOR * primary


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


def compatible(color: str, background: str) -> bool:
    """False when the object (either of its shades) would be too close to the background."""
    c, b = COLOR_RGB[color], BACKGROUND_RGB[background]
    return min(_dist(c, b), _dist(secondary_rgb(c, background), b)) >= MIN_CONTRAST


# --------------------------------------------------------------------------------------
# Held-out combinations
# --------------------------------------------------------------------------------------

def _combo_hash(combo: Sequence[str]) -> float:
    key = "|".join((HELDOUT_COMBO_SALT,) + tuple(combo)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0 ** 64


@lru_cache(maxsize=None)
def heldout_combos() -> tuple:
    """The (shape, color, position, background) combinations never shown in training.

    Among the combinations of named shapes and compatible (color, background) pairs, the
    :data:`HELDOUT_COMBO_FRACTION` with the smallest salted SHA-256 hash (sorted).
    """
    combos = [(s, c, p, b) for s in SHAPES for c in COLORS for p in POSITIONS
              for b in BACKGROUNDS if compatible(c, b)]
    n = int(round(HELDOUT_COMBO_FRACTION * len(combos)))
    return tuple(sorted(sorted(combos, key=_combo_hash)[:n]))


@lru_cache(maxsize=None)
def _heldout_set() -> frozenset:
    return frozenset(heldout_combos())


def is_heldout_combo(attrs) -> bool:
    """Whether `attrs` (an :class:`Attributes` or a (shape, color, position, background)
    tuple) is one of the combinations reserved for evaluation."""
    combo = attrs.combo if isinstance(attrs, Attributes) else tuple(attrs)
    return combo in _heldout_set()


# --------------------------------------------------------------------------------------
# Sampling attributes
# --------------------------------------------------------------------------------------

def _choice(rng: np.random.Generator, values: Sequence[str]) -> str:
    return values[int(rng.integers(len(values)))]


def sample_attributes(rng: np.random.Generator, split: str = "train",
                      shapes: Sequence[str] | None = None,
                      textures: Sequence[str] | None = None,
                      colors: Sequence[str] = COLORS, sizes: Sequence[str] = SIZES,
                      positions: Sequence[str] = POSITIONS,
                      backgrounds: Sequence[str] = BACKGROUNDS) -> Attributes:
    """Draw one object's attributes uniformly (incompatible color/background pairs redrawn).

    split="train": held-out combinations are redrawn; default shapes / textures are all of
        them (named and held out), so held-out concepts appear in the images.
    split="eval": only held-out combinations (named shapes); default textures are the named
        ones.
    split="any": no restriction.
    """
    if split not in ("train", "eval", "any"):
        raise ValueError(f"split must be 'train', 'eval' or 'any', not {split!r}")
    if split == "eval":
        shapes = SHAPES if shapes is None else tuple(shapes)
        textures = TEXTURES if textures is None else tuple(textures)
        pool = [c for c in heldout_combos() if c[0] in shapes and c[1] in colors
                and c[2] in positions and c[3] in backgrounds]
        if not pool:
            raise ValueError("no held-out combination matches the requested values")
        s, c, p, b = pool[int(rng.integers(len(pool)))]
        return Attributes(s, c, _choice(rng, sizes), p, b, _choice(rng, textures))
    shapes = ALL_SHAPES if shapes is None else tuple(shapes)
    textures = ALL_TEXTURES if textures is None else tuple(textures)
    for _ in range(1000):
        s, c = _choice(rng, shapes), _choice(rng, colors)
        z, p = _choice(rng, sizes), _choice(rng, positions)
        b, t = _choice(rng, backgrounds), _choice(rng, textures)
        if not compatible(c, b):
            continue
        a = Attributes(s, c, z, p, b, t)
        if split == "train" and is_heldout_combo(a):
            continue
        return a
    raise ValueError("could not sample attributes with these restrictions")


# --------------------------------------------------------------------------------------
# Geometry: shapes and textures on a supersampled grid
# --------------------------------------------------------------------------------------

def shape_inside(shape: str, dx: np.ndarray, dy: np.ndarray, s: float) -> np.ndarray:
    """Boolean: is the point (dx, dy) (relative to the object center, pixels, y down)
    inside `shape` of size `s` (pixels across)?"""
    h = s / 2.0
    adx, ady = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "ring":
        r2 = dx * dx + dy * dy
        return (r2 <= h * h) & (r2 >= (0.25 * s) ** 2)
    if shape == "square":
        a = 0.47 * s
        return (adx <= a) & (ady <= a)
    if shape == "triangle":     # pointing up, base s, height s
        H, W = s, s
        t = (dy + H / 2) / H    # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (adx <= t * W / 2)
    if shape == "cross":        # plus sign, arms 0.36 s thick
        a = 0.18 * s
        return ((adx <= a) & (ady <= h)) | ((ady <= a) & (adx <= h))
    if shape == "hourglass":    # two triangles, wide at top/bottom, waist 0.2 s
        H = 0.95 * h
        return (ady <= H) & (adx <= np.maximum(0.1 * s, 0.5 * s * ady / H))
    raise ValueError(f"unknown shape {shape!r}")


def texture_secondary(texture: str, x: np.ndarray, y: np.ndarray,
                      phase: tuple = (0, 0)) -> np.ndarray:
    """Boolean: does the point (x, y) (canvas pixels) get the second shade?"""
    if texture == "plain":
        return np.zeros(np.broadcast(x, y).shape, dtype=bool)
    fx = np.floor(x - phase[0]).astype(np.int64)
    fy = np.floor(y - phase[1]).astype(np.int64)
    if texture == "striped":
        return np.broadcast_to((fy // 2) % 2 == 1, np.broadcast(x, y).shape)
    if texture == "dotted":
        return (fx % 4 < 2) & (fy % 4 < 2)
    if texture == "checkered":
        return (fx // 3 + fy // 3) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}")


def _sample_coords(n0: int, n1: int) -> np.ndarray:
    """Supersample coordinates of pixels n0..n1-1 (pixel i covers [i, i+1))."""
    return n0 + (np.arange((n1 - n0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE


def _window(c: float, s: float) -> tuple:
    """Pixels lo..hi-1 around centre c that a shape of size s can touch (the caller clips them
    to its image)."""
    return int(np.floor(c - 0.6 * s - 1)), int(np.ceil(c + 0.6 * s + 1))


def coverage(shape: str, cx: float, cy: float, s: float, texture: str = "plain",
             phase: tuple = (0, 0), height: int = IMAGE_SIZE, width: int = IMAGE_SIZE):
    """Anti-aliased coverage of the primary and the secondary shade, each (height, width)
    float32 in [0, 1] (their sum is the object's coverage)."""
    prim = np.zeros((height, width), np.float32)
    sec = np.zeros((height, width), np.float32)
    x0, x1 = _window(cx, s)
    y0, y1 = _window(cy, s)
    x0, x1, y0, y1 = max(0, x0), min(width, x1), max(0, y0), min(height, y1)
    if x1 <= x0 or y1 <= y0:
        return prim, sec
    xs, ys = _sample_coords(x0, x1), _sample_coords(y0, y1)
    X, Y = xs[None, :], ys[:, None]
    inside = shape_inside(shape, X - cx, Y - cy, s)
    hh, ww = y1 - y0, x1 - x0

    def box(m):
        return m.reshape(hh, SUPERSAMPLE, ww, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)

    if texture == "plain":
        prim[y0:y1, x0:x1] = box(inside)
    else:
        second = texture_secondary(texture, X, Y, phase)
        prim[y0:y1, x0:x1] = box(inside & ~second)
        sec[y0:y1, x0:x1] = box(inside & second)
    return prim, sec


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """The continuous parameters of one rendered image (what jitter chose)."""
    cx: float
    cy: float
    size: float
    primary: tuple
    secondary: tuple
    background: tuple
    phase: tuple


def layout(attrs: Attributes, rng: np.random.Generator | None = None,
           jitter: bool = True) -> Layout:
    """Draw the jittered geometry and colors of `attrs` (exact base values if not jitter)."""
    cx, cy, s = POSITION_X[attrs.position], CENTER_Y, SIZE_PX[attrs.size]
    prim = np.array(COLOR_RGB[attrs.color], float)
    bg = np.array(BACKGROUND_RGB[attrs.background], float)
    phase = (0, 0)
    if jitter:
        if rng is None:
            raise ValueError("jitter=True needs an rng")
        u = rng.uniform(-1.0, 1.0, size=3)
        cx += JITTER_X * u[0]
        cy += JITTER_Y * u[1]
        s += JITTER_SIZE * u[2]
        cj = rng.integers(-JITTER_COLOR, JITTER_COLOR + 1, size=4)
        prim = np.clip(prim + cj[:3], 0, 255)
        # background: mostly a brightness change, so a "white" background stays white
        bj = rng.integers(-JITTER_BG_TINT, JITTER_BG_TINT + 1, size=3)
        bg = np.clip(bg + cj[3] + bj, 0, 255)
        ph = rng.integers(0, 4 if attrs.texture != "checkered" else 6, size=2)
        phase = (int(ph[0]), int(ph[1]))
    sec = secondary_rgb(prim, attrs.background)
    return Layout(float(cx), float(cy), float(s), tuple(prim), tuple(sec), tuple(bg), phase)


def render_layout(attrs: Attributes, lay: Layout) -> np.ndarray:
    prim_cov, sec_cov = coverage(attrs.shape, lay.cx, lay.cy, lay.size, attrs.texture, lay.phase)
    bg = np.asarray(lay.background, np.float32)
    img = (bg + prim_cov[..., None] * (np.asarray(lay.primary, np.float32) - bg)
           + sec_cov[..., None] * (np.asarray(lay.secondary, np.float32) - bg))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(attrs: Attributes, rng: np.random.Generator | None = None,
           jitter: bool = True) -> np.ndarray:
    """The (32, 32, 3) uint8 image of `attrs`; `rng` drives the jitter."""
    return render_layout(attrs, layout(attrs, rng, jitter))


# --------------------------------------------------------------------------------------
# Captions and prompts
# --------------------------------------------------------------------------------------

POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
}
POSITION_SHORT = {"left": ("left",), "center": ("center", "middle"), "right": ("right",)}
BACKGROUND_PHRASES = ("on a {} background", "with a {} background")
PREFIXES = ("", "", "", "a photo of ", "an image of ", "a picture of ", "a drawing of ")

P_EMPTY = 0.1
P_DROP = {"size": 0.25, "position": 0.25, "background": 0.3, "texture": 0.15,
          "color": 0.1, "shape": 0.1}
P_SAY_PLAIN = 0.15


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _noun_phrase(words: list) -> str:
    return f"{_article(words[0])} {' '.join(words)}"


def caption(attrs: Attributes, rng: np.random.Generator, p_empty: float = P_EMPTY) -> str:
    """A random training caption of `attrs` (never names held-out shapes or textures)."""
    if rng.random() < p_empty:
        return ""
    # one draw per choice, always all 8 and in this order, so a seed gives the same captions:
    # 0 color, 1 shape, 2 size, 3 texture, 4 position, 5 background, 6 template, 7 phrase order
    u = rng.random(8)
    named_shape = attrs.shape in SHAPES
    generic = _choice(rng, GENERIC_NOUNS)
    say_color = u[0] >= P_DROP["color"]
    if named_shape and (not say_color or u[1] >= P_DROP["shape"]):  # without its color, never without its shape
        noun = attrs.shape
    else:
        noun = generic
    size = attrs.size if u[2] >= P_DROP["size"] else None
    if attrs.texture == "plain":
        texture = "plain" if u[3] < P_SAY_PLAIN else None
    elif attrs.texture in TEXTURES:
        texture = attrs.texture if u[3] >= P_DROP["texture"] else None
    else:
        texture = None                                  # held-out texture: never named
    say_pos = u[4] >= P_DROP["position"]
    say_bg = u[5] >= P_DROP["background"]
    adjs = [w for w in (size, texture, attrs.color if say_color else None) if w]
    words = adjs + [noun]

    style = u[6]
    if style < 0.6:      # "a photo of a large red circle on the left on a black background"
        parts = [_choice(rng, PREFIXES) + _noun_phrase(words)]
        if say_pos:
            parts.append(_choice(rng, POSITION_PHRASES[attrs.position]))
        if say_bg:
            parts.append(_choice(rng, BACKGROUND_PHRASES).format(attrs.background))
        if say_pos and say_bg and u[7] < 0.3:     # background before position
            parts[1], parts[2] = parts[2], parts[1]
        return " ".join(parts)
    if style < 0.85:     # "red triangle, right, white background"
        parts = [" ".join(words)]
        if say_pos:
            parts.append(_choice(rng, POSITION_SHORT[attrs.position]))
        if say_bg:
            parts.append(f"{attrs.background} background")
        return ", ".join(parts)
    # "on the left, a small striped green cross" / "a black background with a red circle"
    np_ = _noun_phrase(words)
    if say_bg and u[7] < 0.5:
        s = f"{_article(attrs.background)} {attrs.background} background with {np_}"
        if say_pos:
            s += " " + _choice(rng, POSITION_PHRASES[attrs.position])
        return s
    s = (_choice(rng, POSITION_PHRASES[attrs.position]) + ", " + np_) if say_pos else np_
    if say_bg:
        s += f" on {attrs.background}"
    return s


def prompt(attrs: Attributes,
           include: Iterable[str] = ("size", "color", "shape", "position", "background"),
           shape_word: str | None = None, texture_word: str | None = None) -> str:
    """The canonical evaluation prompt, e.g. "a large red circle on the left on a black
    background".

    `include` picks the attributes mentioned (the shape noun is always there: the generic
    "object" when "shape" is not included).  `shape_word` replaces the shape noun (e.g. a
    Textual Inversion placeholder "<x>"); a held-out shape without `shape_word` is called
    "object".  `texture_word` (e.g. "<s>") is said as an adjective, like "striped"; without
    it the texture is said only when "texture" is included and it is named and not plain.
    """
    include = set(include)
    unknown = include - set(ATTRIBUTE_NAMES)
    if unknown:
        raise ValueError(f"unknown attributes in include: {sorted(unknown)}")
    if shape_word is not None:
        noun = shape_word
    elif "shape" in include and attrs.shape in SHAPES:
        noun = attrs.shape
    else:
        noun = "object"
    words = []
    if "size" in include:
        words.append(attrs.size)
    if texture_word is not None:
        words.append(texture_word)
    elif "texture" in include and attrs.texture in TEXTURES and attrs.texture != "plain":
        words.append(attrs.texture)
    if "color" in include:
        words.append(attrs.color)
    words.append(noun)
    parts = [_noun_phrase(words)]
    if "position" in include:
        parts.append(POSITION_PHRASES[attrs.position][0])
    if "background" in include:
        parts.append(BACKGROUND_PHRASES[0].format(attrs.background))
    return " ".join(parts)


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------

def item_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of item `index` of the dataset with `seed` (random access)."""
    return np.random.default_rng([int(seed), int(index)])


def make_item(seed: int, index: int, split: str = "train", p_empty: float = P_EMPTY,
              **sample_kw) -> tuple:
    rng = item_rng(seed, index)
    a = sample_attributes(rng, split, **sample_kw)
    img = render(a, rng)
    return img, caption(a, rng, p_empty), a


def make_dataset(n: int, seed: int = 0, split: str = "train", p_empty: float = P_EMPTY,
                 **sample_kw) -> tuple:
    """`n` samples: (images uint8 (n, 32, 32, 3), captions list[str], attrs list[Attributes]).

    Deterministic: item i depends only on (seed, i), so the same seed gives identical bytes
    and a longer dataset extends a shorter one.  `sample_kw` restricts the values drawn
    (see :func:`sample_attributes`).
    """
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions, attrs = [], []
    for i in range(n):
        images[i], c, a = make_item(seed, i, split, p_empty, **sample_kw)
        captions.append(c)
        attrs.append(a)
    return images, captions, attrs


class Dataset:
    """Map-style dataset of the tiny world: item i = (image uint8 (32, 32, 3), caption,
    Attributes), generated on demand (or all at once with ``materialize=True``).

    Item i equals item i of :func:`make_dataset` with the same arguments.
    """

    def __init__(self, n: int, seed: int = 0, split: str = "train", p_empty: float = P_EMPTY,
                 materialize: bool = False, **sample_kw):
        self.n, self.seed, self.split = n, seed, split
        self.p_empty, self.sample_kw = p_empty, sample_kw
        self.data = make_dataset(n, seed, split, p_empty, **sample_kw) if materialize else None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        if self.data is not None:
            return self.data[0][i], self.data[1][i], self.data[2][i]
        return make_item(self.seed, i, self.split, self.p_empty, **self.sample_kw)


def concept_images(concept: str, n: int, seed: int = 0, return_attrs: bool = False):
    """`n` images (uint8 (n, 32, 32, 3)) of one held-out concept, for Textual Inversion.

    A held-out shape ("ring", "hourglass") is drawn with random color / size / position /
    background and a named texture; the held-out texture ("checkered") fills a random named
    shape.  With `return_attrs` also returns the list of Attributes.
    """
    if concept in HELDOUT_SHAPES:
        kw = dict(shapes=(concept,), textures=TEXTURES)
    elif concept in HELDOUT_TEXTURES:
        kw = dict(shapes=SHAPES, textures=(concept,))
    else:
        raise ValueError(f"{concept!r} is not a held-out concept; "
                         f"expected one of {HELDOUT_CONCEPTS}")
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    attrs = []
    for i in range(n):
        rng = np.random.default_rng([int(seed), i, 1 + HELDOUT_CONCEPTS.index(concept)])
        a = sample_attributes(rng, "any", **kw)
        images[i] = render(a, rng)
        attrs.append(a)
    return (images, attrs) if return_attrs else images


# --------------------------------------------------------------------------------------
# A look at the world
# --------------------------------------------------------------------------------------

def save_grid(path: str, images: np.ndarray, captions: Sequence[str] | None = None,
              cols: int = 8, scale: int = 4) -> None:
    """Write images (upscaled nearest-neighbour `scale`x) in a grid, captions underneath."""
    from PIL import Image, ImageDraw

    n = len(images)
    rows = (n + cols - 1) // cols
    cell = IMAGE_SIZE * scale
    text_h = 44 if captions is not None else 0
    tile_w = max(cell, 150 if captions is not None else cell) + 6
    canvas = Image.new("RGB", (cols * tile_w, rows * (cell + text_h + 6)), (60, 60, 60))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = c * tile_w + 3, r * (cell + text_h + 6) + 3
        canvas.paste(Image.fromarray(images[i]).resize((cell, cell), Image.NEAREST), (x, y))
        if captions is not None:
            words, lines, line = captions[i].split(), [], ""
            for w in words:
                if len(line) + len(w) + 1 > 24:
                    lines.append(line)
                    line = w
                else:
                    line = f"{line} {w}".strip()
            lines.append(line)
            draw.multiline_text((x, y + cell + 1), "\n".join(lines[:4]) or "''",
                                fill=(255, 255, 255), spacing=0)
    from ldm.generate import save_image
    save_image(canvas, path)  # through a temporary file: no half-written grid


def main(argv: Sequence[str] | None = None) -> int:
    from ldm.cli import Parser, at_most, check_file_writable, image_path_arg, seed_int
    ap = Parser(prog="python -m tinyworld.world", description="Write a grid of tiny-world samples.")
    ap.add_argument("--grid", type=image_path_arg, default=Path("tinyworld_grid.png"),
                    help="the image to write (.png, .jpg or .webp)")
    ap.add_argument("-n", type=at_most(10000, "one grid"), default=48, help="images in the grid")
    ap.add_argument("--seed", type=seed_int, default=0, help="seed of the rendered images")
    ap.add_argument("--split", choices=("train", "eval", "any"), default="train",
                    help="train: the training images; eval: held-out combinations only; any: no restriction")
    ap.add_argument("--concept", choices=(*HELDOUT_SHAPES, *HELDOUT_TEXTURES), default=None,
                    help="draw one held-out concept instead")
    ap.add_argument("--scale", type=at_most(64, "a 32-px image 2048 px wide"), default=4,
                    help="each pixel drawn as scale x scale")
    args = ap.parse_args(argv)
    if args.concept and "split" in ap.given_options(argv):
        ap.error("--split chooses the dataset's images; --concept draws a held-out concept instead")
    check_file_writable(args.grid, "--grid")
    if args.concept:
        images, attrs = concept_images(args.concept, args.n, args.seed, return_attrs=True)
        captions = [f"[{args.concept}] " + prompt(a, include=ATTRIBUTE_NAMES) for a in attrs]
    else:
        images, captions, attrs = make_dataset(args.n, args.seed, args.split)
        captions = [c if c else "''" for c in captions]
    save_grid(args.grid, images, captions, scale=args.scale)
    print(f"wrote {args.grid}")
    return 0


if __name__ == "__main__":
    import sys
    from ldm.cli import run
    sys.exit(run(main, prog="tinyworld.world", memory_advice="try a smaller -n or --scale"))
