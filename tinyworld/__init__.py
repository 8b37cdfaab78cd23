"""A tiny procedural world for training and evaluating a tiny Stable Diffusion on a CPU.

`tinyworld.world` renders 32x32 images of one object with known attributes, captions them
and builds datasets; `tinyworld.analyze` reads the attributes back from an image (the tiny
world's deterministic stand-in for a CLIP score):

    from tinyworld.world import make_dataset, prompt, concept_images
    from tinyworld.analyze import analyze, analyze_batch, evaluate

The names below are also reachable as ``tinyworld.<name>`` (imported on first use, so that
``python -m tinyworld.world`` runs cleanly).  ``tinyworld.analyze`` is the module; its
function is ``tinyworld.analyze.analyze``.
"""
from __future__ import annotations

import importlib

_WORLD = (
    "ALL_SHAPES", "ALL_TEXTURES", "ATTRIBUTE_NAMES", "BACKGROUNDS", "COLORS",
    "HELDOUT_CONCEPTS", "HELDOUT_SHAPES", "HELDOUT_TEXTURES", "POSITIONS", "SHAPES", "SIZES",
    "TEXTURES", "VALUES", "Attributes", "Dataset", "caption", "compatible", "concept_images",
    "heldout_combos", "is_heldout_combo", "make_dataset", "prompt", "render",
    "sample_attributes",
)
_ANALYZE = ("analyze_batch", "degrade", "evaluate")

__all__ = list(_WORLD + _ANALYZE) + ["world", "analyze"]


def __getattr__(name: str):
    if name in ("world", "analyze"):
        return importlib.import_module(f"tinyworld.{name}")
    if name in _WORLD:
        return getattr(importlib.import_module("tinyworld.world"), name)
    if name in _ANALYZE:
        return getattr(importlib.import_module("tinyworld.analyze"), name)
    raise AttributeError(f"module 'tinyworld' has no attribute {name!r}")
