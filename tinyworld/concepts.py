"""Scoring a learned word on the tiny world: reconstruction and editability.

reconstruction: share of samples from "a photo of <x>"-style prompts that the analyzer
    reads as the concept (shape "ring", or texture "checkered").
editability: share of prompts that also name other attributes ("a small red <x> on the
    left on a black background") whose other attributes are all honored.
The baseline is the best plain caption: the base model prompted with ordinary words.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from tinyworld import world as W

RECONSTRUCTION_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a {}",
                            "a drawing of a {}", "a photo of the {}")
STYLE_RECONSTRUCTION_TEMPLATES = ("a {} object", "a {} shape", "a photo of a {} thing", "an image of a {} object")
EDITED = ("size", "color", "position", "background")


def concept_attribute(concept: str) -> str:
    if concept in W.HELDOUT_SHAPES:
        return "shape"
    if concept in W.HELDOUT_TEXTURES:
        return "texture"
    raise ValueError(f"{concept!r} is not a held-out concept of the tiny world ({', '.join(W.HELDOUT_CONCEPTS)})")


def default_init_word(concept: str) -> str:
    return "object" if concept_attribute(concept) == "shape" else "pattern"


def reconstruction_prompts(concept: str, word: str, n: int) -> List[str]:
    templates = RECONSTRUCTION_TEMPLATES if concept_attribute(concept) == "shape" else STYLE_RECONSTRUCTION_TEMPLATES
    return [templates[i % len(templates)].format(word) for i in range(n)]


def edit_attributes(concept: str, n: int, seed: int = 0) -> List[W.Attributes]:
    """n random settings of the other attributes (compatible colors), with the concept itself."""
    rng = np.random.default_rng([seed, 4242])
    kw = dict(shapes=(concept,), textures=("plain",)) if concept_attribute(concept) == "shape" \
        else dict(shapes=W.SHAPES, textures=(concept,))
    return [W.sample_attributes(rng, "any", **kw) for _ in range(n)]


def edit_prompt(attrs: W.Attributes, concept: str, word: str) -> str:
    if concept_attribute(concept) == "shape":
        return W.prompt(attrs, shape_word=word)
    return W.prompt(attrs, include=("size", "color", "shape", "position", "background"), texture_word=word)


def score(images: np.ndarray, concept: str, attrs: Sequence[W.Attributes] | None = None) -> Dict[str, float]:
    """concept: share read as the concept; edit: share with every other named attribute right."""
    from tinyworld.analyze import analyze_batch
    reads = analyze_batch(images)
    key = concept_attribute(concept)
    out = {"concept": float(np.mean([r[key] == concept for r in reads]))}
    if attrs is not None:
        others = EDITED + (("shape",) if key == "texture" else ())
        out["edit"] = float(np.mean([all(r[a] == getattr(t, a) for a in others) for r, t in zip(reads, attrs)]))
        out["edit_and_concept"] = float(np.mean([all(r[a] == getattr(t, a) for a in others) and r[key] == concept
                                                 for r, t in zip(reads, attrs)]))
    return out


def mean_scores(runs: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """The average over runs (seeds) of each score."""
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


def evaluate_word(model, concept: str, word: str, n: int = 64, steps: int = 50, scale: float = 7.5,
                  seed: int = 0, learned=None, **generate_kw) -> Dict[str, float]:
    """Reconstruction and editability of `word`: plain words, or a placeholder of `learned`
    (a LearnedEmbeddings, whose multi-vector words are expanded in the prompts)."""
    from tinyworld.evaluate import sample_prompts
    expand = (lambda p: p) if learned is None else learned.expand
    if learned is not None:
        generate_kw["new_embeddings"] = learned.mapping()
    seeds = [seed + i for i in range(n)]
    rec_prompts = [expand(p) for p in reconstruction_prompts(concept, word, n)]
    rec_images = sample_prompts(model, rec_prompts, seeds, steps, scale, **generate_kw)
    attrs = edit_attributes(concept, n, seed)
    edit_images = sample_prompts(model, [expand(edit_prompt(a, concept, word)) for a in attrs], seeds, steps, scale,
                                 **generate_kw)
    edit = score(edit_images, concept, attrs)
    return {"reconstruction": score(rec_images, concept)["concept"], "editability": edit["edit"],
            "edit_and_concept": edit["edit_and_concept"]}


def scores_line(word: str, concept: str, scores: Dict[str, float], seconds: float, n: int = 64) -> str:
    """The line a training run prints after scoring its word on the tiny world."""
    return (f"{word} on the tiny world ({seconds:.0f} s, {n} samples each, DDIM 50): "
            f"reconstruction {scores['reconstruction']:.0%} (read as {concept}), "
            f"editability {scores['editability']:.0%} (other attributes honored)")


def evaluate_context(model, concept: str, context, n: int = 64, steps: int = 50, scale: float = 7.5,
                     seed: int = 0) -> Dict[str, float]:
    """Reconstruction of samples drawn from a fixed U-Net context (77, D) in place of a prompt's
    text-encoder output (the unconditional half stays the empty prompt's)."""
    from tinyworld import whole_context
    images = whole_context.sample(model, context, n, steps, scale, seed)
    return {"reconstruction": score(images, concept)["concept"]}


BASELINE_WORDS = {"shape": ("object", "circle", "square", "triangle", "cross", "shape"),
                  "texture": ("striped", "dotted", "plain", "pattern")}


def best_plain_caption(model, concept: str, n: int = 32, steps: int = 50, seed: int = 0, scale: float = 7.5):
    """(word, reconstruction) of the ordinary word that best draws the concept."""
    results = {w: evaluate_word(model, concept, w, n=n, steps=steps, scale=scale, seed=seed)["reconstruction"]
               for w in BASELINE_WORDS[concept_attribute(concept)]}
    word = max(results, key=results.get)
    return word, results[word]
