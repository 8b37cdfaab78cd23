"""Read a tiny-world image's attributes back: the tiny world's deterministic "CLIP score".

No learned parameters: hand-written color geometry plus template matching against renders
of the world's own shapes.  ``analyze(image) -> {attribute: value or "unknown"}``.

1. **Background**: per-channel median of the 124 border pixels, named by the nearest palette
   background (within 60).  A non-uniform border (noise, clutter): everything "unknown".
2. **Color**: pixels farther than 40 (RGB, more if the background is noisy) from the
   background are object candidates (fewer
   than :data:`MIN_PIXELS`: nothing there, every object attribute "unknown").  The
   chroma-weighted circular mean hue of the strongly-object ones is named by the nearest
   palette hue, if within 25 degrees, saturated, and a single hue (two objects of different
   colors give a spread of hues: "unknown").
3. **Coverage**: knowing color and background, the object's two shades are known (the
   global color shift is read off the background); each pixel is unmixed by non-negative
   least squares into coverage of the primary and of the secondary shade.  Their sum is a
   soft object mask; the secondary's share is the texture signal.
4. **Shape, size, position**: the soft mask is compared with renders of every shape at
   sizes 6..17 px (quarter-pixel steps) and quarter-pixel offsets, each aligned on the mask's
   centroid, by soft IoU (Tanimoto: sum(a t) / (sum(a^2) + sum(t^2) - sum(a t)), 1 only for
   a perfect match).  Both are "sharpened" around the 0.5 level first, so that a blurred
   edge matches a sharp one.  The best template gives the shape if its IoU reaches that
   shape's :data:`MIN_SHAPE_IOU` (0.78-0.90: clean renders score ~0.97-1.0), the size
   (small below 11 px across) and the center x (position = the nearest of x = 8 / 16 / 24,
   if within 3.5 px).  Shapes outside the world (star, heart, arrow, large diamond, upside-
   down triangle) come out "unknown"; a 9-px diamond is still taken for a circle.
5. **Texture**: the secondary's share inside the object is regressed on every texture
   pattern (striped / dotted / checkered, every phase).  Low contrast: plain; else the
   best-fitting pattern if it explains at least 40 % of the variance, else "unknown".

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
# best soft IoU below which the shape is "unknown" (a little under the worst true-shape IoU
# seen on 3000 images blurred (0.7-1 px) + shifted + noisy (8) + JPEG 75)
MIN_SHAPE_IOU = {"circle": 0.90, "square": 0.90, "triangle": 0.85, "cross": 0.84,
                 "ring": 0.78, "hourglass": 0.78}
BG_MAX_SPREAD = 35.0     # median distance of border pixels to their median (noise std ~22)
BG_MAX_DIST = 60.0       # distance of the border median to the nearest palette background
OBJ_MIN_DIST = 40.0      # a pixel this far (RGB) from the background may be object...
NOISE_MARGIN = 3.2       # ...and at least this times the border's spread (noise)
SMALL_LARGE_SPLIT = 11.0
SIZE_RANGE = (6.5, 16.0)
POSITION_TOLERANCE = 3.5
MAX_WIDTH = 18           # an object wider than this (with no known shape): position unknown
HUE_TOLERANCE = 25.0
MIN_CHROMA = 45.0
MIN_HUE_CONCENTRATION = 0.85  # several hues (e.g. two objects): color unknown
PLAIN_AMPLITUDE = 0.15   # texture contrast (fraction of second shade) below this: plain
TEXTURE_MIN_R2 = 0.40

SHARPEN = 2.0
MASS_RATIO = 1.4         # only templates whose area is within this factor of the object's
_TPL = 24                # template window (pixels)
_PAD = 24
_SIZES = np.arange(6.0, 17.01, 0.25)
_OFFSETS = np.arange(4) / 4.0
# the columns of a template's row in _templates()'s meta table
_SHAPE, _SIZE, _CX, _CY, _MX, _MY, _SUMSQ, _MASS = range(8)


def _sharpen(a: np.ndarray) -> np.ndarray:
    """Steepen soft edges around the 0.5 level (both for templates and observations), so
    that a blurred edge and a sharp one look alike while sub-pixel detail survives."""
    return np.clip((a - 0.5) * SHARPEN + 0.5, 0.0, 1.0).astype(np.float32)


@lru_cache(maxsize=None)
def _templates():
    """Sharpened renders of every shape x size x quarter-pixel offset in a 24x24 window,
    flattened; with per template a row of meta: shape index, size, center x, y, centroid x, y,
    sum of squares, sum (the columns _SHAPE ... _MASS)."""
    masks, meta = [], []
    yy, xx = np.mgrid[0:_TPL, 0:_TPL] + 0.5
    for si, shape in enumerate(W.ALL_SHAPES):
        for s in _SIZES:
            for oy in _OFFSETS:
                for ox in _OFFSETS:
                    cx, cy = _TPL / 2 + ox, _TPL / 2 + oy
                    p, q = W.coverage(shape, cx, cy, s, height=_TPL, width=_TPL)
                    m = _sharpen(p + q)
                    tot = m.sum()
                    meta.append((si, s, cx, cy, (m * xx).sum() / tot, (m * yy).sum() / tot,
                                 (m * m).sum(), tot))
                    masks.append(m.ravel())
    return np.array(masks, dtype=np.float32), np.array(meta, dtype=np.float64)


@lru_cache(maxsize=None)
def _patterns():
    """Texture patterns (second-shade indicator at pixel centers) for all phases."""
    y, x = np.mgrid[0:W.IMAGE_SIZE, 0:W.IMAGE_SIZE] + 0.5
    pats, names = [], []
    for t in ("striped", "dotted", "checkered"):
        n = 6 if t == "checkered" else 4
        phases = [(0, py) for py in range(n)] if t == "striped" else \
            [(px, py) for py in range(n) for px in range(n)]
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


def _fit_shape(alpha: np.ndarray):
    """Best template of each shape for the soft object mask `alpha` (32x32 in [0, 1]) by
    soft IoU (Tanimoto: sum a*t / (sum a^2 + sum t^2 - sum a*t), 1 iff a = t), each
    template aligned on the mask's centroid.
    Returns, per shape of ALL_SHAPES, (IoU, size, center x, center y) of its best template."""
    masks, meta = _templates()
    alpha = _sharpen(alpha)
    yy, xx = np.mgrid[0:W.IMAGE_SIZE, 0:W.IMAGE_SIZE] + 0.5
    mass = float(alpha.sum())
    ocx, ocy = (alpha * xx).sum() / mass, (alpha * yy).sum() / mass
    sq = float((alpha * alpha).sum())
    rx = ocx - meta[:, _MX]   # the whole-pixel shift that puts each template's centroid on the mask's
    ry = ocy - meta[:, _MY]
    dx, dy = np.rint(rx), np.rint(ry)
    keep = ((np.abs(rx - dx) <= 0.3) & (np.abs(ry - dy) <= 0.3)
            & (np.abs(np.log(meta[:, _MASS] / max(mass, 1e-6))) <= np.log(MASS_RATIO)))
    idx = np.nonzero(keep)[0]
    if len(idx) == 0:
        return [(0.0, 0.0, 0.0, 0.0)] * len(W.ALL_SHAPES)
    dx, dy = dx[idx].astype(np.int64), dy[idx].astype(np.int64)
    padded = np.zeros((W.IMAGE_SIZE + 2 * _PAD,) * 2, np.float32)
    padded[_PAD:_PAD + W.IMAGE_SIZE, _PAD:_PAD + W.IMAGE_SIZE] = alpha
    # the window's origin on the canvas is (dx, dy): template pixel (i, j) <-> canvas
    # (dy+i, dx+j); templates sharing a shift share one crop, grouped by (y0, x0) packed
    # into one number, y0 * 1000 + x0
    inter = np.empty(len(idx), np.float64)
    key = (dy + _PAD) * 1000 + (dx + _PAD)
    for kv in np.unique(key):
        g = key == kv
        y0, x0 = divmod(int(kv), 1000)
        if not (0 <= y0 <= padded.shape[0] - _TPL and 0 <= x0 <= padded.shape[1] - _TPL):
            inter[g] = 0.0
            continue
        crop = padded[y0:y0 + _TPL, x0:x0 + _TPL].ravel()
        inter[g] = masks[idx[g]] @ crop
    iou = inter / (sq + meta[idx, _SUMSQ] - inter)
    best = []                      # per shape: (IoU, size, center x, center y)
    shape_of = meta[idx, _SHAPE].astype(np.int64)
    for si in range(len(W.ALL_SHAPES)):
        ks = np.nonzero(shape_of == si)[0]
        if len(ks) == 0:
            best.append((0.0, 0.0, 0.0, 0.0))
            continue
        k = ks[int(np.argmax(iou[ks]))]
        m = meta[idx[k]]
        best.append((float(iou[k]), float(m[_SIZE]), float(m[_CX] + dx[k]), float(m[_CY] + dy[k])))
    return best


def _best_shape(alpha: np.ndarray):
    """(shape index, IoU, size, center x, center y, IoU of each shape): the best of the
    template search over all shapes (a grid of sizes and sub-pixel offsets)."""
    best = _fit_shape(alpha)
    si = int(np.argmax([b[0] for b in best]))
    return (si,) + tuple(best[si]) + ([b[0] for b in best],)


def _unmix(img: np.ndarray, bg: np.ndarray, prim: np.ndarray, sec: np.ndarray,
           two: bool) -> tuple:
    """Per-pixel coverage of the primary and secondary colors over the background
    (non-negative least squares of pixel - bg on the two color directions)."""
    y = (img - bg).reshape(-1, 3)
    p = prim - bg
    pp = float(p @ p) + 1e-6
    cp_only = np.clip(y @ p / pp, 0.0, None)
    if not two:
        return cp_only.reshape(img.shape[:2]), np.zeros(img.shape[:2], np.float32)
    s = sec - bg
    ss = float(s @ s) + 1e-6
    M = np.stack([p, s], 1)                      # (3, 2)
    G = M.T @ M
    if np.linalg.cond(G) > 1e4:                  # both shades in the same direction
        return cp_only.reshape(img.shape[:2]), np.zeros(img.shape[:2], np.float32)
    coef = y @ M @ np.linalg.inv(G)              # (n, 2)
    cs_only = np.clip(y @ s / ss, 0.0, None)
    neg_s = coef[:, 1] < 0
    neg_p = coef[:, 0] < 0
    coef[neg_s, 0], coef[neg_s, 1] = cp_only[neg_s], 0.0
    coef[neg_p & ~neg_s, 0], coef[neg_p & ~neg_s, 1] = 0.0, cs_only[neg_p & ~neg_s]
    return coef[:, 0].reshape(img.shape[:2]), coef[:, 1].reshape(img.shape[:2])


def _texture(frac: np.ndarray, sel: np.ndarray) -> tuple:
    """(texture, amplitude, R^2) from the fraction of second shade `frac` on pixels `sel`."""
    iy, ix = np.nonzero(sel)
    if len(iy) < 6:
        return UNKNOWN, 0.0, 0.0
    v = frac[iy, ix] - frac[iy, ix].mean()
    pats, names = _patterns()
    P = pats[:, iy, ix]
    P = P - P.mean(1, keepdims=True)
    pp = np.einsum("mn,mn->m", P, P)
    pv = P @ v
    vv = float(v @ v) + 1e-9
    ok = pp > 1e-6
    r2 = np.where(ok, pv * pv / (np.where(ok, pp, 1.0) * vv), 0.0)
    amp = np.where(ok, np.abs(pv) / np.where(ok, pp, 1.0), 0.0)
    k = int(np.argmax(r2))
    best_amp, best_r2 = float(amp[k]), float(r2[k])
    if best_r2 >= TEXTURE_MIN_R2 and best_amp >= PLAIN_AMPLITUDE:
        return str(names[k]), best_amp, best_r2
    if best_amp < PLAIN_AMPLITUDE:
        return "plain", best_amp, best_r2
    return UNKNOWN, best_amp, best_r2


def analyze(image: np.ndarray, details: bool = False) -> dict:
    """Attributes of one image ((H, W, 3) uint8, or float in [0, 1]; resized to 32x32):
    a dict attribute -> value or "unknown".  With `details` also returns the measured
    quantities under the key "details"."""
    img = _to_float_image(image)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    spread = float(np.median(np.linalg.norm(border - bg, axis=1)))
    info = {"bg_rgb": bg.tolist(), "bg_spread": spread}

    def done(out):
        if details:
            out["details"] = info
        return out

    if spread > BG_MAX_SPREAD:
        return done(_empty())
    d_bg = np.linalg.norm(_BG_RGB - bg, axis=1)
    background = _BG_NAMES[int(np.argmin(d_bg))] if d_bg.min() <= BG_MAX_DIST else UNKNOWN
    out = _empty(background)

    # -- the object's pixels
    dist = np.linalg.norm(img - bg, axis=2)
    cand = dist > max(OBJ_MIN_DIST, NOISE_MARGIN * spread)
    info["pixels"] = int(cand.sum())
    if cand.sum() < MIN_PIXELS:
        return done(out)
    D = float(np.percentile(dist[cand], 75))

    # -- color: chroma-weighted mean hue of the strongly-object pixels
    strong = cand & (dist > 0.6 * D)
    pix = img[strong] if strong.sum() >= 4 else img[cand]
    hue, chroma = _hue(pix)
    ang = np.deg2rad(hue)
    zs, zc = (chroma * np.sin(ang)).sum(), (chroma * np.cos(ang)).sum()
    mean_h = float(np.rad2deg(np.arctan2(zs, zc)) % 360.0)
    concentration = float(np.hypot(zs, zc) / max(chroma.sum(), 1e-6))   # 1: a single hue
    mean_c = float(chroma.mean())
    dh = np.abs((_HUES - mean_h + 180.0) % 360.0 - 180.0)
    info.update(hue=mean_h, chroma=mean_c, hue_concentration=concentration)
    if (mean_c >= MIN_CHROMA and concentration >= MIN_HUE_CONCENTRATION
            and dh.min() <= HUE_TOLERANCE):
        out["color"] = _HUE_NAMES[int(np.argmin(dh))]

    # -- coverage of the object's two shades (known from the palette once color and
    #    background are named; a global color shift is read off the background)
    if out["color"] != UNKNOWN and background != UNKNOWN:
        shift = bg - _BG_RGB[_BG_NAMES.index(background)]
        prim = np.asarray(W.COLOR_RGB[out["color"]], np.float32)
        sec = W.secondary_rgb(prim, background).astype(np.float32) + shift
        prim = prim + shift
        two = True
    else:
        prim, sec, two = pix.mean(0), pix.mean(0), False
    cp, cs = _unmix(img, bg, prim, sec, two)
    # an object much fainter or stronger than the palette says (e.g. a generated image):
    # bring its coverage back into [0.8, 1.25] (blur alone lowers thin shapes to ~0.85)
    level = float(np.percentile((cp + cs)[strong], 90)) if strong.any() else 1.0
    if level > 0.3:
        factor = level / np.clip(level, 0.8, 1.25)
        cp, cs = cp / factor, cs / factor
    info["coverage_level"] = level
    alpha = np.clip(cp + cs, 0.0, 1.0)
    alpha[alpha < 0.1] = 0.0
    if (alpha >= 0.5).sum() < MIN_PIXELS:
        return done(out)

    # -- shape, size, position
    si, iou, s, cx, cy, per_shape = _best_shape(alpha)
    info.update(shape_iou=iou, size_px=s, cx=cx, cy=cy,
                shape_ious=dict(zip(W.ALL_SHAPES, np.round(per_shape, 3).tolist())))
    if iou >= MIN_SHAPE_IOU[W.ALL_SHAPES[si]]:
        out["shape"] = W.ALL_SHAPES[si]
        if SIZE_RANGE[0] <= s <= SIZE_RANGE[1]:
            out["size"] = "small" if s < SMALL_LARGE_SPLIT else "large"
    else:
        xs = np.nonzero((alpha >= 0.5).any(0))[0]
        cx = (xs.min() + xs.max() + 1) / 2.0
        if xs.max() + 1 - xs.min() > MAX_WIDTH:       # spread out: several things
            cx = np.inf
    centers = np.array([W.POSITION_X[p] for p in W.POSITIONS])
    j = int(np.argmin(np.abs(centers - cx)))
    if abs(centers[j] - cx) <= POSITION_TOLERANCE:
        out["position"] = W.POSITIONS[j]

    # -- texture: where the second shade is
    frac = np.where(alpha > 0, cs / np.maximum(cp + cs, 1e-6), 0.0)
    if two:      # (the second shade is only known when color and background are)
        out["texture"], amp, r2 = _texture(frac, alpha >= 0.6)
        info.update(texture_amplitude=amp, texture_r2=r2)
    return done(out)


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
