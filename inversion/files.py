"""Learned-embedding files: save ours, read everyone's, and register their words with a model.

Layouts (D is the text encoder's width: 768 for SD v1):

    ours / diffusers   x.safetensors           {word: float32 (n, D)}, string metadata
                                               (base_model_hash, base_model_weights,
                                               init_word, step, method, ...)
    diffusers (old)    learned_embeds.bin      torch.save({word: (D,) or (n, D)})
    sd-concepts-lib.   learned_embeds.bin      torch.save({"<cat-toy>": (768,)})
    AUTOMATIC1111      name.pt                 torch.save({"string_to_token": {"*": 265},
                                                           "string_to_param": {"*": (n, D)},
                                                           "name", "step", "sd_checkpoint",
                                                           "sd_checkpoint_name"})
    AUTOMATIC1111      name.safetensors        {"emb_params": (n, D)}, string metadata
    the paper's code   embeddings.pt           torch.save({"string_to_token": {"*": tensor(265)},
                                                           "string_to_param": nn.ParameterDict({"*": (n, D)})})

An AUTOMATIC1111 embedding is used in prompts by its file name (`name`), so that is its
word here too (and for the paper's files, whose word "*" is not a usable placeholder). A file of ours holding one word is exactly what diffusers'
`load_textual_inversion` reads; with several words it is ours only.

Every write goes through a temporary file and a rename; pickled files are read with
`torch.load(weights_only=True)`, which refuses to run code. Anything wrong gives an
`EmbeddingError` whose message is one line saying what the file is and what was expected.
"""
from __future__ import annotations

import functools
import hashlib
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from inversion.hook import sub_tokens
from ldm.files import LoadError, atomic_write, file_format, file_hash, unreadable, unsafe_pickle
from ldm.load import (TRAINING_CHECKPOINT_HINT, TRAINING_CHECKPOINT_KEYS, diffusers_weights_file, model_weights_hash,
                      shard_files)

PathLike = Union[str, Path]

# Metadata keys we write (all values are strings, as safetensors requires).
BASE_MODEL_HASH = "base_model_hash"   # ldm.files.file_hash of the checkpoint it was trained on
BASE_MODEL_WEIGHTS = "base_model_weights"  # ldm.load.weights_hash of it: the same in any layout, fp16 too
BASE_MODEL = "base_model"             # that checkpoint's file name, for people
A1111_TOKEN_ID = 265                  # the id AUTOMATIC1111 writes in "string_to_token" (unused by readers)
MAX_VECTORS = 75                      # 77 positions minus start and end of text
MAX_WORDS = 16                        # more tensors than this: some network's weights, not words
MAX_FILE_BYTES = 256 << 20            # an embedding is KBs, but diffusers' example, trained on a CPU, pickles
                                      # its rows as a view that drags the whole 49408 x 768 table (152 MB)
KNOWN_WIDTHS = {768: "an SD 1.x embedding", 1024: "an SD 2.x embedding", 1280: "an SDXL embedding"}

Embeddings = List[Tuple[str, torch.Tensor]]


class EmbeddingError(LoadError):
    """An embedding file that cannot be used; the message is one line meant for the user."""


# ----------------------------------------------------------------------------- saving

def _as_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """(D,) or (n, D) -> a contiguous float32 (n, D) copy on the CPU."""
    if not torch.is_tensor(vectors) or vectors.dim() not in (1, 2) or vectors.numel() == 0:
        raise ValueError(f"an embedding must be a non-empty (n, D) or (D,) tensor, got "
                         f"{tuple(vectors.shape) if torch.is_tensor(vectors) else type(vectors).__name__}")
    return vectors.detach().to("cpu", torch.float32).reshape(-1, vectors.shape[-1]).contiguous().clone()


def _string_metadata(metadata: Optional[Mapping]) -> Dict[str, str]:
    return {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}


def save_embeddings(path: PathLike, embeds: Mapping[str, torch.Tensor],
                    metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write {word: (n, D)} as float32 safetensors with string metadata (our format).

    One word per file is also diffusers' `learned_embeds.safetensors` layout."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: learned embeddings are saved as .safetensors (use save_a1111 for .pt)")
    if not embeds:
        raise ValueError("nothing to save: no learned words")
    tensors = {word: _as_matrix(v) for word, v in embeds.items()}
    if len({t.shape[1] for t in tensors.values()}) > 1:
        raise ValueError("all words of one file must have the same width")
    meta = {"format": "pt", **_string_metadata(metadata)}
    from safetensors.torch import save_file
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def save_a1111(path: PathLike, word: str, vectors: torch.Tensor, step: Optional[int],
               name: Optional[str] = None, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write one word in AUTOMATIC1111's layout: `.pt` (pickled dict) or `.safetensors` (`emb_params`).

    AUTOMATIC1111 calls the embedding by its file name, so `name` defaults to the file stem;
    `word` (the placeholder used in training) and `metadata` are kept for reference. The
    .pt holds only dicts, strings, ints and one tensor, so it loads with weights_only=True."""
    path = Path(path)
    vec = _as_matrix(vectors)
    meta = _string_metadata(metadata)
    name = name or path.stem
    if path.suffix == ".pt":
        data = {
            "string_to_token": {"*": A1111_TOKEN_ID},
            "string_to_param": {"*": vec},
            "name": name,
            "step": None if step is None else int(step),
            "sd_checkpoint": meta.get(BASE_MODEL_HASH),
            "sd_checkpoint_name": meta.get(BASE_MODEL),
            "word": word,
            "metadata": meta,   # ignored by AUTOMATIC1111 and diffusers
        }
        atomic_write(path, lambda tmp: torch.save(data, tmp))
    elif path.suffix == ".safetensors":
        meta = {"format": "pt", **meta, "name": name, "word": word}
        if step is not None:
            meta["step"] = str(int(step))
        from safetensors.torch import save_file
        atomic_write(path, lambda tmp: save_file({"emb_params": vec}, tmp, metadata=meta))
    else:
        raise ValueError(f"{path}: an AUTOMATIC1111 embedding is a .pt or .safetensors file")
    return path


# ----------------------------------------------------------------------------- reading

def _read(path: Path) -> Tuple[object, Dict[str, str]]:
    """The raw object of a file (a dict of tensors, usually) and its safetensors metadata."""
    if not path.exists():
        raise EmbeddingError(f"{path}: no such file")
    if not path.is_file() and not path.is_dir():  # a pipe would block the read until it is written to
        raise EmbeddingError(f"{path}: is not a regular file or a folder")
    if path.is_dir():
        files = [path / n for n in ("learned_embeds.safetensors", "learned_embeds.bin") if (path / n).is_file()]
        if not files:
            raise EmbeddingError(f"{path}: is a folder without learned_embeds.safetensors or learned_embeds.bin")
        path = files[0]
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:  # checked before reading: a 4 GB model must not be loaded to say no
        raise EmbeddingError(f"{path}: is {size / 2**20:,.0f} MB, far too big for a textual-inversion embedding "
                             "(a few KB); it looks like a full model or a LoRA")
    form = file_format(path)
    if form == "safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                _refuse_other_method(path, f.metadata() or {})
                if len(keys) > MAX_WORDS:
                    raise _not_an_embedding(path, keys)
                return {k: f.get_tensor(k) for k in keys}, dict(f.metadata() or {})
        except EmbeddingError:
            raise
        except Exception as e:
            raise EmbeddingError(unreadable(path, "safetensors", e, advice="")) from None
    if form == "pickle":
        try:
            # The original Textual Inversion code pickles its vectors in an nn.ParameterDict: allowed
            # (it is rebuilt from its __dict__, no code runs); anything else unknown is refused.
            with torch.serialization.safe_globals([torch.nn.ParameterDict]):
                return torch.load(path, map_location="cpu", weights_only=True), {}
        except Exception as e:
            name = unsafe_pickle(e)
            if name:
                raise EmbeddingError(f"{path}: refuses to load safely (it pickles {name}, which could "
                                     "run code); convert it to .safetensors with a tool you trust") from None
            raise EmbeddingError(unreadable(path, "a PyTorch file", e, advice="")) from None
    raise EmbeddingError(f"{path}: unknown embedding format '{path.suffix}'; expected .safetensors, .pt or .bin")


# Files of this project's other methods, which are not words: what loads them instead.
OTHER_METHODS = {"hiper": "a HiPer embedding tail: load it with sample.py --hiper FILE",
                 "neti": "a NeTI mapper: load it with sample.py --neti FILE"}


def _refuse_other_method(path: Path, metadata: Mapping[str, str]) -> None:
    method = metadata.get("method")
    if method in OTHER_METHODS:
        raise EmbeddingError(f"{path}: is not a textual-inversion embedding but {OTHER_METHODS[method]}")


# A network's tensor names ("proj.0.weight"), which a word such as "<toy-v1.5>" is not.
MODULE_PATH = re.compile(r"[A-Za-z_]\w*(\.\w+)+")


def _not_an_embedding(path: Path, keys: Sequence[str]) -> EmbeddingError:
    keys = list(keys)
    if any("lora" in k.lower() for k in keys):
        looks = "a LoRA"
    elif len(keys) > 100 or any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                                              "text_model.", "down_blocks.")) for k in keys):
        looks = "a full model"
    else:
        looks = "network weights, not word vectors"
    return EmbeddingError(f"{path}: is not a textual-inversion embedding: it holds {len(keys):,} tensors "
                          f"(first: {keys[0]}), like {looks}")


def _classify(path: Path, obj, metadata: Dict[str, str]) -> Tuple[Embeddings, Dict[str, str]]:
    """Tell the layouts apart; returns [(word, tensor)] and the metadata as strings."""
    stem = path.stem if path.is_file() else path.name
    if torch.is_tensor(obj):  # a bare tensor: named by its file, like AUTOMATIC1111 does
        return [(stem, obj)], metadata
    if not isinstance(obj, dict):
        raise EmbeddingError(f"{path}: holds a {type(obj).__name__}, not an embedding")
    if not obj:
        raise EmbeddingError(f"{path}: is empty")
    odd_key = next((k for k in obj if not isinstance(k, str)), None)
    if odd_key is not None:
        raise EmbeddingError(f"{path}: has a key {odd_key!r} ({type(odd_key).__name__}) that is not a word; "
                             "an embedding file maps each word to its vectors")
    if isinstance(obj.get("state_dict"), dict) and obj["state_dict"]:  # a CompVis checkpoint
        raise _not_an_embedding(path, obj["state_dict"])
    if TRAINING_CHECKPOINT_KEYS <= obj.keys():
        raise EmbeddingError(f"{path}: {TRAINING_CHECKPOINT_HINT}")

    if "string_to_param" in obj:  # AUTOMATIC1111 .pt, and the paper's own embeddings.pt
        params = getattr(obj["string_to_param"], "_parameters", obj["string_to_param"])  # ParameterDict
        if not isinstance(params, dict) or not params:
            raise EmbeddingError(f"{path}: its 'string_to_param' is not a dictionary of tensors")
        if len(params) != 1:
            raise EmbeddingError(f"{path}: holds {len(params)} terms in 'string_to_param'; "
                                 "an AUTOMATIC1111 embedding has one")
        meta = {k: v for k, v in obj.get("metadata", {}).items() if isinstance(v, str)} \
            if isinstance(obj.get("metadata"), dict) else {}
        for key in ("name", "step", "sd_checkpoint", "sd_checkpoint_name", "word"):
            if obj.get(key) is not None:
                meta.setdefault(key, str(obj[key]))
        if obj.get("sd_checkpoint"):
            meta.setdefault(BASE_MODEL_HASH, str(obj["sd_checkpoint"]))
        vectors = next(iter(params.values()))
        if not torch.is_tensor(vectors):
            raise EmbeddingError(f"{path}: its 'string_to_param' holds a {type(vectors).__name__}, not a tensor "
                                 "(AUTOMATIC1111 writes one tensor of vectors)")
        return [(stem, vectors)], meta

    if "clip_l" in obj and "clip_g" in obj:
        raise EmbeddingError(f"{path}: is an SDXL embedding (clip_l and clip_g vectors); "
                             "this project implements SD v1.x (one 768-wide text encoder)")
    if "string_to_param.*" in obj and all(k == "string_to_param.*" or k.startswith("string_to_token.") for k in obj):
        # an AUTOMATIC1111 .pt converted key by key: its one tensor, which AUTOMATIC1111 names after the file
        return [(stem, obj["string_to_param.*"])], metadata
    if len(obj) == 1 and next(iter(obj)) == "emb_params":
        # AUTOMATIC1111 / kohya .safetensors: one tensor, which AUTOMATIC1111 names after the file
        return [(stem, obj["emb_params"])], metadata

    # {word: vector(s)}: ours, diffusers, sd-concepts-library
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if len(tensors) != len(obj):
        odd = next(k for k, v in obj.items() if not torch.is_tensor(v))
        raise EmbeddingError(f"{path}: is not an embedding file ({odd!r} holds a {type(obj[odd]).__name__}, "
                             "not a tensor)")
    if len(tensors) > MAX_WORDS or any(v.dim() not in (1, 2) for v in tensors.values()) \
            or any(MODULE_PATH.fullmatch(k) for k in tensors):
        raise _not_an_embedding(path, tensors)
    return list(tensors.items()), metadata


def odd_layout(tensor: torch.Tensor) -> Optional[str]:
    """'sparse' or 'meta' for a tensor a .pt file may hold but no vector is (no dense data), else None."""
    return "meta" if tensor.is_meta else "sparse" if tensor.layout != torch.strided else None


def _check_vectors(path: Path, word: str, vec: torch.Tensor, width: Optional[int]) -> torch.Tensor:
    if not isinstance(word, str) or not word.strip():
        raise EmbeddingError(f"{path}: has a word {word!r} that cannot be written in a prompt")
    if odd_layout(vec):
        raise EmbeddingError(f"{path}: the vectors of {word!r} are a {odd_layout(vec)} tensor; expected an ordinary "
                             "(dense) one")
    if vec.dim() not in (1, 2) or vec.numel() == 0:
        raise EmbeddingError(f"{path}: the vectors of {word!r} have shape {list(vec.shape)}; expected (n, D)")
    if not vec.is_floating_point():
        raise EmbeddingError(f"{path}: the vectors of {word!r} are {vec.dtype}, not floating point")
    vec = vec.detach().to(torch.float32).reshape(-1, vec.shape[-1])
    if width is not None and vec.shape[1] != width:
        what = KNOWN_WIDTHS.get(vec.shape[1])
        raise EmbeddingError(f"{path}: {word!r} is {vec.shape[1]} wide" + (f" ({what})" if what else "")
                             + f"; this model's text encoder is {width} wide")
    if len(vec) > MAX_VECTORS:
        raise EmbeddingError(f"{path}: {word!r} has {len(vec)} vectors; a prompt holds at most {MAX_VECTORS}")
    if not torch.isfinite(vec).all():
        raise EmbeddingError(f"{path}: the vectors of {word!r} contain NaN or infinite values")
    return vec.clone()   # a copy: a view would keep the whole pickled storage alive


def load_embeddings(path: PathLike, width: Optional[int] = None) -> Tuple[Embeddings, Dict[str, str]]:
    """Read any supported embedding file: ([(word, float32 (n, D))], metadata as strings).

    `width`, when given, is the text encoder's width that every vector must have."""
    path = Path(path)
    obj, metadata = _read(path)
    embeds, metadata = _classify(path, obj, metadata)
    embeds = [(word, _check_vectors(path, word, vec, width)) for word, vec in embeds]
    if len({v.shape[1] for _, v in embeds}) > 1:
        raise EmbeddingError(f"{path}: its words have different widths")
    return embeds, metadata


# ----------------------------------------------------------------------------- using

def base_model_hash(ckpt: PathLike) -> str:
    """The hash that ties an embedding to its base model: `file_hash` of a single file, or of
    the U-Net and text-encoder files of a diffusers folder that `ldm.load` reads (an fp16
    variant beside them is not read, so it is not hashed; a sharded save: its index and shards)."""
    ckpt = Path(ckpt)
    if ckpt.is_file():
        return file_hash(ckpt)
    h = hashlib.sha256()
    for part in ("unet", "text_encoder"):
        weights = diffusers_weights_file(ckpt, part)
        if weights is not None:
            for f in [weights, *(shard_files(weights) if weights.suffix == ".json" else [])]:
                h.update(file_hash(f).encode())
    return h.hexdigest()[:16]


def a1111_legacy_hash(ckpt: PathLike) -> str:
    """AUTOMATIC1111's first model hash, which older embeddings record in `sd_checkpoint`: the
    sha256 of the 64 KB at offset 1 MB, 8 hex digits. (Its newer one is the whole file's sha256,
    10 digits, which `file_hash` begins with.)"""
    with open(ckpt, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def base_model_hashes(ckpt: PathLike) -> List[str]:
    """Every hash an embedding may record for this base model: ours, and for a single file the
    AUTOMATIC1111 legacy one."""
    ckpt = Path(ckpt)
    return [base_model_hash(ckpt)] + ([a1111_legacy_hash(ckpt)] if ckpt.is_file() else [])


class BaseModel:
    """The model in use, as learned files name their base model: by the checkpoint file's hash
    (ours, or either of AUTOMATIC1111's) or by the weights' hash. Each is computed once and only
    when a file records one (hashing a 4 GB checkpoint takes seconds)."""

    def __init__(self, ckpt: PathLike, model=None):
        self.ckpt, self.model = Path(ckpt), model

    @functools.cached_property
    def file_hashes(self) -> List[str]:
        return base_model_hashes(self.ckpt)

    @functools.cached_property
    def weights(self) -> Optional[str]:
        return model_weights_hash(self.model) if self.model is not None else None

    def metadata(self) -> Dict[str, str]:
        """What a learned file (or a training checkpoint) records of its base model: the hashes
        that tie it to the weights, and the checkpoint's name for people. The name only, not the
        path: learned files are shared, and a path would tell where on its maker's disk the model lies."""
        meta = {BASE_MODEL_HASH: self.file_hashes[0], BASE_MODEL: self.ckpt.resolve().name}
        if self.weights:
            meta[BASE_MODEL_WEIGHTS] = self.weights
        return meta

    def recognises(self, metadata: Mapping[str, str]) -> bool:
        """Whether a learned file's metadata names this model; True when it names none. The file
        hash is tried first (an AUTOMATIC1111 hash may be the start of ours), then the weights."""
        recorded, weights = metadata.get(BASE_MODEL_HASH), metadata.get(BASE_MODEL_WEIGHTS)
        if not recorded and not weights:
            return True
        if recorded and any(recorded.startswith(h) or h.startswith(recorded) for h in self.file_hashes):
            return True
        return bool(weights) and weights == self.weights

    def difference(self, metadata: Mapping[str, str]) -> str:
        """For messages: the hash a file records against this model's."""
        if metadata.get(BASE_MODEL_HASH):
            return f"hash {metadata[BASE_MODEL_HASH]}, this one is {self.file_hashes[0]}"
        return f"weights hash {metadata[BASE_MODEL_WEIGHTS]}, this one is {self.weights}"


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def apply_embeddings(model, learned, paths: Union[PathLike, Sequence[PathLike]], base: Optional[BaseModel] = None,
                     warn: Callable[[str], None] = _stderr_warning) -> Dict[str, Path]:
    """Load embedding files and register their words in `learned` (a LearnedEmbeddings).

    Every file is read and checked before any word is added, so on an error nothing changes.
    With `base` (the model in use, `BaseModel`), a file that records another base model gives a
    warning, not an error.
    Returns {word: file} in the order added."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    width = model.config.text.hidden_size
    tokenizer = learned.tokenizer
    found: Dict[str, Tuple[Path, torch.Tensor]] = {}
    records: List[Tuple[Path, Dict[str, str]]] = []
    # token -> the word it belongs to: "<x>" of 2 vectors is the tokens "<x> <x>_1", so a word
    # "<x>_1" would share one of them
    taken = {t: w for w, v in zip(learned.words, learned.vectors) for t in sub_tokens(w, len(v))}
    for path in map(Path, paths):
        embeds, metadata = load_embeddings(path, width)
        for word, vec in embeds:
            if word in learned.words or word in found:
                other = found[word][0] if word in found else "an earlier embedding"
                raise EmbeddingError(f"{path}: the word {word!r} is already defined by {other}")
            for token in sub_tokens(word, len(vec)):
                owner = taken.get(token)
                if owner is not None:
                    raise EmbeddingError(f"{path}: the token {token!r} of {word!r} is already taken by {owner!r}; "
                                         "rename one of them")
                ordinary = None if token in tokenizer.added_tokens else tokenizer.word_id(token)
                if ordinary is not None:
                    raise EmbeddingError(f"{path}: {token!r} is an ordinary word of the vocabulary (token {ordinary}); "
                                         f"a learned word must be new, e.g. '<{word}>' (rename the file or the token)")
            found[word] = (path, vec)
            taken.update((t, word) for t in sub_tokens(word, len(vec)))
        records.append((path, metadata))

    for path, metadata in records if base is not None else ():
        if not base.recognises(metadata):
            warn(f"{path.name} was trained on another base model ({base.difference(metadata)}); "
                 "it may work less well")

    for word, (path, vec) in found.items():
        try:
            learned.add(word, vec)
        except ValueError as e:  # e.g. a sub-token "<x>_1" that is a vocabulary word
            raise EmbeddingError(f"{path}: {e}") from None
    return {word: path for word, (path, _) in found.items()}
