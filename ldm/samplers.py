"""Samplers for the epsilon-prediction diffusion model of Stable Diffusion v1.

k-diffusion style: a sampler is a pure function of a `Denoiser` (x_t, t) -> eps, the starting
noise x_T and a `NoiseSchedule`. Classifier-free guidance is a `Denoiser` wrapper around the UNet.

Numerics: the running sample and all coefficients are kept in float32 (coefficients are computed
in float64 from the float32 schedule); the denoiser sees x in x_T's dtype (e.g. fp16 on CUDA) and
the result is returned in that dtype. Noise is drawn on the CPU (or on `generator`'s device) in
float32 and moved to x's device, so a seeded CPU generator gives the same samples on any device.
`generator` is one generator for the whole batch, or a list with one per image, which makes each
image's noise its own: the same picture whatever else is in the batch (`ldm.generate` does that).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from ldm.schedule import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""eps = denoiser(x_t, t): x_t (B, C, H, W), t LongTensor (B,) of timesteps in [0, T)."""
Generators = Union[None, torch.Generator, Sequence[torch.Generator]]  # one for the batch, or one per image

Context = Union[Tensor, Sequence[Tensor]]
Conditioning = Union[Context, Callable[[int], Context]]
"""A (B, L, D) tensor, a list with one such tensor per cross-attention layer, or f(t: int) -> either."""

Progress = Callable[[Iterable], Iterable]


# --------------------------------------------------------------------------- guidance
def _resolve(c: Conditioning, t: int) -> Context:
    return c(t) if callable(c) else c


def _expand(c: Tensor, batch: int, what: str) -> Tensor:
    if c.shape[0] == batch:
        return c
    if c.shape[0] == 1:
        return c.expand(batch, *c.shape[1:])
    raise ValueError(f"{what} has batch size {c.shape[0]}, expected 1 or {batch}")


def _as_layers(c: Context, n: Optional[int]) -> list[Tensor]:
    if isinstance(c, Tensor):
        return [c] * (n if n is not None else 1)
    return list(c)


def _expand_context(c: Context, batch: int, what: str) -> Context:
    if isinstance(c, Tensor):
        return _expand(c, batch, what)
    return [_expand(layer, batch, f"{what}[{i}]") for i, layer in enumerate(c)]


def _cat_context(uncond: Context, cond: Context) -> Context:
    """Stack unconditional then conditional context along the batch, layer by layer."""
    if isinstance(uncond, Tensor) and isinstance(cond, Tensor):
        return torch.cat([uncond, cond])
    n = len(cond) if not isinstance(cond, Tensor) else len(uncond)
    u, c = _as_layers(uncond, n), _as_layers(cond, n)
    if len(u) != len(c):
        raise ValueError(f"per-layer conditioning lengths differ: uncond {len(u)}, cond {len(c)}")
    return [torch.cat([ui, ci]) for ui, ci in zip(u, c)]


def guided_denoiser(unet: Callable[[Tensor, Tensor, Context], Tensor], cond: Conditioning,
                    uncond: Optional[Conditioning], scale: float,
                    value_cond: Optional[Conditioning] = None,
                    value_uncond: Optional[Conditioning] = None) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps = eps_u + s * (eps_c - eps_u).

    The paper writes (1 + w) eps_c - w eps_u, so s = 1 + w: s = 1 is no guidance (eps_c alone),
    and SD's usual 7.5 is w = 6.5.

    `unet(x, t, context) -> eps`. Both halves run as one batch [uncond; cond]. A callable `cond` /
    `uncond` is called once per denoiser call with the step's integer timestep `int(t[0])`.
    Context tensors with batch 1 are expanded to the batch of x. With scale == 1 (or uncond None)
    only the conditional half is evaluated.

    `value_cond` / `value_uncond` (same forms; None = the same as `cond` / `uncond`) feed the
    cross-attention values while `cond` / `uncond` feed the keys (NeTI's textual bypass); the U-Net
    is then called as `unet(x, t, context, value_context)`.
    """
    scale = float(scale)
    if uncond is None and scale != 1.0:
        raise ValueError("classifier-free guidance with scale != 1 needs an unconditional context")
    needs_int_t = any(callable(c) for c in (cond, uncond, value_cond, value_uncond))
    has_values = value_cond is not None or value_uncond is not None

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        t_int = int(t.reshape(-1)[0]) if needs_int_t else -1
        c = _expand_context(_resolve(cond, t_int), batch, "cond")
        vc = c if value_cond is None else _expand_context(_resolve(value_cond, t_int), batch, "value_cond")
        if scale == 1.0:
            return unet(x, t, c, vc) if has_values else unet(x, t, c)
        u = _expand_context(_resolve(uncond, t_int), batch, "uncond")
        x2, t2 = torch.cat([x, x]), torch.cat([t, t])
        if has_values:
            vu = u if value_uncond is None else _expand_context(_resolve(value_uncond, t_int), batch, "value_uncond")
            eps = unet(x2, t2, _cat_context(u, c), _cat_context(vu, vc))
        else:
            eps = unet(x2, t2, _cat_context(u, c))
        eps_u, eps_c = eps.chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return denoise


# --------------------------------------------------------------------------- helpers
def _randn_like(x: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like x, float32, drawn on the generator's device."""
    if isinstance(generator, (list, tuple)):  # one generator per image: (1, ...) each, stacked
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}: give one per image")
        return torch.cat([_randn_like(x[i:i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(x.device)


def _t_batch(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


# --------------------------------------------------------------------------- samplers
@torch.no_grad()
def ddim_sample(denoiser: Denoiser, x_T: Tensor, schedule: NoiseSchedule, num_steps: int = 50,
                eta: float = 0.0, generator: Generators = None,
                progress: Optional[Progress] = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12; sigma from eq. 16 scaled by eta) on S = num_steps timesteps.

    Grid `schedule.ddim_timesteps(num_steps)` (ldm's grid when S divides T); alpha_prev of a
    step is alphas_cumprod of the next (less noisy) grid point, and alphas_cumprod[0] for the
    last step (ldm / diffusers with set_alpha_to_one=False). eta = 0 is deterministic; eta > 0
    draws fresh noise every step.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    timesteps = schedule.ddim_timesteps(num_steps).tolist()
    ac = schedule.alphas_cumprod.detach().cpu().double()
    alphas = [float(ac[t]) for t in timesteps]  # DDIM's α_t is DDPM's ᾱ_t (alphas_cumprod)
    alphas_prev = alphas[1:] + [float(ac[0])]

    dtype = x_T.dtype
    x = x_T.float()
    steps = list(zip(timesteps, alphas, alphas_prev))
    for t, a_t, a_prev in (progress(steps) if progress is not None else steps):
        eps = denoiser(x.to(dtype), _t_batch(t, x)).float()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5  # eq. 16
        pred_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5  # "predicted x_0": x_t = √α_t x_0 + √(1-α_t) ε
        # eq. 12: √α_prev · x̂_0 + "direction pointing to x_t" √(1 - α_prev - σ²) · ε, + σ · fresh noise
        x = a_prev ** 0.5 * pred_x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if eta > 0:
            x = x + sigma * _randn_like(x, generator)
    return x.to(dtype)


@torch.no_grad()
def ddpm_sample(denoiser: Denoiser, x_T: Tensor, schedule: NoiseSchedule,
                num_steps: Optional[int] = None, generator: Generators = None,
                progress: Optional[Progress] = None) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) with sigma_t^2 = posterior variance (eq. 7).

    Each step's mean is written as eq. 7's posterior mean μ̃(x_t, x̂_0), with
    x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t: algebraically line 4 of Algorithm 2,
    1/√α_t (x_t − β_t/√(1−ᾱ_t) ε), since nothing is clipped; the x̂_0 form also serves the
    respaced chain below.

    num_steps None (or == T) runs all T steps T-1..0. Fewer steps use the `ddim_timesteps` grid and
    the posterior of the respaced chain: between consecutive grid points t > s,
    beta = 1 - abar_t / abar_s and abar_s = 1 for the last step (= diffusers DDPMScheduler,
    "leading" spacing, steps_offset=1, variance "fixed_small", clip_sample=False; the grid is
    ldm's too when num_steps divides T, see `ddim_timesteps`). No noise is added on the last step
    (z = 0 in Algorithm 2).
    """
    T = schedule.num_timesteps
    if num_steps is None or num_steps == T:
        timesteps = list(range(T - 1, -1, -1))
    else:
        timesteps = schedule.ddim_timesteps(num_steps).tolist()
    ac = schedule.alphas_cumprod.detach().cpu().double()
    alphas = [float(ac[t]) for t in timesteps]
    alphas_prev = alphas[1:] + [1.0]

    dtype = x_T.dtype
    x = x_T.float()
    n = len(timesteps)
    steps = list(zip(range(n), timesteps, alphas, alphas_prev))
    for i, t, a_t, a_prev in (progress(steps) if progress is not None else steps):
        eps = denoiser(x.to(dtype), _t_batch(t, x)).float()
        beta = 1 - a_t / a_prev  # β of this step of the (respaced) chain; a_t, a_prev are ᾱ's
        pred_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        coef_x0 = a_prev ** 0.5 * beta / (1 - a_t)  # eq. 7: μ̃ = coef_x0 · x̂_0 + coef_xt · x_t
        coef_xt = (1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)
        x = coef_x0 * pred_x0 + coef_xt * x
        if i < n - 1:
            variance = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
            x = x + variance ** 0.5 * _randn_like(x, generator)
    return x.to(dtype)
