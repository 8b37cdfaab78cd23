"""Read a tiny-world image's attributes back: the tiny world's deterministic "CLIP score".

No learned parameters: hand-written geometry plus template matching against clean renders.

1. **Background**: per-channel median of the 124 border pixels, named by the nearest palette
   color.  If the border is not uniform (pure noise, clutter) everything is "unknown".
2. **Object mask**: pixels whose RGB distance from the background exceeds a threshold that
   adapts to the object's contrast (0.42 of the typical object distance, at least 40).
   Fewer than :data:`MIN_PIXELS` such pixels: no object, every object attribute "unknown".
3. **Shape, size, position**: the mask is compared (intersection over union) with binary
   renders of every shape at sizes 6..17 px in half-pixel steps and quarter-pixel offsets,
   each aligned on the mask's centroid.  The best template gives the shape (if its IoU is at
   least :data:`MIN_SHAPE_IOU`), the size (small below 11 px across) and the center x
   (position = the nearest of x = 8 / 16 / 24, if within 3.5 px).
4. **Color**: chroma-weighted circular mean of the hue of strongly-object pixels, named by
   the nearest palette hue (if within 25 degrees and saturated enough).
5. **Texture**: the colors of the mask's interior are projected on their principal axis;
   that profile is regressed on every texture pattern (striped / dotted / checkered, all
   phases).  Small contrast = plain; else the best-fitting pattern, if it fits well.

:func:`degrade` applies the degradations used to test robustness (blur, color shift, noise,
JPEG) and :func:`evaluate` scores analyses against true attributes.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

from tinyworld import world as W

UNKNOWN = "unknown"
MIN_PIXELS = 12          # fewer object pixels than this: nothing there
MIN_SHAPE_IOU = 0.62     # below: shape "unknown"
BG_MAX_SPREAD = 22.0     # median distance of border pixels to their median
BG_MAX_DIST = 60.0       # distance of the border median to the nearest palette background
OBJ_MIN_DIST = 40.0      # absolute lower bound of the mask threshold
MASK_FRACTION = 0.42     # mask threshold = this * typical object distance
SMALL_LARGE_SPLIT = 11.0
SIZE_RANGE = (6.5, 16.0)
POSITION_TOLERANCE = 3.5
HUE_TOLERANCE = 25.0
MIN_CHROMA = 45.0
PLAIN_AMPLITUDE = 28.0   # texture contrast below this: plain
TEXTURE_MIN_R2 = 0.40

_TPL = 24                # template window (pixels)
_PAD = 24
_SIZES = np.arange(6.0, 17.01, 0.5)
_OFFSETS = np.arange(4) / 4.0


@lru_cache(maxsize=None)
def _templates():
    """Soft (anti-aliased) renders of every shape x size x quarter-pixel offset in a 24x24
    window, flattened, with per template: shape index, size, center x, y, centroid x, y,
    sum of coverage."""
    masks, meta = [], []
    yy, xx = np.mgrid[0:_TPL, 0:_TPL] + 0.5
    for si, shape in enumerate(W.ALL_SHAPES):
        for s in _SIZES:
            for oy in _OFFSETS:
                for ox in _OFFSETS:
                    cx, cy = _TPL / 2 + ox, _TPL / 2 + oy
                    p, q = W.coverage(shape, cx, cy, s, height=_TPL, width=_TPL)
                    m = p + q
                    tot = m.sum()
                    meta.append((si, s, cx, cy, (m * xx).sum() / tot, (m * yy).sum() / tot, tot))
                    masks.append(m.ravel())
    masks = np.array(masks, dtype=np.float32)
    meta = np.array(meta, dtype=np.float64)
    return masks, meta


@lru_cache(maxsize=None)
def _patterns():
    """Texture patterns (second-shade indicator at pixel centers) for all phases."""
    y, x = np.mgrid[0:W.IMAGE_SIZE, 0:W.IMAGE_SIZE] + 0.5
    pats, names = [], []
    for t in ("striped", "dotted", "checkered"):
        phases = [(0, py) for py in range(4)] if t == "striped" else \
            [(px, py) for py in range(4) for px in range(4)]
        for ph in phases:
            pats.append(W.texture_secondary(t, x, y, ph).astype(np.float32))
            names.append(t)
    return np.array(pats), np.array(names)


_BG_NAMES = W.BACKGROUNDS
_BG_RGB = np.array([W.BACKGROUND_RGB[b] for b in W.BACKGROUNDS], np.float32)
_HUE_NAMES = W.COLORS
_HUES = np.array([W.COLOR_HUE[c] for c in W.COLORS])


def _to_float_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.max() <= 1.0 + 1e-6:
            image = image * 255.0
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if image.shape[:2] != (W.IMAGE_SIZE, W.IMAGE_SIZE):
        from PIL import Image
        image = np.asarray(Image.fromarray(image).resize((W.IMAGE_SIZE, W.IMAGE_SIZE),
                                                          Image.BOX))
    return image.astype(np.float32)


def _hue(rgb: np.ndarray) -> tuple:
    """Hue in degrees and chroma of (n, 3) colors."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    mx, mn = rgb.max(1), rgb.min(1)
    c = mx - mn
    safe = np.where(c > 0, c, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0,
                 np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return h * 60.0, c


def _empty(background: str = UNKNOWN) -> dict:
    d = {a: UNKNOWN for a in W.ATTRIBUTE_NAMES}
    d["background"] = background
    return d


def _fit_shape(mask: np.ndarray):
    """Best template for the binary mask: (shape index, size, center x, center y, IoU,
    best IoU of each shape)."""
    masks, meta = _templates()
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    ocx, ocy = xs.mean() + 0.5, ys.mean() + 0.5
    rx = ocx - meta[:, 4]
    ry = ocy - meta[:, 5]
    dx, dy = np.rint(rx), np.rint(ry)
    keep = (np.abs(rx - dx) <= 0.3) & (np.abs(ry - dy) <= 0.3)
    idx = np.nonzero(keep)[0]
    dx, dy = dx[idx].astype(np.int64), dy[idx].astype(np.int64)
    padded = np.zeros((W.IMAGE_SIZE + 2 * _PAD,) * 2, np.float32)
    padded[_PAD:_PAD + W.IMAGE_SIZE, _PAD:_PAD + W.IMAGE_SIZE] = mask
    ar = np.arange(_TPL)
    # window origin on the canvas is (dx, dy): template pixel (i, j) <-> canvas (dy+i, dx+j)
    rows = (dy + _PAD)[:, None, None] + ar[None, :, None]
    cols = (dx + _PAD)[:, None, None] + ar[None, None, :]
    np.clip(rows, 0, padded.shape[0] - 1, out=rows)
    np.clip(cols, 0, padded.shape[1] - 1, out=cols)
    crops = padded[rows, cols].reshape(len(idx), -1)
    inter = np.einsum("kp,kp->k", crops, masks[idx])
    iou = inter / (area + meta[idx, 6] - inter)
    per_shape = np.zeros(len(W.ALL_SHAPES))
    np.maximum.at(per_shape, meta[idx, 0].astype(np.int64), iou)
    k = int(np.argmax(iou))
    m = meta[idx[k]]
    return int(m[0]), float(m[1]), float(m[2] + dx[k]), float(m[3] + dy[k]), float(iou[k]), per_shape


def _texture(img: np.ndarray, mask: np.ndarray) -> tuple:
    """(texture name or unknown, amplitude, best R^2)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    iy, ix = np.nonzero(inner)
    if len(iy) < 6:
        iy, ix = np.nonzero(mask)
        if len(iy) < 6:
            return UNKNOWN, 0.0, 0.0
    cols = img[iy, ix]
    cols = cols - cols.mean(0)
    cov = cols.T @ cols / len(cols)
    _, vecs = np.linalg.eigh(cov)
    v = cols @ vecs[:, -1]
    pats, names = _patterns()
    P = pats[:, iy, ix]
    P = P - P.mean(1, keepdims=True)
    pp = np.einsum("mn,mn->m", P, P)
    pv = P @ v
    vv = float(v @ v) + 1e-6
    ok = pp > 1e-6
    r2 = np.where(ok, pv * pv / (np.where(ok, pp, 1.0) * vv), 0.0)
    amp = np.where(ok, np.abs(pv) / np.where(ok, pp, 1.0), 0.0)
    k = int(np.argmax(r2))
    best_amp, best_r2 = float(amp[k]), float(r2[k])
    if best_amp < PLAIN_AMPLITUDE:
        return "plain", best_amp, best_r2
    if best_r2 < TEXTURE_MIN_R2:
        return UNKNOWN, best_amp, best_r2
    return str(names[k]), best_amp, best_r2


def analyze(image: np.ndarray, details: bool = False) -> dict:
    """Attributes of one image ((H, W, 3) uint8, or float in [0, 1]; resized to 32x32):
    a dict attribute -> value or "unknown".  With `details` also returns the measured
    quantities under the key "details"."""
    img = _to_float_image(image)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    spread = float(np.median(np.linalg.norm(border - bg, axis=1)))
    info = {"bg_rgb": bg.tolist(), "bg_spread": spread}
    if spread > BG_MAX_SPREAD:
        out = _empty()
        if details:
            out["details"] = info
        return out
    d_bg = np.linalg.norm(_BG_RGB - bg, axis=1)
    background = _BG_NAMES[int(np.argmin(d_bg))] if d_bg.min() <= BG_MAX_DIST else UNKNOWN
    out = _empty(background)

    dist = np.linalg.norm(img - bg, axis=2)
    cand = dist > OBJ_MIN_DIST
    info["pixels"] = int(cand.sum())
    if cand.sum() < MIN_PIXELS:
        if details:
            out["details"] = info
        return out
    D = float(np.percentile(dist[cand], 75))
    mask = dist > max(OBJ_MIN_DIST, MASK_FRACTION * D)
    if mask.sum() < MIN_PIXELS:
        if details:
            out["details"] = info
        return out

    si, s, cx, cy, iou, per_shape = _fit_shape(mask)
    info.update(shape_iou=iou, size_px=s, cx=cx, cy=cy,
                shape_ious=dict(zip(W.ALL_SHAPES, np.round(per_shape, 3).tolist())))
    if iou >= MIN_SHAPE_IOU:
        out["shape"] = W.ALL_SHAPES[si]
        if SIZE_RANGE[0] <= s <= SIZE_RANGE[1]:
            out["size"] = "small" if s < SMALL_LARGE_SPLIT else "large"
    else:
        ys, xs = np.nonzero(mask)
        cx = (xs.min() + xs.max() + 1) / 2.0
    centers = np.array([W.POSITION_X[p] for p in W.POSITIONS])
    j = int(np.argmin(np.abs(centers - cx)))
    if abs(centers[j] - cx) <= POSITION_TOLERANCE:
        out["position"] = W.POSITIONS[j]

    strong = mask & (dist > 0.7 * D)
    pix = img[strong] if strong.sum() >= 4 else img[mask]
    hue, chroma = _hue(pix)
    w = chroma
    ang = np.deg2rad(hue)
    mean_h = np.rad2deg(np.arctan2((w * np.sin(ang)).sum(), (w * np.cos(ang)).sum())) % 360.0
    mean_c = float(chroma.mean())
    dh = np.abs((_HUES - mean_h + 180.0) % 360.0 - 180.0)
    info.update(hue=float(mean_h), chroma=mean_c)
    if mean_c >= MIN_CHROMA and dh.min() <= HUE_TOLERANCE:
        out["color"] = _HUE_NAMES[int(np.argmin(dh))]

    tex, amp, r2 = _texture(img, mask)
    info.update(texture_amplitude=amp, texture_r2=r2)
    out["texture"] = tex
    if details:
        out["details"] = info
    return out


def analyze_batch(images, details: bool = False) -> list:
    """:func:`analyze` of each image of a (N, H, W, 3) array or a list of images."""
    return [analyze(im, details) for im in images]


# --------------------------------------------------------------------------------------
# Robustness and scoring
# --------------------------------------------------------------------------------------

def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
    h = sum(k[i] * p[:, i:i + img.shape[1]] for i in range(2 * r + 1))
    return sum(k[i] * h[i:i + img.shape[0]] for i in range(2 * r + 1))


def degrade(images: np.ndarray, rng: np.random.Generator, blur: float = 0.7,
            shift: float = 20.0, noise: float = 8.0, jpeg: int | None = 75,
            jpeg_subsampling: int = 0) -> np.ndarray:
    """Degraded copies of uint8 images (N, H, W, 3): Gaussian blur of std `blur` px, a
    per-image per-channel color shift uniform in +-`shift`, Gaussian noise of std `noise`,
    then JPEG at quality `jpeg` (each step off when 0 / None).  `jpeg_subsampling` is PIL's
    chroma subsampling: 0 = 4:4:4 (default, a mild softening), 2 = 4:2:0 (halves the color
    resolution: harsh on 32x32 images, whose objects are only 8-14 px)."""
    from PIL import Image

    images = np.asarray(images)
    single = images.ndim == 3
    if single:
        images = images[None]
    out = np.empty_like(images)
    for i, im in enumerate(images):
        x = im.astype(np.float64)
        if blur:
            x = _gaussian_blur(x, blur)
        if shift:
            x = x + rng.uniform(-shift, shift, size=3)
        if noise:
            x = x + rng.normal(0.0, noise, size=x.shape)
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        if jpeg:
            buf = io.BytesIO()
            Image.fromarray(x).save(buf, format="JPEG", quality=int(jpeg),
                                     subsampling=int(jpeg_subsampling))
            x = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        out[i] = x
    return out[0] if single else out


def evaluate(images, attrs, analyses: list | None = None,
             attributes=W.ATTRIBUTE_NAMES) -> dict:
    """Per-attribute accuracy of the analyzer on images whose true Attributes are known
    ("unknown" counts as wrong), plus the rate of "unknown" under "<attr>_unknown"."""
    if analyses is None:
        analyses = analyze_batch(images)
    res = {}
    for a in attributes:
        truth = [getattr(t, a) for t in attrs]
        got = [r[a] for r in analyses]
        res[a] = float(np.mean([g == t for g, t in zip(got, truth)]))
        res[a + "_unknown"] = float(np.mean([g == UNKNOWN for g in got]))
    return res
