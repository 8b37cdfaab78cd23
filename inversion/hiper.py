"""HiPer: highly personalized text embedding (Han et al. 2023, arXiv 2303.08767).

One image x and a source prompt y_src that describes it ("a standing dog"); the model is
not fine-tuned. The text encoder turns y_src into e_src (77, D). Its last K rows come after
the end-of-text token: padding, which carries no word of its own. HiPer cuts them off and
learns K new rows in their place, the personalized tail e_hiper, so that the frozen model
reconstructs x from the spliced context:

    e_hiper = argmin_e  E_{z ~ E(x), ε ~ N(0, I), t ~ U[0, 1000)} || ε - ε_θ(z_t, t, [e_src[:77-K]; e]) ||²

with e_hiper starting from e_src[77-K:]. To edit, a target prompt ("a sitting dog") takes
the source's place and the tail is weighted by α (0.8 in the paper):

    c = [e_tgt[:77-K]; α e_hiper]

and sampling is ordinary text-to-image (DDIM 50, guidance 7.5; the unconditional half is
the plain empty prompt). Unlike Textual Inversion, the learned vectors live in the text
encoder's *output* space: the encoder runs once and no new word is needed. The tail only
makes sense with the model it was learned on (its text encoder and U-Net), so a tail file
records that model's hash and is refused by any other.

The loop is `inversion.trainer.Trainer`'s: every step's randomness comes from generators
seeded with (seed, step), so a checkpoint's step is its whole random state and a resumed run is
bit-identical to an uninterrupted one; a NaN loss skips the step; Ctrl-C saves.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inversion.adam import Adam
from inversion.data import image_digest
from inversion.files import BaseModel, EmbeddingError, odd_layout
from inversion.textual_inversion import encode_images, noisy_latents
from inversion.trainer import Trainer, TrainingError, restore_tensor
from inversion.precision import autocast
from ldm.files import atomic_write, load_error_reason, not_a_file

CONTEXT_LENGTH = 77             # rows of the text encoder's output
TAIL_KEY = "hiper_tail"         # the tensor's name in our .safetensors files
MAX_FILE_BYTES = 1 << 20        # a tail is K x D floats: 5 x 768 x 4 bytes = 15 KB
MAX_ALPHA = 10.0                # the tail's weight α: the paper's are 0 to 1; far above, the tail swamps
                                # the prompt (and at 1e38 overflows float32 into black images)


class HiPerError(TrainingError):
    """Bad settings for HiPer (tail size, prompt length, resume); the message is one line."""


class TailFileError(EmbeddingError):
    """A tail file that cannot be used with this model; the message is one line."""


# ----------------------------------------------------------------------------- the conditioning

def check_tail_size(k: int) -> None:
    """The tail must leave room for the start and end tokens: 1 <= K <= 75."""
    if not 1 <= k <= CONTEXT_LENGTH - 2:
        raise HiPerError(f"--tail must be between 1 and {CONTEXT_LENGTH - 2} (rows of the 77 replaced), got {k}")


def check_prompt(tokenizer, text: str, k: int, what: str = "source") -> None:
    """The prompt's tokens (start and end included) must all lie before the tail's K rows."""
    n = len(tokenizer.encode(text))
    if n > CONTEXT_LENGTH - k:
        remedy = ("shorten the prompt or use a smaller --tail" if what == "source" else
                  "shorten the prompt; the tail's length was fixed when it was learned")
        raise HiPerError(f"the {what} prompt is {n} tokens with start and end; with a tail of {k} at most "
                         f"{CONTEXT_LENGTH - k} fit ({remedy})")


def encode(model, prompts: Union[str, List[str]], new_embeddings=None) -> torch.Tensor:
    """Text-encoder output (B, 77, D) in float32."""
    return model.encode_prompts(prompts, new_embeddings).float()


def edit_context(target: torch.Tensor, tail: torch.Tensor, alpha: float = 0.8) -> torch.Tensor:
    """[e_tgt[:77-K]; α e_hiper]: target (B, 77, D), tail (K, D) -> (B, 77, D) in target's dtype."""
    k = tail.shape[0]
    # α scales the learned tail: α = 0 leaves the target prompt with its last K rows zeroed, α = 1
    # the whole tail; the paper's 0.8 trades some of the subject's identity for the edit
    tail = (alpha * tail.float()).to(target.device, target.dtype).expand(target.shape[0], k, -1)  # (B, K, D)
    return torch.cat([target[:, :-k], tail], dim=1)  # (B, 77 - K, D) ++ (B, K, D) -> (B, 77, D)


@torch.no_grad()
def hiper_condition(model, prompts: Union[str, List[str]], tail: torch.Tensor, alpha: float = 0.8,
                    new_embeddings=None) -> torch.Tensor:
    """The editing context of target prompt(s), (B, 77, D) in the model's dtype: pass as `cond=`
    to `ldm.generate.generate`. HiPerError if a prompt reaches into the tail's rows."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    for p in prompts:
        check_prompt(model.tokenizer, p, tail.shape[0], "target")
    return edit_context(encode(model, prompts, new_embeddings), tail, alpha).to(model.dtype)


# ----------------------------------------------------------------------------- tail files

def save_tail(path: Union[str, Path], tail: torch.Tensor, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write the tail (K, D) as float32 safetensors {"hiper_tail": (K, D)} with string metadata
    (method, tail = K, and what the caller adds: source prompt, base_model_hash, step)."""
    from safetensors.torch import save_file
    path = Path(path)
    tensor = tail.detach().to("cpu", torch.float32).contiguous().clone()
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items() if v is not None},
            "method": "hiper", "tail": str(tensor.shape[0])}
    atomic_write(path, lambda tmp: save_file({TAIL_KEY: tensor}, tmp, metadata=meta))
    return path


def _read_tail(path: Path) -> Tuple[torch.Tensor, Dict[str, str]]:
    """Our .safetensors, or the paper's code's hiper_embeddings_stepN.pt (a bare (1, K, D) tensor)."""
    if path.is_dir():
        raise TailFileError(f"{path}: is a folder; give the file in it (hiper_tail.safetensors)")
    if not path.is_file():
        raise TailFileError(f"{path}: {not_a_file(path)}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise TailFileError(f"{path}: is {path.stat().st_size / 2**20:,.0f} MB, far too big for a HiPer tail (a few KB)")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                if TAIL_KEY not in f.keys():
                    where = "a NeTI mapper goes to --neti" if (f.metadata() or {}).get("method") == "neti" \
                        else "a learned word goes to --embedding"
                    raise TailFileError(f"{path}: is not a HiPer tail (no '{TAIL_KEY}' tensor); {where}")
                return f.get_tensor(TAIL_KEY), dict(f.metadata() or {})
        if path.suffix in (".pt", ".bin"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not torch.is_tensor(obj):
                raise TailFileError(f"{path}: holds a {type(obj).__name__}, not a HiPer tail tensor")
            return obj, {}
    except TailFileError:
        raise
    except Exception as e:
        raise TailFileError(f"{path}: cannot be read ({load_error_reason(e)}); the file may be truncated") from None
    raise TailFileError(f"{path}: unknown format '{path.suffix}'; a HiPer tail is a .safetensors file")


def load_tail(path: Union[str, Path], width: Optional[int] = None,
              base: Optional[BaseModel] = None) -> Tuple[torch.Tensor, Dict[str, str]]:
    """Read and check a tail file: (float32 (K, D), metadata).

    `width` is the model's text-encoder width; `base` the model in use (`BaseModel`). A tail
    learned on another model is refused: its vectors mean nothing in another text encoder's
    output space. The same model in another layout or precision is the same model: its weights
    hash, which the tail also records, matches."""
    path = Path(path)
    tail, meta = _read_tail(path)
    if odd_layout(tail):
        raise TailFileError(f"{path}: the tail is a {odd_layout(tail)} tensor; expected an ordinary (dense) one")
    if tail.dim() == 3 and tail.shape[0] == 1:          # the paper's code keeps the batch dimension
        tail = tail[0]
    if tail.dim() != 2 or tail.numel() == 0 or not tail.is_floating_point():
        raise TailFileError(f"{path}: the tail has shape {list(tail.shape)} ({tail.dtype}); expected float (K, D)")
    tail = tail.float()
    k = tail.shape[0]
    if meta.get("tail") not in (None, str(k)):
        raise TailFileError(f"{path}: its metadata says a tail of {meta['tail']} rows but it holds {k}")
    if not 1 <= k <= CONTEXT_LENGTH - 2:
        raise TailFileError(f"{path}: a tail of {k} rows does not fit in {CONTEXT_LENGTH} (at most {CONTEXT_LENGTH - 2})")
    if width is not None and tail.shape[1] != width:
        raise TailFileError(f"{path}: the tail is {tail.shape[1]} wide; this model's text encoder is {width} wide "
                            "(a tail works only with the model it was learned on)")
    if not torch.isfinite(tail).all():
        raise TailFileError(f"{path}: the tail contains NaN or infinite values")
    if base is not None and not base.recognises(meta):
        raise TailFileError(f"{path}: was learned on another base model ({base.difference(meta)}); "
                            "a tail works only with the model it was learned on")
    return tail, meta


# ----------------------------------------------------------------------------- training

@dataclass
class HiPerConfig:
    source: str                 # the source prompt, describing the image
    tail: int = 5               # K: rows of the 77 replaced by learned vectors
    steps: int = 1000
    lr: float = 5e-3            # Adam, not scaled by the batch (the paper uses batch 1)
    batch: int = 1              # timesteps and noises per step, all on the same image
    seed: int = 0
    save_every: int = 100
    sample_every: int = 0       # no validation grid while training (run() is Trainer's)


class HiPer(Trainer):
    """The trainer: the tail and its optimizer; the loop is `Trainer`'s. `run()` trains to
    cfg.steps.

    image: (3, H, W) in [-1, 1] at the model's resolution."""

    progress_label = "hiper"
    digest_key = "image"

    def __init__(self, model, image: torch.Tensor, cfg: HiPerConfig, out: Path,
                 log: Callable[[str], None] = print):
        super().__init__(model, cfg, out, log)
        check_tail_size(cfg.tail)
        check_prompt(model.tokenizer, cfg.source, cfg.tail)
        self.out.mkdir(parents=True, exist_ok=True)
        model.requires_grad_(False).eval()
        e_src = encode(model, cfg.source)[0]                 # (77, D), computed once, no gradient
        self.head = e_src[: -cfg.tail]                       # (77-K, D): the source's words, frozen
        self.tail = nn.Parameter(e_src[-cfg.tail:].clone())  # (K, D): e_hiper, starts as the padding rows
        self.optimizer = Adam([self.tail], lr=cfg.lr)
        # The image's posterior (row 0; row 1 is its mirror, unused: a flip would swap left and right)
        means, stds = encode_images(model, image[None])
        self.mean, self.std = means[:1], stds[:1]            # (1, C, h, w)
        self.images_digest = image_digest(image)

    # ------------------------------------------------------------------ one step
    def context(self) -> torch.Tensor:
        """[e_src[:77-K]; e_hiper]: (77, D), the U-Net's context during training."""
        return torch.cat([self.head, self.tail])

    def loss(self, step: int) -> torch.Tensor:
        """ε-prediction MSE on the one image, with the source prompt's head and the learned tail."""
        cfg, model = self.cfg, self.model
        rng = np.random.default_rng([cfg.seed, step])
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        # B draws from the one image's posterior (row 0), each with its own t and ε
        z_t, noise, t = noisy_latents(model, self.mean, self.std, torch.zeros(cfg.batch, dtype=torch.long), g)
        context = self.context().expand(cfg.batch, -1, -1)   # (B, 77, D)
        with autocast(model):
            eps = model.unet(z_t.to(model.dtype), t, context.to(model.dtype))
        return F.mse_loss(eps.float(), noise)

    # ------------------------------------------------------------------ state
    def tail_vectors(self) -> torch.Tensor:
        """The learned tail: (K, D), fp32, on the CPU."""
        return self.tail.detach().float().cpu().clone()

    def learned_state(self) -> dict:
        return {"tail": self.tail_vectors()}

    def load_learned(self, state: dict) -> None:
        restore_tensor(self.tail, state["tail"], "tail")
