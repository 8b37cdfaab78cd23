"""The whole-context comparison: the U-Net's text context (77, D) learned directly on a few images.

A learned word reaches the U-Net only through the text encoder, as one context per prompt, and
a HiPer tail sets the last K rows of one. Learning all 77 rows directly, with the same loss,

    c* = argmin_c  E_{z ~ E(x), ε ~ N(0, I), t} || ε - ε_θ(z_t, t, c) ||²

has every freedom either of them has, and more. How often samples drawn from c* show what the
images show is therefore how far any conditioning learned with this loss, on this model, can
go: a comparison for the results tables, not a method.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CONTEXT_LR = 5e-3  # Adam, not scaled by the batch: HiPer's rate, for vectors of the same kind (text-encoder outputs)


def learn(model, images: torch.Tensor, start_prompt: str, steps: int, seed: int, lr: float = CONTEXT_LR,
          batch: int = 8) -> torch.Tensor:
    """c* (77, D) for images (N, 3, H, W) in [-1, 1] and their mirror images, starting from the text
    encoder's output for start_prompt; Textual Inversion's batches (an image or its mirror, t ~ U[0, T))."""
    from inversion.adam import Adam
    from inversion.textual_inversion import encode_images, noisy_latents
    model.requires_grad_(False).eval()
    means, stds = encode_images(model, images)                               # (2N, C, h, w)
    context = torch.nn.Parameter(model.encode_prompts([start_prompt]).float()[0].clone())  # (77, D)
    optimizer = Adam([context], lr=lr)
    for step in range(steps):
        rng = np.random.default_rng([seed, step])
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        rows = torch.from_numpy(rng.integers(0, len(means), batch))
        z_t, noise, t = noisy_latents(model, means, stds, rows, g)
        eps = model.unet(z_t.to(model.dtype), t, context.expand(batch, -1, -1).to(model.dtype))
        loss = F.mse_loss(eps.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return context.detach()


def sample(model, context: torch.Tensor, n: int, steps: int = 50, scale: float = 7.5, seed: int = 0) -> np.ndarray:
    """n images (uint8 (n, H, W, 3)) drawn from the context (77, D) in place of a prompt's text-encoder
    output; seeds seed .. seed + n - 1, the unconditional half the empty prompt's."""
    from tinyworld.evaluate import sample_prompts
    cond = context.to(model.device, model.dtype)[None]                      # (1, 77, D): every sample's
    return sample_prompts(model, [""] * n, [seed + i for i in range(n)], steps, scale, cond=cond)
