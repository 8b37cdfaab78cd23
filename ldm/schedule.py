"""The DDPM noise schedule of Stable Diffusion v1 (`LatentDiffusion.register_schedule` in ldm).

Betas follow ldm's "linear" schedule (called "scaled_linear" in diffusers): linearly spaced in
sqrt(beta), then squared. As in ldm every quantity is computed in float64 and stored as float32,
so the 12 tensors of `compvis_buffers()` are bit-for-bit what the CompVis checkpoint stores.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ldm.config import ScheduleConfig


class NoiseSchedule:
    """Discrete-time variance schedule beta_1..beta_T with the DDPM closed forms (Ho et al. 2020)."""

    def __init__(self, config: ScheduleConfig | None = None):
        config = config if config is not None else ScheduleConfig()
        if config.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {config.num_timesteps}")
        self.config = config
        self.num_timesteps = int(config.num_timesteps)

        # Computed on the CPU even inside `with torch.device("meta")` (how ldm.load builds a model
        # to fill): these are numbers, not weights to load.
        f64, cpu = torch.float64, torch.device("cpu")
        betas = torch.linspace(config.linear_start ** 0.5, config.linear_end ** 0.5,
                               self.num_timesteps, dtype=f64, device=cpu) ** 2
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=f64, device=cpu), ac[:-1]])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)  # eq. 7, v_posterior = 0

        buffers64 = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        }
        self._buffer_names = tuple(buffers64)
        for name, value in buffers64.items():
            setattr(self, name, value.to(torch.float32))

    # ------------------------------------------------------------------ utilities
    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device) -> "NoiseSchedule":
        """Move every schedule tensor to `device` (in place); returns self."""
        for name in self._buffer_names:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def compvis_buffers(self) -> dict[str, Tensor]:
        """The 12 top-level schedule buffers of a CompVis SD v1 checkpoint (float32, shape [T])."""
        return {name: getattr(self, name).clone() for name in self._buffer_names}

    # ------------------------------------------------------------------ forward process
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1)
        if t.numel() not in (1, x0.shape[0]):
            raise ValueError(f"t has {t.numel()} entries but x0 has batch size {x0.shape[0]}")
        t = t.to(self.sqrt_alphas_cumprod.device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = self.sqrt_alphas_cumprod[t].to(device=x0.device, dtype=x0.dtype).reshape(shape)
        s = self.sqrt_one_minus_alphas_cumprod[t].to(device=x0.device, dtype=x0.dtype).reshape(shape)
        return a * x0 + s * noise

    # ------------------------------------------------------------------ sampling grid
    def ddim_timesteps(self, num_steps: int) -> Tensor:
        """The sampling grid: S timesteps spaced T // S apart and shifted by +1, descending.

        For S = 50: [981, 961, ..., 21, 1], the grid of ldm's `make_ddim_timesteps('uniform')`
        and of diffusers' "leading" spacing with steps_offset=1. When S does not divide T, ldm's
        grid would get an extra step (31 for S = 30); like diffusers we take exactly S, so
        `--steps` always means the number of U-Net evaluations. For S = T the grid is 999..0.
        """
        if isinstance(num_steps, bool):  # True == 1, but it is not a number of steps
            raise ValueError(f"num_steps must be an integer, got {num_steps!r}")
        if not isinstance(num_steps, int):
            try:
                as_int = int(num_steps)
            except (TypeError, ValueError):
                raise ValueError(f"num_steps must be an integer, got {num_steps!r}") from None
            if as_int != num_steps:
                raise ValueError(f"num_steps must be an integer, got {num_steps!r}")
            num_steps = as_int
        T = self.num_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be in [1, {T}] (the number of training timesteps), "
                             f"got {num_steps}")
        stride = T // num_steps
        offset = 1 if stride * (num_steps - 1) + 1 < T else 0  # the +1 shift, unless it would reach T
        steps = torch.arange(num_steps, dtype=torch.long) * stride + offset
        return steps.flip(0)
