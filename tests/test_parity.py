"""Parity with the reference implementations (transformers' CLIPTextModel, diffusers'
AutoencoderKL, UNet2DConditionModel and DDIMScheduler) on the same random weights.

CI runs a small configuration. The full SD v1.5 configuration (about 14 GB of RAM, a few
minutes on 2 cores) runs with:  SD_PARITY_FULL=1 python -m pytest tests/test_parity.py -q
"""
import os

import pytest
import torch

from conftest import tiny_config, randomize
from ldm import convert
from ldm.config import ModelConfig
from ldm.model import StableDiffusion
from ldm.samplers import ddim_sample, guided_denoiser

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

FULL = os.environ.get("SD_PARITY_FULL") == "1"
TOL = 1e-4


def config_and_sizes():
    if FULL:  # SD v1.5 itself, at a reduced image size to keep the CPU time reasonable
        return ModelConfig(), dict(latent=32, image=128, batch=1)
    return tiny_config(), dict(latent=16, image=32, batch=2)


@pytest.fixture(scope="module")
def pair():
    """Our model and the reference models holding identical random weights."""
    torch.manual_seed(0)
    cfg, sizes = config_and_sizes()
    unet_json, vae_json, text_json = convert.write_diffusers_configs(cfg)
    # Every weight random, zero-initialised layers included. At full size a smaller spread keeps the
    # activations at the scale of real ones (|latents| of a few units, not tens).
    std = 0.02 if FULL else 0.05
    ref_unet = randomize(diffusers.UNet2DConditionModel.from_config(unet_json), seed=1, std=std).eval()
    ref_vae = randomize(diffusers.AutoencoderKL.from_config(vae_json), seed=2, std=std).eval()
    ref_text = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_json)), seed=3).eval()

    ours = StableDiffusion(cfg).eval()
    sd = {}
    sd.update({convert.PREFIX_UNET + k: v for k, v in
               convert.unet_diffusers_to_compvis(ref_unet.state_dict(), cfg.unet).items()})
    sd.update({convert.PREFIX_VAE + k: v for k, v in
               convert.vae_diffusers_to_compvis(ref_vae.state_dict(), cfg.vae).items()})
    text_sd = {k: v for k, v in ref_text.state_dict().items() if not k.endswith("position_ids")}
    sd.update({convert.PREFIX_TEXT + k: v for k, v in convert.text_diffusers_to_compvis(text_sd).items()})
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert unexpected == []
    assert set(missing) <= set(ours.schedule.compvis_buffers()) | {convert.PREFIX_TEXT + "embeddings.position_ids"}
    return cfg, sizes, ours, ref_unet, ref_vae, ref_text


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_text_encoder_matches_transformers(pair):
    cfg, sizes, ours, _, _, ref_text = pair
    ids = ours.tokenizer(["a photo of a cat", "an oil painting of a lighthouse at dusk, detailed"])
    ids = ids.clamp(max=cfg.text.vocab_size - 1)
    expected = ref_text(input_ids=ids).last_hidden_state
    got = ours.text_encoder(ids)
    assert got.shape == (2, 77, cfg.text.hidden_size)
    assert maxdiff(got, expected) <= TOL


@torch.no_grad()
def test_penultimate_layer_matches_transformers_hidden_states(pair):
    cfg, _, ours, _, _, ref_text = pair
    ids = ours.tokenizer(["a red circle"])
    out = ref_text(input_ids=ids, output_hidden_states=True)
    inner = getattr(ref_text, "text_model", ref_text)  # transformers 5 drops the `text_model` level
    expected = inner.final_layer_norm(out.hidden_states[-2])
    assert maxdiff(ours.text_encoder(ids, layer=-2), expected) <= TOL


@torch.no_grad()
def test_vae_encode_and_decode_match_diffusers(pair):
    cfg, sizes, ours, _, ref_vae, _ = pair
    g = torch.Generator().manual_seed(0)
    images = torch.rand(sizes["batch"], 3, sizes["image"], sizes["image"], generator=g) * 2 - 1
    post, ref_post = ours.vae.encode(images), ref_vae.encode(images).latent_dist
    assert maxdiff(post.mean, ref_post.mean) <= TOL
    assert maxdiff(post.logvar, ref_post.logvar) <= TOL
    z = torch.randn(sizes["batch"], cfg.vae.z_channels, sizes["latent"], sizes["latent"], generator=g)
    assert maxdiff(ours.vae.decode(z), ref_vae.decode(z).sample) <= TOL


def unet_inputs(cfg, sizes, seed):
    """A noisy latent, timesteps and a text encoding for the U-Net: (x, t, context)."""
    g = torch.Generator().manual_seed(seed)
    B = sizes["batch"]
    x = torch.randn(B, 4, sizes["latent"], sizes["latent"], generator=g)
    return x, torch.tensor([999, 17][:B]), torch.randn(B, 77, cfg.unet.context_dim, generator=g)


@torch.no_grad()
def test_unet_matches_diffusers(pair):
    cfg, sizes, ours, ref_unet, _, _ = pair
    x, t, context = unet_inputs(cfg, sizes, seed=1)
    expected = ref_unet(x, t, encoder_hidden_states=context).sample
    assert maxdiff(ours.unet(x, t, context), expected) <= TOL


def test_unet_with_every_convolution_as_a_matrix_product_matches_diffusers(pair, monkeypatch):
    """ldm.conv's CPU path (unfold + one matrix product), forced onto every convolution: strided,
    1×1 and 3×3, forward and the gradient that Textual Inversion takes through the text."""
    from ldm import conv
    cfg, sizes, ours, ref_unet, _, _ = pair
    x, t, context = unet_inputs(cfg, sizes, seed=2)

    def output_and_text_gradient(unet):
        c = context.clone().requires_grad_(True)
        out = unet(x, t, c)
        out = getattr(out, "sample", out)
        out.square().mean().backward()
        return out.detach(), c.grad

    expected, expected_grad = output_and_text_gradient(ref_unet)
    calls, as_matmul = [], conv.conv2d_as_matmul
    monkeypatch.setattr(conv, "MATMUL_MIN_WEIGHT", 0)
    monkeypatch.setattr(conv, "MATMUL_MAX_POSITIONS", 10 ** 9)
    monkeypatch.setattr(conv, "conv2d_as_matmul", lambda *a: calls.append(1) or as_matmul(*a))
    out, grad = output_and_text_gradient(ours.unet)
    n_convs = sum(isinstance(m, conv.Conv2d) for m in ours.unet.modules())
    assert len(calls) == n_convs > 0
    assert maxdiff(out, expected) <= TOL
    assert maxdiff(grad, expected_grad) <= TOL * expected_grad.abs().max().item()

@torch.no_grad()
def test_ddim_10_steps_with_guidance_matches_diffusers(pair):
    cfg, sizes, ours, ref_unet, _, ref_text = pair
    cond_ids = ours.tokenizer(["a blue square on the left"])
    uncond_ids = ours.tokenizer([""])
    cond, uncond = ours.text_encoder(cond_ids), ours.text_encoder(uncond_ids)
    ref_cond = ref_text(input_ids=cond_ids).last_hidden_state
    ref_uncond = ref_text(input_ids=uncond_ids).last_hidden_state
    x_T = torch.randn(1, 4, sizes["latent"], sizes["latent"], generator=torch.Generator().manual_seed(2))
    scale = 7.5

    got = ddim_sample(guided_denoiser(ours.unet, cond, uncond, scale), x_T, ours.schedule, num_steps=10)

    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    timestep_spacing="leading")
    # Same schedule numbers on both sides: ldm computes it in float64 (ours), diffusers in float32,
    # which differ by ~1e-7; guidance 7.5 over 10 steps amplifies that to ~1e-4 at full size.
    sched.alphas_cumprod = ours.schedule.alphas_cumprod.clone()
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    sched.set_timesteps(10)
    x = x_T.clone()
    for t in sched.timesteps:
        eps = ref_unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([ref_uncond, ref_cond])).sample
        eps_u, eps_c = eps.chunk(2)
        x = sched.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
    # At full size, 10 guided steps leave any fp32 run about 2e-4 from a float64 one (values up to
    # 46; measured for ours, with and without ldm.conv's matrix products, and for diffusers' alike),
    # so two fp32 implementations agree to a few millionths of the largest value, not to 1e-4.
    tol = 5e-6 * x.abs().max().item() if FULL else TOL
    assert maxdiff(got, x) <= tol


@torch.no_grad()
def test_per_layer_context_equal_to_single_context(pair):
    """Passing the same text to every cross-attention layer is the single-context U-Net."""
    cfg, sizes, ours, _, _, _ = pair
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, sizes["latent"], sizes["latent"], generator=g)
    context = torch.randn(1, 77, cfg.unet.context_dim, generator=g)
    n = ours.unet.num_cross_attention_layers
    single = ours.unet(x, 500, context)
    assert torch.equal(ours.unet(x, 500, [context] * n), single)
    other = [context] * n
    other[n - 1] = torch.randn_like(context)  # the last layer gets different text
    assert not torch.allclose(ours.unet(x, 500, other), single)
    with pytest.raises(ValueError, match="per-layer context"):
        ours.unet(x, 500, [context] * (n - 1))
