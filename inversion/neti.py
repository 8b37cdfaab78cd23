"""NeTI (Alaluf et al. 2023, "A Neural Space-Time Representation for Text-to-Image Personalization").

Textual Inversion learns one vector v* for the new word S*. NeTI lets the vector depend on
the denoising timestep t (time) and on the U-Net's cross-attention layer ℓ (space; 16 in
SD v1), and represents this whole space-time family by a small network, the mapper:

    v*(t, ℓ), b(t, ℓ) = M(t, ℓ)

At step t, layer ℓ of the U-Net reads the text encoding of "a photo of S*" with S* -> v*(t, ℓ).
The concept is the mapper's weights (about 0.5 M numbers for SD). Its parts, with the
settings of the authors' code (github.com/yuval-alaluf/NeTI):

  - positional encoding: random Fourier features of (t, ℓ) with a small scale for time
    (σ_t = 0.03: neighbouring timesteps get similar codes) and a large one for layers
    (σ_ℓ = 2: layers are told apart), then a linear layer whose weights start as the codes of
    10 × L anchors (t = 0, 100, ..., 900 and every ℓ), i.e. the similarity to each anchor;
  - an MLP, twice (Linear 128, LayerNorm, LeakyReLU), then a linear output of 2 × D numbers;
  - the first D are the word embedding v*, rescaled to the norm of the super-category word
    ("dog", "object", ...) so that it stays where real word embeddings live (the authors'
    code rescales word and bypass together, which leaves the word somewhat shorter; here the
    word alone is rescaled, as the paper says);
  - the other D are the textual bypass b: added to the text encoder's last hidden state at
    S* (before its final LayerNorm), scaled to 0.2 × that state's norm. Cross-attention then
    reads the bypassed text for its values only; its keys see the plain text;
  - nested dropout: in training, with probability 1/2 the 128 hidden units from a random
    index on are zeroed, which orders them by importance; at sampling, keeping only the
    first K (`truncation`) trades reconstruction for editability with one trained mapper.

Training is Textual Inversion's (same images, prompts and loss) with the mapper as the only
thing that learns. Per step, the B prompts are encoded once for all L layers: a batch of
B × L sequences through the text encoder. The loss is

    E_{z, y, ε, t} || ε - ε_θ(z_t, t, {c_θ(y, M(t, ℓ))}_ℓ) ||²

Every step's randomness comes from generators seeded with (seed, step, micro-batch), as
`inversion.trainer` asks of every method, so a resumed run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inversion.adam import AdamW
from inversion.data import image_digest
from inversion.files import BaseModel
from inversion.textual_inversion import check_words, encode_images, init_embedding, noisy_latents
from inversion.trainer import Trainer, TrainingError
from inversion.precision import autocast, no_autocast
from ldm.config import positive_number, whole_number
from ldm.files import PICKLE_SUFFIXES, LoadError, atomic_write, load_error_reason, not_a_file, read_failure

Layers = List[torch.Tensor]  # one (B, 77, D) text encoding per cross-attention layer

MAPPER_FILE = "neti_mapper.safetensors"
# The largest sizes a mapper file may ask for (the paper's: D 768, L 16, T 1000, 128 hidden units,
# 1024 frequencies, 10 time anchors): the network they build stays under 1 GB.
MAPPER_LIMITS = {"width": 1 << 14, "num_layers": 1024, "num_timesteps": 1 << 20, "hidden": 4096,
                 "num_features": 16384, "time_anchors": 1 << 20, "seed": 2 ** 63 - 1}
MAX_SIGMA = 100.0  # the largest --sigma-t or --sigma-l: the encoding's frequencies stay finite numbers
CONFIG_KEY = "neti_config"  # metadata key of the mapper's MapperConfig, as JSON


# ----------------------------------------------------------------------------- the mapper

@dataclass
class MapperConfig:
    """What builds a mapper; saved with its weights."""
    width: int = 768              # D, the text encoder's width
    num_layers: int = 16          # L, cross-attention layers of the U-Net
    num_timesteps: int = 1000     # T of the noise schedule (time anchors are spread over it)
    hidden: int = 128             # MLP width = the units nested dropout orders
    num_features: int = 1024      # random frequencies; the code has a sin and a cos of each
    sigma_t: float = 0.03
    sigma_l: float = 2.0
    time_anchors: int = 10
    bypass: bool = True           # also output the textual bypass b
    bypass_scale: float = 0.2     # |added bypass| = bypass_scale × |hidden state at S*|
    target_norm: float = 1.0      # |v*| = the norm of the super-category word's embedding
    seed: int = 0                 # draws the frequencies and the initial weights

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MapperConfig":
        """The configuration a mapper file records, checked (ValueError) before a network of its
        sizes is built: a file's numbers must not ask for more memory than any machine has."""
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"its configuration is a JSON {type(values).__name__}, not an object")
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in values.items() if k in known})
        for f in fields(cls):
            value, most = getattr(cfg, f.name), MAPPER_LIMITS.get(f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name} is {value!r}, not true or false")
            if f.type == "int" and not whole_number(value, 0 if f.name == "seed" else 1, most):
                raise ValueError(f"{f.name} is {value!r}, not a whole number up to {most:,}")
            if f.type == "float" and not positive_number(value):
                raise ValueError(f"{f.name} is {value!r}, not a number > 0")
        if cfg.time_anchors > cfg.num_timesteps:
            raise ValueError(f"time_anchors {cfg.time_anchors} is more than the {cfg.num_timesteps} timesteps")
        return cfg


class FourierFeatures(nn.Module):
    """(t, ℓ) -> [sin(W x), cos(W x)] / √F with x = (t, ℓ): a unit vector of 2F numbers.

    W (F, 2) is drawn once from N(0, 1), its time column scaled by σ_t and its layer column
    by σ_ℓ (Tancik et al. 2020, without their 2π, as NeTI's code: σ_t = 0.03 and σ_ℓ = 2 are
    NeTI's values for this form). A buffer: it is saved with the mapper."""

    def __init__(self, num_features: int, sigma_t: float, sigma_l: float, generator: torch.Generator):
        super().__init__()
        w = torch.randn(num_features, 2, generator=generator) * torch.tensor([sigma_t, sigma_l])
        self.register_buffer("w", w)

    def forward(self, t: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        # W x, written elementwise: angles reach 999 × σ_t, so they need float32 whatever calls it
        angles = t.float()[:, None] * self.w[:, 0] + layer.float()[:, None] * self.w[:, 1]  # (N, F)
        code = torch.cat([angles.sin(), angles.cos()], dim=-1)      # (N, 2F)
        return code / math.sqrt(self.w.shape[0])                    # |code| = 1 since sin² + cos² = 1


class NeTIMapper(nn.Module):
    """M(t, ℓ) -> (v* (N, D), bypass b (N, D) or None), for N (timestep, layer) pairs."""

    def __init__(self, cfg: MapperConfig):
        super().__init__()
        self.config = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        self.encoding = FourierFeatures(cfg.num_features, cfg.sigma_t, cfg.sigma_l, g)
        num_anchors = cfg.time_anchors * cfg.num_layers
        self.anchors = nn.Linear(2 * cfg.num_features, num_anchors)
        self.mlp = nn.Sequential(nn.Linear(num_anchors, cfg.hidden), nn.LayerNorm(cfg.hidden), nn.LeakyReLU(),
                                 nn.Linear(cfg.hidden, cfg.hidden), nn.LayerNorm(cfg.hidden), nn.LeakyReLU())
        self.output = nn.Linear(cfg.hidden, cfg.width * (2 if cfg.bypass else 1))
        self._init_weights(g)

    @torch.no_grad()
    def _init_weights(self, g: torch.Generator) -> None:
        """PyTorch's default init drawn from `g` (the same mapper for the same seed), then the
        anchor layer set to the codes of (t_a, ℓ): t_a = 0, T/n, 2T/n, ... for every layer ℓ."""
        for layer in (self.anchors, self.mlp[0], self.mlp[3], self.output):
            bound = 1 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=g)
            layer.bias.uniform_(-bound, bound, generator=g)
        cfg = self.config
        step = cfg.num_timesteps // cfg.time_anchors
        t = torch.arange(0, step * cfg.time_anchors, step).repeat_interleave(cfg.num_layers)
        layer = torch.arange(cfg.num_layers).repeat(cfg.time_anchors)
        self.anchors.weight.copy_(self.encoding(t, layer))          # (10 L, 2F)

    def hidden_units(self, t: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """(N,), (N,) -> the (N, hidden) units that nested dropout orders."""
        return self.mlp(self.anchors(self.encoding(t, layer)))

    def forward(self, t: torch.Tensor, layer: torch.Tensor,
                keep: Union[None, int, torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`keep`: how many hidden units to keep, the rest zeroed: None (all), an int K
        (truncation at sampling) or one count per row (nested dropout in training)."""
        h = self.hidden_units(t, layer)
        if keep is not None:
            keep = torch.as_tensor(keep, device=h.device).reshape(-1, 1)    # (N or 1, 1)
            h = h * (torch.arange(h.shape[1], device=h.device) < keep)      # zero units k >= keep
        out = self.output(h)  # (N, 2D): [:D] the word's direction, [D:] the bypass vector
        D = self.config.width
        word = F.normalize(out[:, :D], dim=-1) * self.config.target_norm
        return word, (out[:, D:] if self.config.bypass else None)


def nested_dropout_keep(batch: int, num_layers: int, hidden: int, p: float,
                        generator: torch.Generator) -> torch.Tensor:
    """Kept hidden units for the L × B rows of one step (layer-major, as `space_time_conditioning`).

    As in NeTI, each layer is truncated with probability p (the authors draw once per layer
    call), and then each of its rows keeps the units below an index drawn uniformly in [0, hidden)."""
    truncated = torch.rand(num_layers, generator=generator) < p                       # (L,)
    cut = torch.randint(0, hidden, (num_layers, batch), generator=generator)          # (L, B)
    return torch.where(truncated[:, None], cut, torch.full_like(cut, hidden)).reshape(-1)


# ----------------------------------------------------------------------------- text conditioning

def encode_with_bypass(text_encoder, ids: torch.Tensor, token_id: int, word: torch.Tensor,
                       bypass: Optional[torch.Tensor], bypass_scale: float = 0.2,
                       new_embeddings: Optional[Mapping[int, torch.Tensor]] = None
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """ids (N, 77) with S* = `token_id`, one vector per row -> keys and values text (N, 77, D).

    The text encoder's own steps (embeddings with S* -> word, transformer, final LayerNorm);
    with a bypass, the values text adds bypass_scale × |h| × b / |b| to the last hidden state h
    at S*, before the final LayerNorm, as NeTI does. Without one, values is None."""
    tm = text_encoder.text_model
    h = tm.embeddings(ids, {**(new_embeddings or {}), token_id: word})      # (N, 77, D)
    for block in tm.encoder.layers:
        h = block(h)
    keys = tm.final_layer_norm(h)  # the plain text: what cross-attention's keys are computed from
    if bypass is None:
        return keys, None
    at_word = (ids == token_id).unsqueeze(-1)                                   # (N, 77, 1)
    b = F.normalize(bypass.float(), dim=-1)[:, None, :]                        # (N, 1, D), |b| = 1
    added = bypass_scale * h.float().norm(dim=-1, keepdim=True) * b            # (N, 77, D)
    bypassed = torch.where(at_word, h + added.to(h.dtype), h)
    return keys, tm.final_layer_norm(bypassed)


def space_time_conditioning(text_encoder, mapper: NeTIMapper, ids: torch.Tensor, token_id: int,
                            t: torch.Tensor, keep: Union[None, int, torch.Tensor] = None,
                            new_embeddings: Optional[Mapping[int, torch.Tensor]] = None
                            ) -> Tuple[Layers, Optional[Layers]]:
    """ids (B, 77), timesteps t (B,) -> keys and values: L tensors (B, 77, D), one per layer.

    The B prompts are repeated for the L layers and encoded as one batch of L × B sequences
    (layer-major: rows l·B ... l·B + B-1 are layer l), so the text encoder runs once."""
    B, L = ids.shape[0], mapper.config.num_layers
    layers = torch.arange(L, device=ids.device).repeat_interleave(B)           # (L·B,) 0..0 1..1 ...
    timesteps = t.to(ids.device).repeat(L)                                      # (L·B,) t_0..t_B-1 t_0..
    with no_autocast(ids.device.type):  # the mapper computes in float32, in training too
        word, bypass = mapper(timesteps, layers, keep)                          # (L·B, D) each
    keys, values = encode_with_bypass(text_encoder, ids.repeat(L, 1), token_id, word, bypass,  # ids (L·B, 77)
                                      mapper.config.bypass_scale, new_embeddings)
    # (L·B, 77, D) -> L tensors (B, 77, D): layer l's texts for the keys, and for the values
    return list(keys.split(B)), (list(values.split(B)) if values is not None else None)


class SpaceTimeConditioning:
    """The sampler's conditioning for NeTI: `keys(t)` and `values(t)` give the L per-layer text
    encodings of the prompts at timestep t (the forms `ldm.generate.generate` takes as
    cond= and value_cond=).

    Each timestep's encodings are computed once, on the first call, and cached (keys and values
    together; the cache also serves later batches of the same prompts). Repeated prompts are
    encoded once; if all prompts are the same, the tensors have batch 1 and the sampler expands
    them. The cache holds L × 77 × D × 2 numbers per prompt and timestep (SD, 50 steps: 0.2 GB in fp16).
    """

    def __init__(self, model, mapper: NeTIMapper, placeholder: str, prompts: Sequence[str],
                 truncation: Optional[int] = None, new_embeddings: Optional[Mapping[int, torch.Tensor]] = None):
        self.model, self.mapper, self.truncation, self.new_embeddings = model, mapper, truncation, new_embeddings
        self.token_id = model.tokenizer.add_token(placeholder)
        unique = list(dict.fromkeys(prompts))
        self.rows = None if len(unique) == 1 else torch.tensor([unique.index(p) for p in prompts])
        self.ids = model.tokenizer(unique).to(model.device)
        self.cache: Dict[int, Tuple[Layers, Optional[Layers]]] = {}

    @torch.no_grad()
    def at(self, t: int) -> Tuple[Layers, Optional[Layers]]:
        if t not in self.cache:
            timesteps = torch.full((len(self.ids),), int(t), device=self.ids.device)
            keys, values = space_time_conditioning(self.model.text_encoder, self.mapper, self.ids, self.token_id,
                                                   timesteps, self.truncation, self.new_embeddings)
            pick = (lambda x: x) if self.rows is None else (lambda x: x[self.rows.to(x.device)])
            as_layers = lambda xs: None if xs is None else [pick(x).to(self.model.dtype) for x in xs]
            self.cache[t] = (as_layers(keys), as_layers(values))
        return self.cache[t]

    def keys(self, t: int) -> Layers:
        return self.at(t)[0]

    def values(self, t: int) -> Layers:
        return self.at(t)[1]

    @property
    def value_cond(self) -> Optional[Callable[[int], Layers]]:
        """`values`, or None for a mapper without bypass (values = keys)."""
        return self.values if self.mapper.config.bypass else None


# ----------------------------------------------------------------------------- mapper files

class NeTIError(LoadError):
    """A NeTI mapper file (or a setting for it) that cannot be used; the message is one line."""


def save_mapper(path: Union[str, Path], mapper: NeTIMapper, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """The mapper's weights as float32 safetensors; its MapperConfig (JSON) and `metadata`
    (placeholder, init_word, base_model_hash, step, ...) as string metadata."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in mapper.state_dict().items()}
    meta = {"format": "pt", "method": "neti", **{k: str(v) for k, v in (metadata or {}).items()},
            CONFIG_KEY: mapper.config.to_json()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load_mapper(path: Union[str, Path], model=None, device="cpu") -> Tuple[NeTIMapper, Dict[str, str]]:
    """(frozen mapper, metadata) from a file of `save_mapper`; NeTIError otherwise.

    With `model`, the mapper must fit it (text width, number of cross-attention layers)."""
    path = Path(path)
    if path.is_dir():
        raise NeTIError(f"{path}: is a folder; give the file in it (neti_mapper.safetensors)")
    if not path.is_file():
        raise NeTIError(f"{path}: {not_a_file(path)}")
    if path.suffix.lower() in PICKLE_SUFFIXES:  # invert.py writes mappers as .safetensors only
        raise NeTIError(f"{path}: a NeTI mapper is a .safetensors file (neti_mapper.safetensors); a .pt or .bin "
                        "learned word (Textual Inversion, AUTOMATIC1111) goes to --embedding")
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()} if CONFIG_KEY in meta else {}
    except Exception as e:
        raise NeTIError(f"{path}: cannot be read as a NeTI mapper (.safetensors): {read_failure(path, e)}") from None
    if CONFIG_KEY not in meta or "placeholder" not in meta:
        where = "a HiPer tail goes to --hiper" if meta.get("method") == "hiper" \
            else "a Textual Inversion embedding goes to --embedding"
        raise NeTIError(f"{path}: is not a NeTI mapper (no '{CONFIG_KEY}' in its metadata); {where}")
    try:
        cfg = MapperConfig.from_json(meta[CONFIG_KEY])
        mapper = NeTIMapper(cfg)
        mapper.load_state_dict(tensors)
    except Exception as e:
        raise NeTIError(f"{path}: a damaged NeTI mapper ({load_error_reason(e)})") from None
    if model is not None:
        width, layers = model.config.text.hidden_size, model.unet.num_cross_attention_layers
        if (cfg.width, cfg.num_layers) != (width, layers):
            raise NeTIError(f"{path}: was trained for a model with text width {cfg.width} and "
                                  f"{cfg.num_layers} cross-attention layers; this one has {width} and {layers}")
    return mapper.to(device).requires_grad_(False), meta


def _warn(message: str) -> None:
    import sys
    print(f"warning: {message}", file=sys.stderr)


def neti_conditioning(model, path: Union[str, Path], prompt: str, negative: str = "",
                      truncation: Optional[int] = None, new_embeddings=None,
                      base: Optional[BaseModel] = None, warn: Callable[[str], None] = _warn):
    """sample.py --neti: (cond, value_cond, uncond, value_uncond) for `ldm.generate.generate`, and
    the mapper's word.

    uncond and value_uncond are None (plain text) unless the negative prompt uses the word.
    A mapper trained on another base model than `base` (the model in use) gives a warning."""
    mapper, meta = load_mapper(path, model, model.device)
    hidden = mapper.config.hidden
    if truncation is not None and not 1 <= truncation <= hidden:
        raise NeTIError(f"--truncation {truncation}: must be between 1 and {hidden}, the mapper's hidden units")
    if base is not None and not base.recognises(meta):
        warn(f"{Path(path).name} was trained on another base model ({base.difference(meta)}); it may work less well")
    word = meta["placeholder"]
    if model.tokenizer.added_tokens.get(word) in (new_embeddings or {}):
        raise NeTIError(f"{path}: its word {word!r} is also defined by an --embedding file; use one of them")
    try:
        cond = SpaceTimeConditioning(model, mapper, word, [prompt], truncation, new_embeddings)
    except ValueError as e:  # the word is an ordinary word of this vocabulary
        raise NeTIError(f"{path}: {e}") from None
    if word not in negative:
        return cond.keys, cond.value_cond, None, None, word
    uncond = SpaceTimeConditioning(model, mapper, word, [negative], truncation, new_embeddings)
    return cond.keys, cond.value_cond, uncond.keys, uncond.value_cond, word


# ----------------------------------------------------------------------------- training

@dataclass
class NeTIConfig:
    placeholder: str = "<x>"
    init_word: str = "object"          # the super-category word: its norm scales v*
    learnable_property: str = "object"
    steps: int = 1000
    lr: float = 1e-3                   # multiplied by batch × grad_accum (NeTI's scale_lr)
    batch: int = 2
    grad_accum: int = 4                # NeTI for SD: batch 2 × 4 accumulated = 8 images a step
    flip: bool = True
    seed: int = 0
    save_every: int = 250
    sample_every: int = 0
    sample_steps: int = 50
    weight_decay: float = 1e-2         # AdamW, as NeTI
    # the mapper (NeTI's defaults)
    hidden: int = 128
    num_features: int = 1024
    sigma_t: float = 0.03
    sigma_l: float = 2.0
    time_anchors: int = 10
    bypass: bool = True
    bypass_scale: float = 0.2
    nested_dropout: float = 0.5

    num_vectors = 1  # one token for S* (asked by check_words); a class constant, not a setting

    @property
    def effective_lr(self) -> float:
        return self.lr * self.batch * self.grad_accum


def check_config(cfg: NeTIConfig) -> None:
    """TrainingError for settings NeTI cannot train with."""
    if not 0 <= cfg.nested_dropout <= 1:
        raise TrainingError(f"--nested-dropout must be between 0 and 1, got {cfg.nested_dropout}")
    for name in ("sigma_t", "sigma_l", "bypass_scale", "lr"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise TrainingError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    for name in ("sigma_t", "sigma_l"):  # frequencies x timestep (up to 1000): past this, noise, then inf
        if getattr(cfg, name) > MAX_SIGMA:
            raise TrainingError(f"--{name.replace('_', '-')} must be at most {MAX_SIGMA:g} (the paper's: "
                                f"σ_t 0.03, σ_l 2), got {getattr(cfg, name):g}")
    for name in ("steps", "batch", "grad_accum", "hidden", "num_features", "time_anchors"):
        if getattr(cfg, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least 1")


class NeTI(Trainer):
    """The trainer: the mapper and its optimizer; the loop is `Trainer`'s. `run()` trains to
    cfg.steps."""

    progress_label = "NeTI"

    def __init__(self, model, images: torch.Tensor, cfg: NeTIConfig, out: Path,
                 templates: List[str], log: Callable[[str], None] = print):
        check_config(cfg)
        super().__init__(model, cfg, out, log)
        self.templates = templates
        model.requires_grad_(False).eval()
        check_words(model, cfg)
        init = init_embedding(model, cfg.init_word)  # (D,): its norm is the mapper's output norm
        self.token_id = model.tokenizer.add_token(cfg.placeholder)
        self.mapper = NeTIMapper(MapperConfig(
            width=model.config.text.hidden_size, num_layers=model.unet.num_cross_attention_layers,
            num_timesteps=model.schedule.num_timesteps, hidden=cfg.hidden, num_features=cfg.num_features,
            sigma_t=cfg.sigma_t, sigma_l=cfg.sigma_l, time_anchors=cfg.time_anchors, bypass=cfg.bypass,
            bypass_scale=cfg.bypass_scale, target_norm=float(init.norm()), seed=cfg.seed)).to(model.device)
        self.optimizer = AdamW(self.mapper.parameters(), lr=cfg.effective_lr, weight_decay=cfg.weight_decay)
        self.n_images = len(images)
        self.images_digest = image_digest(images)  # a resumed run must train on the same images
        self.out.mkdir(parents=True, exist_ok=True)
        self.means, self.stds = encode_images(model, images)

    # ------------------------------------------------------------------ one step
    def loss(self, step: int, micro: int = 0) -> torch.Tensor:
        """The loss of micro-batch `micro` of step `step`: all its randomness comes from (seed, step, micro)."""
        cfg, model = self.cfg, self.model
        rng = np.random.default_rng([cfg.seed, step, micro])
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        idx = rng.integers(0, self.n_images, cfg.batch)
        flipped = (rng.random(cfg.batch) < 0.5) if cfg.flip else np.zeros(cfg.batch, bool)
        rows = torch.from_numpy(idx + self.n_images * flipped)
        z_t, noise, t = noisy_latents(model, self.means, self.stds, rows, g)
        prompts = [self.templates[int(rng.integers(len(self.templates)))].format(cfg.placeholder)
                   for _ in range(cfg.batch)]
        keep = nested_dropout_keep(cfg.batch, self.mapper.config.num_layers, cfg.hidden, cfg.nested_dropout, g)

        ids = model.tokenizer(prompts).to(model.device)
        with autocast(model):
            keys, values = space_time_conditioning(model.text_encoder, self.mapper, ids, self.token_id, t,
                                                   keep.to(model.device))
            eps = model.unet(z_t.to(model.dtype), t, keys, values)
        return F.mse_loss(eps.float(), noise)

    def train_step(self) -> Optional[float]:
        """One optimizer step over grad_accum micro-batches; a non-finite loss skips the step."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(self.cfg.grad_accum):
            loss = self.loss(self.step, micro) / self.cfg.grad_accum
            if not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.log(f"warning: step {self.step}: loss is {loss.item()}, step skipped")
                return None
            loss.backward()
            total += loss.item()
        self.optimizer.step()
        self.step += 1  # counted once its update is made (see Trainer.gradient_step)
        return total

    # ------------------------------------------------------------------ state
    def learned_state(self) -> dict:
        return {"mapper": {k: v.detach().cpu() for k, v in self.mapper.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if "mapper" not in state:  # said before the settings differ, which they would
            raise TrainingError(f"{self.checkpoint_path} holds no NeTI mapper (another method's run?); start a "
                                "new --out folder")
        super().load_state_dict(state)

    def load_learned(self, state: dict) -> None:
        self.mapper.load_state_dict(state["mapper"])  # strict: every tensor, of its shape

    def conditioning(self, prompts: Sequence[str], truncation: Optional[int] = None) -> SpaceTimeConditioning:
        """Sampling conditioning with the mapper as it is now."""
        return SpaceTimeConditioning(self.model, self.mapper, self.cfg.placeholder, prompts, truncation)
