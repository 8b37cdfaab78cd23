"""The tiny world: rendering, captions, held-out concepts and combinations, datasets, and the
analyzer that reads an image's attributes back."""
from __future__ import annotations

import re

import numpy as np
import pytest

from tinyworld import analyze as A
from tinyworld import world as W
from tinyworld.world import Attributes

HELDOUT_WORDS = set(W.HELDOUT_SHAPES) | set(W.HELDOUT_TEXTURES) | {
    "hourglasses", "rings", "checker", "checkerboard", "checked", "checkers"}


def words(text: str) -> set:
    return set(re.findall(r"[a-z<>]+", text.lower()))


@pytest.fixture(scope="module")
def clean_set():
    """600 jittered renders with every shape, texture and combination."""
    return W.make_dataset(600, seed=2024, split="any")


@pytest.fixture(scope="module")
def clean_analyses(clean_set):
    return A.analyze_batch(clean_set[0])


# ----------------------------------------------------------------------------- world


def test_vocabulary_is_consistent():
    assert not set(W.SHAPES) & set(W.HELDOUT_SHAPES)
    assert not set(W.TEXTURES) & set(W.HELDOUT_TEXTURES)
    assert len(W.HELDOUT_SHAPES) == 2 and len(W.HELDOUT_TEXTURES) == 1
    assert set(W.COLOR_RGB) == set(W.COLORS) and set(W.BACKGROUND_RGB) == set(W.BACKGROUNDS)
    with pytest.raises(ValueError):
        Attributes("pentagon", "red", "small", "left", "black")
    with pytest.raises(ValueError):
        Attributes("circle", "red", "small", "top", "black")


def test_backgrounds_never_near_the_object():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3000):
        a = W.sample_attributes(rng, "any")
        assert W.compatible(a.color, a.background)
        seen.add((a.color, a.background))
    for c, b in seen:          # both shades of the object stay far from the background
        prim, bg = np.array(W.COLOR_RGB[c]), np.array(W.BACKGROUND_RGB[b])
        assert np.linalg.norm(prim - bg) >= W.MIN_CONTRAST
        assert np.linalg.norm(W.secondary_rgb(prim, b) - bg) >= W.MIN_CONTRAST
    assert not W.compatible("yellow", "beige")
    assert len(seen) == sum(W.compatible(c, b) for c in W.COLORS for b in W.BACKGROUNDS)


def test_render_shapes_sizes_and_positions():
    for shape in W.ALL_SHAPES:
        a = Attributes(shape, "red", "large", "center", "black")
        img = W.render(a, jitter=False)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert np.array_equal(img, W.render(a, jitter=False))
        assert tuple(img[0, 0]) == W.BACKGROUND_RGB["black"]
        center = W.BACKGROUND_RGB["black"] if shape == "ring" else W.COLOR_RGB["red"]
        assert tuple(img[16, 16]) == center                    # the ring's hole
    # anti-aliased: intermediate values on the edges
    circle = W.render(Attributes("circle", "red", "large", "center", "black"), jitter=False)
    assert len(np.unique(circle[..., 0])) > 5
    # small ~9 px, large ~13 px across
    for size, px in (("small", 9), ("large", 13)):
        p, _ = W.coverage("square", 16, 16, W.SIZE_PX[size])
        assert abs((p.sum(0) > 0.5).sum() - px) <= 1
    # left and right footprints never overlap, even at the largest size and jitter
    big = W.SIZE_PX["large"] + W.JITTER_SIZE
    right_edge_of_left, left_edge_of_right = 0, 32
    for shape in W.ALL_SHAPES:
        p, _ = W.coverage(shape, W.POSITION_X["left"] + W.JITTER_X, 16, big)
        right_edge_of_left = max(right_edge_of_left, np.nonzero(p.sum(0))[0].max())
        p, _ = W.coverage(shape, W.POSITION_X["right"] - W.JITTER_X, 16, big)
        left_edge_of_right = min(left_edge_of_right, np.nonzero(p.sum(0))[0].min())
    assert right_edge_of_left < left_edge_of_right


def test_textures_are_drawn():
    rng = np.random.default_rng(1)
    for tex in W.ALL_TEXTURES:
        a = Attributes("square", "blue", "large", "center", "white", tex)
        img = W.render(a, rng)
        center = img[12:20, 12:20].reshape(-1, 3).astype(int)
        n_colors = len({tuple(c) for c in center})
        assert (n_colors == 1) == (tex == "plain")


def test_dataset_is_deterministic_by_seed():
    imgs, caps, attrs = W.make_dataset(64, seed=7)
    imgs2, caps2, attrs2 = W.make_dataset(64, seed=7)
    assert imgs.dtype == np.uint8 and imgs.shape == (64, 32, 32, 3)
    assert imgs.tobytes() == imgs2.tobytes() and caps == caps2 and attrs == attrs2
    imgs3, caps3, attrs3 = W.make_dataset(64, seed=8)
    assert imgs.tobytes() != imgs3.tobytes() and caps != caps3
    # a longer dataset extends a shorter one; the lazy Dataset agrees item by item
    imgs4, caps4, _ = W.make_dataset(80, seed=7)
    assert np.array_equal(imgs4[:64], imgs) and caps4[:64] == caps
    ds = W.Dataset(64, seed=7)
    for i in (0, 13, 63, -1):
        img, cap, a = ds[i]
        assert np.array_equal(img, imgs[i]) and cap == caps[i] and a == attrs[i]
    assert len(ds) == 64
    with pytest.raises(IndexError):
        ds[64]


def test_dataset_covers_the_world_and_is_fast():
    import time
    t = time.perf_counter()
    imgs, caps, attrs = W.make_dataset(2000, seed=3)
    elapsed = time.perf_counter() - t
    assert elapsed < 8.0                       # ~0.4 ms an image: 50k in ~20 s
    for name in W.ATTRIBUTE_NAMES:
        assert {getattr(a, name) for a in attrs} == set(W.VALUES[name]), name
    assert len({img.tobytes() for img in imgs}) == len(imgs)
    empty = np.mean([c == "" for c in caps])
    assert 0.06 < empty < 0.14


def test_captions_never_name_heldout_concepts():
    imgs, caps, attrs = W.make_dataset(1500, seed=11)
    assert any(a.shape in W.HELDOUT_SHAPES for a in attrs)
    assert any(a.texture in W.HELDOUT_TEXTURES for a in attrs)
    for cap, a in zip(caps, attrs):
        ws = words(cap)
        assert not ws & HELDOUT_WORDS, cap
        if not cap:
            continue
        # a named word is the attribute's own value, never another value's
        for name in ("shape", "color", "size", "background"):
            named = ws & set(W.VALUES[name])
            assert named <= {getattr(a, name)}, (cap, a)
        assert ws & set(W.TEXTURES) <= {a.texture}, (cap, a)
        if a.shape in W.HELDOUT_SHAPES:
            assert ws & set(W.GENERIC_NOUNS), cap
        else:
            assert ws & {a.shape, a.color}, cap        # never both shape and color dropped
    # varied templates, attributes sometimes omitted
    nonempty = [c for c in caps if c]
    assert len({c.split()[0] for c in nonempty}) >= 5
    assert any("," in c for c in nonempty) and any(c.startswith("a photo of") for c in nonempty)
    assert 0.5 < np.mean([a.size in words(c) for c, a in zip(caps, attrs) if c]) < 0.9


def test_prompt():
    a = Attributes("circle", "red", "large", "left", "black")
    assert W.prompt(a) == "a large red circle on the left on a black background"
    assert W.prompt(a, shape_word="<x>") == "a large red <x> on the left on a black background"
    assert W.prompt(a, include=("color", "shape")) == "a red circle"
    b = Attributes("square", "blue", "small", "center", "white", "striped")
    assert W.prompt(b, include=W.ATTRIBUTE_NAMES) == \
        "a small striped blue square in the center on a white background"
    assert W.prompt(b, include=("color", "shape"), texture_word="<s>") == "a <s> blue square"
    ring = Attributes("ring", "yellow", "large", "right", "gray", "checkered")
    p = W.prompt(ring, include=W.ATTRIBUTE_NAMES)
    assert p == "a large yellow object on the right on a gray background"
    assert not words(p) & HELDOUT_WORDS
    assert W.prompt(ring, include=("shape",)) == "an object"


def test_heldout_combinations():
    combos = W.heldout_combos()
    n_all = sum(W.compatible(c, b) for c in W.COLORS for b in W.BACKGROUNDS) \
        * len(W.SHAPES) * len(W.POSITIONS)
    assert 0.08 < len(combos) / n_all < 0.22
    assert combos == W.heldout_combos() and len(set(combos)) == len(combos)
    for s, c, p, b in combos:
        assert s in W.SHAPES and W.compatible(c, b)
        assert W.is_heldout_combo(Attributes(s, c, "small", p, b))
        assert W.is_heldout_combo((s, c, p, b))
    rng = np.random.default_rng(5)
    train = [W.sample_attributes(rng, "train") for _ in range(5000)]
    assert not any(W.is_heldout_combo(a) for a in train)
    _, _, attrs = W.make_dataset(1500, seed=1)
    assert not any(W.is_heldout_combo(a) for a in attrs)
    assert sum(a.combo in set(combos) for a in W.make_dataset(1500, seed=1, split="any")[2]) > 25
    evals = [W.sample_attributes(rng, "eval") for _ in range(300)]
    assert all(W.is_heldout_combo(a) for a in evals)
    assert len({a.combo for a in evals}) > len(combos) // 2


def test_concept_images_show_the_concept():
    for concept in W.HELDOUT_CONCEPTS:
        imgs, attrs = W.concept_images(concept, 40, seed=3, return_attrs=True)
        assert imgs.shape == (40, 32, 32, 3) and imgs.dtype == np.uint8
        assert np.array_equal(imgs, W.concept_images(concept, 40, seed=3))
        assert not np.array_equal(imgs, W.concept_images(concept, 40, seed=4))
        res = A.analyze_batch(imgs)
        if concept in W.HELDOUT_SHAPES:
            assert all(a.shape == concept and a.texture in W.TEXTURES for a in attrs)
            assert np.mean([r["shape"] == concept for r in res]) >= 0.95
        else:
            assert all(a.texture == concept and a.shape in W.SHAPES for a in attrs)
            assert np.mean([r["texture"] == concept for r in res]) >= 0.95
        assert len({(a.color, a.background) for a in attrs}) > 5
    with pytest.raises(ValueError):
        W.concept_images("circle", 4)


# ----------------------------------------------------------------------------- analyzer


def test_analyzer_clean_accuracy(clean_set, clean_analyses):
    _, _, attrs = clean_set
    acc = A.evaluate(None, attrs, clean_analyses)
    for name in W.ATTRIBUTE_NAMES:
        assert acc[name] >= 0.99, (name, acc)
    exact = [A.analyze(W.render(a, jitter=False)) for a in attrs[:50]]
    assert all(r == a.as_dict() for r, a in zip(exact, attrs[:50]))


def test_analyzer_degraded_accuracy(clean_set):
    imgs, _, attrs = clean_set
    rng = np.random.default_rng(0)
    bad = A.degrade(imgs, rng, blur=0.7, shift=20, noise=8, jpeg=75)
    assert bad.shape == imgs.shape and bad.dtype == np.uint8
    assert np.abs(bad.astype(int) - imgs).mean() > 4
    acc = A.evaluate(bad, attrs)
    for name in W.ATTRIBUTE_NAMES:
        assert acc[name] >= 0.95, (name, acc)


def test_analyzer_input_formats(clean_set):
    from PIL import Image
    imgs, _, attrs = clean_set
    for img, a in zip(imgs[:10], attrs[:10]):
        big = np.asarray(Image.fromarray(img).resize((64, 64), Image.NEAREST))
        assert A.analyze(big) == a.as_dict()
        assert A.analyze(img.astype(np.float32) / 255.0) == a.as_dict()
    r = A.analyze(imgs[0], details=True)
    assert "details" in r and "shape_iou" in r["details"]


def test_analyzer_unknown_when_nothing_is_there():
    rng = np.random.default_rng(0)
    objects = ("shape", "color", "size", "position", "texture")
    for bg in W.BACKGROUNDS:
        blank = np.broadcast_to(np.array(W.BACKGROUND_RGB[bg], np.uint8), (32, 32, 3)).copy()
        r = A.analyze(blank)
        assert r["background"] == bg and all(r[k] == A.UNKNOWN for k in objects), r
        noisy = np.clip(blank + rng.normal(0, 8, blank.shape), 0, 255).astype(np.uint8)
        assert all(A.analyze(noisy)[k] == A.UNKNOWN for k in objects)
    for _ in range(5):
        noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        assert all(v == A.UNKNOWN for v in A.analyze(noise).values())
        gauss = np.clip(rng.normal(128, 50, (32, 32, 3)), 0, 255).astype(np.uint8)
        assert all(v == A.UNKNOWN for v in A.analyze(gauss).values())
    # a speck too small to be an object
    speck = np.full((32, 32, 3), 12, np.uint8)
    speck[15:17, 15:17] = W.COLOR_RGB["red"]
    assert all(A.analyze(speck)[k] == A.UNKNOWN for k in objects)
    # two objects of different colors: no single color, no single place
    red = W.render(Attributes("circle", "red", "small", "left", "black"), jitter=False)
    blue = W.render(Attributes("square", "blue", "small", "right", "black"), jitter=False)
    two = np.maximum(red, blue)
    r = A.analyze(two)
    assert r["color"] == A.UNKNOWN and r["shape"] == A.UNKNOWN and r["position"] == A.UNKNOWN


def test_analyzer_unknown_for_shapes_outside_the_world():
    from PIL import Image, ImageDraw
    star = [(np.cos(-np.pi / 2 + k * np.pi / 5) * (1 if k % 2 == 0 else 0.45),
             np.sin(-np.pi / 2 + k * np.pi / 5) * (1 if k % 2 == 0 else 0.45)) for k in range(10)]
    arrow = [(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)]
    down = [(-1, -0.9), (1, -0.9), (0, 0.9)]
    for poly in (star, arrow, down):
        im = Image.new("RGB", (128, 128), (12, 12, 12))
        ImageDraw.Draw(im).polygon([((16 + x * 6.5) * 4, (16 + y * 6.5) * 4) for x, y in poly],
                                   fill=W.COLOR_RGB["green"])
        r = A.analyze(np.asarray(im.resize((32, 32), Image.BOX)))
        assert r["shape"] == A.UNKNOWN and r["color"] == "green", r


def test_the_grid_tool_refuses_a_split_it_would_ignore(tmp_path, capsys):
    """--concept draws held-out images; a --split given with it would be ignored: refused."""
    from ldm.cli import run
    grid = tmp_path / "g.png"
    assert run(W.main, ["--concept", "ring", "--split", "eval", "-n", "2", "--grid", str(grid)], prog="w") == 2
    assert "--split chooses the dataset's images" in capsys.readouterr().err and not grid.exists()
    assert run(W.main, ["--concept", "ring", "-n", "2", "--grid", str(grid)], prog="w") == 0 and grid.exists()
