"""A tiny procedural world for training and evaluating a tiny Stable Diffusion on a CPU.

`tinyworld.world` renders 32x32 images of one object with known attributes, captions them
and builds datasets; `tinyworld.analyze` reads the attributes back from an image (the tiny
world's deterministic stand-in for a CLIP score).
"""
from tinyworld.world import (  # noqa: F401
    ALL_SHAPES, ALL_TEXTURES, ATTRIBUTE_NAMES, BACKGROUNDS, COLORS, HELDOUT_CONCEPTS,
    HELDOUT_SHAPES, HELDOUT_TEXTURES, POSITIONS, SHAPES, SIZES, TEXTURES, VALUES,
    Attributes, Dataset, caption, compatible, concept_images, heldout_combos,
    is_heldout_combo, make_dataset, prompt, render, sample_attributes,
)
# `tinyworld.analyze` stays the module (its function is tinyworld.analyze.analyze).
from tinyworld.analyze import analyze_batch, degrade, evaluate  # noqa: F401
