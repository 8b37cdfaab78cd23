"""Noise schedule and samplers: reference values, and parity with diffusers (test-only dependency)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.config import ScheduleConfig
from ldm.samplers import ddim_sample, ddpm_sample, guided_denoiser
from ldm.schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

SD_SCHED = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
DDIM_KW = dict(SD_SCHED, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
DDPM_KW = dict(SD_SCHED, clip_sample=False, steps_offset=1, timestep_spacing="leading",
               variance_type="fixed_small")

B, C, H, W, L, D = 2, 4, 8, 8, 5, 16


class ToyUNet(nn.Module):
    """Deterministic stand-in for the UNet: any smooth function of (x, t, context) -> eps."""

    def __init__(self, n_layers: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.lin = nn.Linear(D, C)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.register_buffer("freqs", torch.tensor([1.0, 0.1, 0.01, 0.003]))
        self.layer_w = [1.0 + 0.5 * i for i in range(n_layers)]
        self.calls: list[tuple] = []

    def forward(self, x, t, context):
        if isinstance(context, torch.Tensor):
            ctx = context.mean(1)
            self.calls.append((x.shape[0], context.shape[0]))
        else:
            ctx = sum(w * c.mean(1) for w, c in zip(self.layer_w, context)) / sum(self.layer_w)
            self.calls.append((x.shape[0], [c.shape[0] for c in context]))
        temb = torch.sin(t.float()[:, None] * self.freqs)[:, :, None, None]
        return (0.8 * x + 0.1 * torch.tanh(self.conv(x)) + 0.3 * torch.tanh(self.lin(ctx))[:, :, None, None]
                + 0.05 * temb)


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(B, C, H, W, generator=g)
    cond = torch.randn(B, L, D, generator=g)
    uncond = torch.randn(1, L, D, generator=g)
    return x_T, cond, uncond


def reference_eps(unet, x, t, cond, uncond, scale):
    """Guidance written out the way the diffusers SD pipeline does it."""
    latent_in = torch.cat([x] * 2)
    ctx = torch.cat([uncond.expand_as(cond), cond])
    tt = torch.full((2 * x.shape[0],), int(t), dtype=torch.long)
    eps_u, eps_c = unet(latent_in, tt, ctx).chunk(2)
    return eps_u + scale * (eps_c - eps_u)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule()


# --------------------------------------------------------------------------- schedule
# float64 values of the CompVis code's register_schedule (tests/fixtures/sd15_configs.json, the
# reference facts of SD v1.5's configuration)
REF_FLOAT64 = json.loads((FIXTURES / "sd15_configs.json").read_text())["sd_v1"]["scheduler"]["values_float64"]


def test_schedule_matches_reference_float64_values(schedule):
    ref = REF_FLOAT64
    for name, value in ref.items():
        attr, index = name[:-1].split("[")
        tensor = getattr(schedule, attr)
        if ":" in index:
            lo, hi = map(int, index.split(":"))
            got = tensor[lo:hi].double()
        else:
            got = tensor[int(index)].double()
        torch.testing.assert_close(got, torch.tensor(value, dtype=torch.float64), atol=1e-6, rtol=0, msg=name)


def test_schedule_matches_diffusers(schedule):
    diffusers = pytest.importorskip("diffusers")  # the reference, a test-only extra
    ref = diffusers.DDIMScheduler(**DDIM_KW)
    assert schedule.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(schedule.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.betas, ref.betas, atol=1e-7, rtol=0)


def test_compvis_buffers(schedule):
    bufs = schedule.compvis_buffers()
    fixture = FIXTURES / "sd15_compvis_keys.json"
    expected = [k for k in json.loads(fixture.read_text())["buffers"] if "." not in k] if fixture.exists() else None
    names = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
             "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
             "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
             "posterior_mean_coef1", "posterior_mean_coef2"]
    assert list(bufs) == names
    if expected is not None:
        assert sorted(bufs) == sorted(expected)
    for v in bufs.values():
        assert v.dtype == torch.float32 and v.shape == (1000,)
        assert torch.isfinite(v).all()
    # independent float64 recomputation of the ldm formulas
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    pv = betas * (1 - ac_prev) / (1 - ac)
    expect = {
        "alphas_cumprod_prev": ac_prev, "log_one_minus_alphas_cumprod": torch.log(1 - ac),
        "sqrt_recip_alphas_cumprod": torch.sqrt(1 / ac), "sqrt_recipm1_alphas_cumprod": torch.sqrt(1 / ac - 1),
        "posterior_variance": pv, "posterior_log_variance_clipped": torch.log(pv.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
    }
    for k, v in expect.items():
        torch.testing.assert_close(bufs[k], v.float(), rtol=1e-6, atol=1e-12, msg=k)
    assert bufs["posterior_variance"][0] == 0
    assert math.isclose(float(bufs["posterior_log_variance_clipped"][0]), math.log(1e-20), rel_tol=1e-6)
    # a copy, not a view of the schedule's own tensors
    bufs["betas"].zero_()
    assert schedule.betas[0] > 0


@pytest.mark.parametrize("steps", [50, 10, 25, 1, 30, 7, 300])
def test_ddim_timesteps_match_diffusers(schedule, steps):
    diffusers = pytest.importorskip("diffusers")  # the reference, a test-only extra
    ref = diffusers.DDIMScheduler(**DDIM_KW)
    ref.set_timesteps(steps)
    ours = schedule.ddim_timesteps(steps)
    assert ours.dtype == torch.long
    assert torch.equal(ours, ref.timesteps)
    if steps == 50:
        assert ours[0] == 981 and ours[-1] == 1 and len(ours) == 50


def test_ddim_timesteps_always_has_the_asked_number_of_steps(schedule):
    for steps in (30, 7, 999, 1000):
        grid = schedule.ddim_timesteps(steps)
        assert len(grid) == steps and grid.unique().numel() == steps
        assert int(grid.max()) < 1000 and int(grid.min()) >= 0
    # every timestep once when S = T (diffusers' +1 offset would reach t = 1000 there)
    assert schedule.ddim_timesteps(1000).tolist() == list(range(999, -1, -1))


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, True])  # True == 1 once passed as one step
def test_invalid_steps_raise(schedule, bad):
    with pytest.raises(ValueError, match="num_steps"):
        schedule.ddim_timesteps(bad)
    x = torch.zeros(1, C, H, W)
    with pytest.raises(ValueError, match="num_steps"):
        ddim_sample(lambda x, t: x, x, schedule, num_steps=bad)
    with pytest.raises(ValueError, match="num_steps"):
        ddpm_sample(lambda x, t: x, x, schedule, num_steps=bad)


def test_custom_schedule_config():
    s = NoiseSchedule(ScheduleConfig(num_timesteps=100, linear_start=0.001, linear_end=0.02))
    assert s.betas.shape == (100,)
    assert s.ddim_timesteps(10).tolist() == list(range(91, 0, -10))
    with pytest.raises(ValueError):
        s.ddim_timesteps(101)


def test_add_noise_matches_diffusers(schedule):
    diffusers = pytest.importorskip("diffusers")  # the reference, a test-only extra
    ref = diffusers.DDPMScheduler(**DDPM_KW)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, C, H, W, generator=g), torch.randn(4, C, H, W, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5, rtol=0)
    # broadcasts over any trailing shape and follows x0's dtype
    seq = torch.randn(4, 7, generator=g, dtype=torch.float64)
    out = schedule.add_noise(seq, torch.zeros_like(seq), t)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, seq * schedule.sqrt_alphas_cumprod[t].double()[:, None])
    assert schedule.to("cpu") is schedule


# --------------------------------------------------------------------------- DDIM / DDPM parity
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_parity_with_diffusers(schedule, eta):
    diffusers = pytest.importorskip("diffusers")  # the reference, a test-only extra
    unet = ToyUNet()
    x_T, cond, uncond = make_inputs()
    scale, steps = 7.5, 10

    ref = diffusers.DDIMScheduler(**DDIM_KW)
    ref.set_timesteps(steps)
    g_ref = torch.Generator().manual_seed(42)
    x = x_T.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            eps = reference_eps(unet, x, t, cond, uncond, scale)
            noise = torch.randn(x.shape, generator=g_ref) if eta > 0 else None
            x = ref.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample

    ours = ddim_sample(guided_denoiser(unet, cond, uncond, scale), x_T, schedule, num_steps=steps, eta=eta,
                       generator=torch.Generator().manual_seed(42))
    assert ours.shape == x_T.shape and ours.dtype == x_T.dtype
    assert (ours - x).abs().max() <= 1e-4
    assert (ours - x_T).abs().max() > 0.1  # it did something


def test_ddpm_parity_with_diffusers_respaced(schedule):
    diffusers = pytest.importorskip("diffusers")  # the reference, a test-only extra
    unet = ToyUNet()
    x_T, cond, uncond = make_inputs(1)
    scale, steps = 7.5, 10

    ref = diffusers.DDPMScheduler(**DDPM_KW)
    ref.set_timesteps(steps)
    assert ref.timesteps.tolist() == schedule.ddim_timesteps(steps).tolist()
    g_ref = torch.Generator().manual_seed(7)
    x = x_T.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            eps = reference_eps(unet, x, t, cond, uncond, scale)
            x = ref.step(eps, t, x, generator=g_ref).prev_sample

    ours = ddpm_sample(guided_denoiser(unet, cond, uncond, scale), x_T, schedule, num_steps=steps,
                       generator=torch.Generator().manual_seed(7))
    assert (ours - x).abs().max() <= 1e-4


def test_ddpm_parity_with_diffusers_full_chain(schedule):
    diffusers = pytest.importorskip("diffusers")  # the reference, a test-only extra
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(1, C, 4, 4, generator=g)
    w = torch.randn(C, generator=g)[None, :, None, None] * 0.1

    def denoiser(x, t):  # cheap analytic eps model
        return 0.9 * x + w * torch.cos(t.float() / 100)[:, None, None, None]

    ref = diffusers.DDPMScheduler(**DDPM_KW)  # no set_timesteps: the full chain 999..0
    g_ref = torch.Generator().manual_seed(11)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(denoiser(x, t.reshape(1)), t, x, generator=g_ref).prev_sample
    ours = ddpm_sample(denoiser, x_T, schedule, generator=torch.Generator().manual_seed(11))
    assert (ours - x).abs().max() <= 1e-4


# --------------------------------------------------------------------------- guidance / conditioning
def test_list_conditioning_concatenates_layerwise():
    unet = ToyUNet(n_layers=3)
    x, _, _ = make_inputs()
    g = torch.Generator().manual_seed(9)
    cond = [torch.randn(B, L, D, generator=g) for _ in range(3)]
    uncond = [torch.randn(1, L, D, generator=g) for _ in range(3)]
    t = torch.full((B,), 301, dtype=torch.long)

    eps = guided_denoiser(unet, cond, uncond, 5.0)(x, t)
    assert unet.calls[-1] == (2 * B, [2 * B] * 3)  # one batched call, every layer [uncond; cond]
    eps_u = unet(x, t, [u.expand(B, L, D) for u in uncond])
    eps_c = unet(x, t, cond)
    torch.testing.assert_close(eps, eps_u + 5.0 * (eps_c - eps_u), atol=1e-6, rtol=1e-5)

    # a single tensor uncond is broadcast to every layer
    eps2 = guided_denoiser(unet, cond, uncond[0], 5.0)(x, t)
    eps_u2 = unet(x, t, [uncond[0].expand(B, L, D)] * 3)
    torch.testing.assert_close(eps2, eps_u2 + 5.0 * (eps_c - eps_u2), atol=1e-6, rtol=1e-5)

    with pytest.raises(ValueError, match="per-layer conditioning lengths differ: uncond 2, cond 3"):
        guided_denoiser(unet, cond, uncond[:2], 5.0)(x, t)


def test_callable_conditioning_equals_tensor_and_sees_each_timestep(schedule):
    unet = ToyUNet()
    x_T, cond, uncond = make_inputs()
    seen_c, seen_u = [], []

    def cond_fn(t):
        assert isinstance(t, int)
        seen_c.append(t)
        return cond

    def uncond_fn(t):
        seen_u.append(t)
        return uncond

    a = ddim_sample(guided_denoiser(unet, cond, uncond, 7.5), x_T, schedule, num_steps=10)
    b = ddim_sample(guided_denoiser(unet, cond_fn, uncond_fn, 7.5), x_T, schedule, num_steps=10)
    assert torch.equal(a, b)
    assert seen_c == schedule.ddim_timesteps(10).tolist() == seen_u

    # per-timestep conditioning actually changes the result
    c = ddim_sample(guided_denoiser(unet, lambda t: cond * (t / 1000), uncond, 7.5), x_T, schedule, num_steps=10)
    assert (c - a).abs().max() > 1e-3


def test_scale_one_skips_unconditional_half_and_expands_batch():
    unet = ToyUNet()
    x, cond, uncond = make_inputs()
    t = torch.full((B,), 500, dtype=torch.long)
    eps = guided_denoiser(unet, cond, None, 1.0)(x, t)
    assert unet.calls[-1] == (B, B)
    torch.testing.assert_close(eps, unet(x, t, cond))
    eps1 = guided_denoiser(unet, cond, uncond, 1.0)(x, t)
    assert unet.calls[-1] == (B, B)  # the unconditional half is not run
    torch.testing.assert_close(eps1, eps)

    # batch-1 cond is expanded to the batch of x; batch-1 uncond to the batch of cond
    guided_denoiser(unet, cond[:1], uncond, 3.0)(x, t)
    assert unet.calls[-1] == (2 * B, 2 * B)
    with pytest.raises(ValueError, match="needs an unconditional context"):
        guided_denoiser(unet, cond, None, 7.5)


# --------------------------------------------------------------------------- sampler mechanics
def test_low_precision_input_uses_fp32_math(schedule):
    x_T, _, _ = make_inputs()
    dtypes = []

    def denoiser(x, t):
        dtypes.append(x.dtype)
        return 0.9 * x

    ref = ddim_sample(denoiser, x_T, schedule, num_steps=10)
    out = ddim_sample(denoiser, x_T.to(torch.bfloat16), schedule, num_steps=10)
    assert out.dtype == torch.bfloat16 and dtypes[-1] == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.02  # bf16's rounding of x_T and of the result; bf16 math: 0.03
    out = ddpm_sample(denoiser, x_T.half(), schedule, num_steps=10, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_progress_and_generator_reproducibility(schedule):
    x_T, _, _ = make_inputs()
    denoiser = lambda x, t: 0.9 * x  # noqa: E731
    wrapped = []

    def progress(it):
        it = list(it)
        wrapped.append(len(it))
        return iter(it)

    a = ddim_sample(denoiser, x_T, schedule, num_steps=10, eta=1.0, generator=torch.Generator().manual_seed(1),
                    progress=progress)
    b = ddim_sample(denoiser, x_T, schedule, num_steps=10, eta=1.0, generator=torch.Generator().manual_seed(1))
    c = ddim_sample(denoiser, x_T, schedule, num_steps=10, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert wrapped == [10]
    assert torch.equal(a, b) and not torch.allclose(a, c)
    d = ddpm_sample(denoiser, x_T, schedule, num_steps=20, generator=torch.Generator().manual_seed(1),
                    progress=progress)
    e = ddpm_sample(denoiser, x_T, schedule, num_steps=20, generator=torch.Generator().manual_seed(1))
    assert wrapped == [10, 20] and torch.equal(d, e)
    with pytest.raises(ValueError):
        ddim_sample(denoiser, x_T, schedule, num_steps=10, eta=-0.1)
    # one generator per image, or one for the whole batch: a list of another length is refused
    gens = lambda n: [torch.Generator().manual_seed(i) for i in range(n)]  # noqa: E731
    assert ddim_sample(denoiser, x_T, schedule, num_steps=3, eta=1.0, generator=gens(B)).shape == x_T.shape
    for n in (1, B + 1):
        with pytest.raises(ValueError, match=f"{n} generators for a batch of {B}: give one per image"):
            ddim_sample(denoiser, x_T, schedule, num_steps=3, eta=1.0, generator=gens(n))
