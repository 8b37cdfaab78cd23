"""Textual Inversion (Gal et al. 2022, "An Image is Worth One Word").

Find the embedding v* of a new word S* such that the frozen model, prompted with
"a photo of S*", reconstructs the training images:

    v* = argmin_v  E_{z ~ E(x), y, ε ~ N(0, I), t} || ε - ε_θ(z_t, t, c_θ(y(S* -> v))) ||²

Only v is optimized; the U-Net ε_θ, the text encoder c_θ and the VAE E stay frozen.
The paper's variants are options of `TIConfig`:
  - num_vectors > 1: the "extended latent", S* is several tokens;
  - progressive_every = K: start with one vector and add one every K steps;
  - reg_weight = λ: + λ ||v - v_init||² (the mean over the word's vectors), keeping v near
    the init word's embedding;
  - per_image_tokens: an extra token per training image ("a photo of S* with S_i"),
    mixed in with probability per_image_prob, to absorb what is particular to each image.

Every step's randomness comes from generators seeded with (seed, step), so a checkpoint's
step is its whole random state: a resumed run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from inversion.adam import AdamW
from inversion.data import image_digest, templates
from inversion.hook import LearnedEmbeddings, sub_tokens
from inversion.precision import autocast
from inversion.trainer import AlteredCheckpoint, Trainer, TrainingError, restore_tensor


@dataclass
class TIConfig:
    placeholder: str = "<x>"
    init_word: str = "object"
    learnable_property: str = "object"  # "object" or "style": which prompt templates
    num_vectors: int = 1
    steps: int = 5000
    lr: float = 5e-3                  # base learning rate, multiplied by the batch size
    batch: int = 4
    flip: bool = True                 # random horizontal flip
    progressive_every: int = 0        # 0 = all vectors from the start
    reg_weight: float = 0.0
    per_image_tokens: bool = False
    per_image_prob: float = 0.5
    seed: int = 0
    save_every: int = 500
    sample_every: int = 0             # validation grid every N steps (0 = only at the end)
    sample_steps: int = 50

    @property
    def effective_lr(self) -> float:
        return self.lr * self.batch


MAX_PLACEHOLDER = 64   # characters (and twice as many bytes); the placeholder names the AUTOMATIC1111 files


def check_words(model, cfg: TIConfig) -> None:
    """TrainingError unless the init word is one token and the placeholder a new word that fits
    in every training prompt (and in a file name), with all its vectors."""
    tok = model.tokenizer
    if tok.word_id(cfg.init_word) is None:
        n = tok.num_tokens(cfg.init_word)
        raise TrainingError(f"--init-word {cfg.init_word!r} is {n} tokens; choose a word that is one token "
                            "(a plain common noun such as 'object', 'toy', 'cat' or 'painting')")
    if tok.word_id(cfg.placeholder) is not None and cfg.placeholder not in tok.added_tokens:
        raise TrainingError(f"--placeholder {cfg.placeholder!r} is already a word of the vocabulary; "
                            "choose a string it does not know, such as '<my-toy>'")
    if not cfg.placeholder.strip() or any(c.isspace() for c in cfg.placeholder):
        raise TrainingError(f"--placeholder {cfg.placeholder!r} must be one word without spaces, such as '<my-toy>'")
    size = len(cfg.placeholder.encode("utf-8"))
    if len(cfg.placeholder) > MAX_PLACEHOLDER or size > 2 * MAX_PLACEHOLDER:
        raise TrainingError(f"--placeholder is {len(cfg.placeholder)} characters, {size} bytes in UTF-8; at most "
                            f"{MAX_PLACEHOLDER} and {2 * MAX_PLACEHOLDER} (it names the output files, whose names "
                            "have at most 255 bytes)")
    inside = [t for t in templates(cfg.learnable_property) if cfg.placeholder.lower() in t.format("").lower()]
    if inside:  # the tokenizer finds a new token anywhere in the text, inside other words too
        raise TrainingError(f"--placeholder {cfg.placeholder!r} is part of the training prompt {inside[0]!r}, "
                            "whose words it would replace; choose one such as '<my-toy>'")
    if cfg.num_vectors < 1:
        raise TrainingError("--num-vectors must be at least 1")
    # every prompt must hold all the vectors: 77 positions less start, end and the longest template's words
    words = max(tok.num_tokens(t.format("")) for t in templates(cfg.learnable_property))
    room = tok.context_length - 2 - words - (2 if getattr(cfg, "per_image_tokens", False) else 0)
    if cfg.num_vectors > room:
        raise TrainingError(f"--num-vectors {cfg.num_vectors}: a training prompt has room for {room} "
                            "(77 positions less the template's words)")


def init_embedding(model, word: str) -> torch.Tensor:
    """The frozen table's row of a one-token word: (D,), float32, a copy (the vectors start there)."""
    table = model.text_encoder.text_model.embeddings.token_embedding.weight
    return table[model.tokenizer.word_id(word)].detach().float().clone()


def image_token(cfg: TIConfig, i: int) -> str:
    return f"{cfg.placeholder}-img{i}"


def noisy_latents(model, means: torch.Tensor, stds: torch.Tensor, rows: torch.Tensor, g: torch.Generator):
    """One training batch from the cached posteriors `rows`: z0 ~ E(x) (scaled), ε ~ N(0, I),
    t ~ U[0, T) and z_t = √ᾱ_t z0 + √(1-ᾱ_t) ε. Returns (z_t, ε, t); every draw comes from g."""
    noise_z = torch.randn(means[rows].shape, generator=g).to(model.device)
    z0 = (means[rows] + stds[rows] * noise_z) * model.scale_factor        # (B, C, h, w)
    noise = torch.randn(z0.shape, generator=g).to(model.device)
    t = torch.randint(0, model.schedule.num_timesteps, (len(rows),), generator=g).to(model.device)
    return model.schedule.add_noise(z0, noise, t), noise, t


# The encoder's activations grow with the pixels of its batch (1.3 GB for 8 images at 256 px
# in fp32): images are encoded at most 8 at a time and at most 256 × 256 pixels at a time, or one
# at a time where one is larger (512 px: one image, as in a training step of batch 1).
ENCODE_BATCH_IMAGES, ENCODE_BATCH_PIXELS = 8, 256 * 256


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch: Optional[int] = None):
    """Posterior mean and std (2N, C, h, w) of each image and of its mirror image, computed once.

    The VAE is frozen and the flip is the only augmentation, so each image's posterior q(z|x)
    never changes: each step draws a fresh z0 ~ N(mean, std²) from it (`noisy_latents`), the same
    distribution as encoding the image every step, without the encoder's cost. Mirror images are
    encoded rather than flipped in latent space, since the encoder is not flip-equivariant."""
    both = torch.cat([images, images.flip(-1)])  # (2N, 3, H, W): the images, then their mirrors
    if batch is None:
        pixels = images.shape[-2] * images.shape[-1]
        batch = max(1, min(ENCODE_BATCH_IMAGES, ENCODE_BATCH_PIXELS // pixels))
    means, stds = [], []
    for i in range(0, len(both), batch):
        post = model.vae.encode(both[i:i + batch].to(model.device, model.dtype))
        means.append(post.mean.float())
        stds.append(post.std.float())
    return torch.cat(means), torch.cat(stds)


class TextualInversion(Trainer):
    """The trainer: learned vectors and their optimizer; the loop is `Trainer`'s. `run()` trains
    to cfg.steps."""

    progress_label = "textual inversion"

    def __init__(self, model, images: torch.Tensor, cfg: TIConfig, out: Path,
                 templates: List[str], log: Callable[[str], None] = print):
        super().__init__(model, cfg, out, log)
        self.templates = templates
        self.out.mkdir(parents=True, exist_ok=True)
        model.requires_grad_(False).eval()
        check_words(model, cfg)
        init = init_embedding(model, cfg.init_word)  # (D,)
        self.init_vector = init.to(model.device)
        self.learned = LearnedEmbeddings(model.tokenizer)
        self.learned.add(cfg.placeholder, init.expand(cfg.num_vectors, -1), trainable=True)
        self.n_images = len(images)
        self.images_digest = image_digest(images)  # a resumed run must train on the same images
        if cfg.per_image_tokens:
            for i in range(self.n_images):
                self.learned.add(image_token(cfg, i), init[None], trainable=True)
        self.learned.to(model.device)
        self.active = 1 if cfg.progressive_every else cfg.num_vectors
        # torch.optim.AdamW's defaults, as the paper's code: its weight decay (1e-2) also pulls the
        # vectors toward 0 a little every step (v <- v (1 - lr λ)), against the init word's norm
        self.optimizer = AdamW(self.learned.parameters(), lr=cfg.effective_lr)
        self.means, self.stds = encode_images(model, images)

    # ------------------------------------------------------------------ one step
    def prompts(self, rng: np.random.Generator, image_idx: np.ndarray) -> List[str]:
        word = " ".join(sub_tokens(self.cfg.placeholder, self.active))
        out = []
        for i in image_idx:
            text = self.templates[int(rng.integers(len(self.templates)))].format(word)
            if self.cfg.per_image_tokens and rng.random() < self.cfg.per_image_prob:
                text += f" with {image_token(self.cfg, int(i))}"
            out.append(text)
        return out

    def loss(self, step: int) -> torch.Tensor:
        """One batch of the objective above: images, flips, prompts, t and ε all drawn from
        (seed, step); the word's vectors spliced into the prompts' encoding; MSE on ε; plus
        λ ||v - v_init||² over the active vectors."""
        cfg, model = self.cfg, self.model
        rng = np.random.default_rng([cfg.seed, step])
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        idx = rng.integers(0, self.n_images, cfg.batch)
        flipped = (rng.random(cfg.batch) < 0.5) if cfg.flip else np.zeros(cfg.batch, bool)
        rows = torch.from_numpy(idx + self.n_images * flipped)  # rows N..2N-1: the mirrored images
        z_t, noise, t = noisy_latents(model, self.means, self.stds, rows, g)

        ids = self.model.tokenizer(self.prompts(rng, idx)).to(model.device)
        with autocast(model):
            # (B, 77, D). At the word's positions the embedding lookup returns the learned vectors
            # (clip/model.py, CLIPTextEmbeddings); the frozen encoder and U-Net pass the gradient
            # back through, and only the learned vectors receive it.
            context = model.text_encoder(ids, self.learned.mapping())
            eps = model.unet(z_t.to(model.dtype), t, context)
        loss = F.mse_loss(eps.float(), noise)
        if cfg.reg_weight:
            v = self.learned.vectors[0][: self.active]
            loss = loss + cfg.reg_weight * (v - self.init_vector).pow(2).sum(-1).mean()
        return loss

    def grow(self) -> None:
        """Progressive extension: one more vector, started at the init word's embedding.

        The word's vectors are one (n, D) tensor to the optimizer, as in the original code, so
        Adam counts steps from the first: a row that joins late starts with zero moments but
        bias corrections of ≈ 1, and moves 3 to 6 times as far in its first 50 steps as under a
        fresh Adam (2× after 200 steps, on random gradients)."""
        if not self.cfg.progressive_every:
            return
        # How many the step calls for (1, then one more every K steps), not "one more now": a step
        # that a Ctrl-C cut short after its vector was added must not add another when resumed.
        wanted = min(self.cfg.num_vectors, 1 + self.step // self.cfg.progressive_every)
        while self.active < wanted:
            with torch.no_grad():
                self.learned.vectors[0][self.active] = self.init_vector
            self.active += 1
            self.log(f"step {self.step}: now {self.active} vectors")

    def train_step(self) -> Optional[float]:
        self.grow()
        return self.gradient_step()

    # ------------------------------------------------------------------ state
    def embedding(self) -> torch.Tensor:
        """The learned word: (active, D), fp32, on the CPU."""
        return self.learned.vectors[0][: self.active].detach().float().cpu().clone()

    def saved_word(self) -> LearnedEmbeddings:
        """The word as its files hold it, to sample or score with: its active vectors only (a
        progressive run stopped early has fewer than --num-vectors), without per-image tokens."""
        word = LearnedEmbeddings(self.model.tokenizer)
        word.add(self.cfg.placeholder, self.embedding())
        return word.to(self.model.device)

    def learned_state(self) -> dict:
        return {"vectors": [v.detach().cpu() for v in self.learned.vectors], "active": self.active}

    def load_learned(self, state: dict) -> None:
        vectors, active = state["vectors"], state["active"]
        if not isinstance(vectors, list) or len(vectors) != len(self.learned.vectors):
            raise AlteredCheckpoint(f"vectors is not a list of {len(self.learned.vectors)} tensors (the word's, "
                                    "then the per-image tokens')")
        if isinstance(active, bool) or not isinstance(active, int) or not 1 <= active <= self.cfg.num_vectors:
            raise AlteredCheckpoint(f"active {active!r} is not 1 to {self.cfg.num_vectors} vectors")
        for v, saved in zip(self.learned.vectors, vectors):
            restore_tensor(v, saved, "vectors")
        self.active = active
