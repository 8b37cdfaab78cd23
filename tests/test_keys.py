"""The full SD v1.5 model, built on the meta device, has exactly the keys of the public checkpoints."""
import json

import torch

from conftest import FIXTURES
from ldm import convert
from ldm.config import ModelConfig
from ldm.model import StableDiffusion


def full_model_on_meta():
    with torch.device("meta"):
        return StableDiffusion(ModelConfig())


def test_state_dict_equals_compvis_manifest():
    manifest = json.loads((FIXTURES / "sd15_compvis_keys.json").read_text())["keys"]
    ours = {k: list(v.shape) for k, v in full_model_on_meta().state_dict().items()}
    assert sorted(ours) == sorted(manifest)
    assert ours == manifest


def test_parameter_counts_match_sd15():
    m = full_model_on_meta()
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    assert count(m.unet) == 859_520_964
    assert count(m.vae) == 83_653_863
    assert count(m.text_encoder) == 123_060_480


def test_sd15_has_sixteen_cross_attention_layers_in_construction_order():
    unet = full_model_on_meta().unet
    assert unet.num_cross_attention_layers == 16
    from ldm.unet import SpatialTransformer
    indices = [m.layer_index for m in unet.modules() if isinstance(m, SpatialTransformer)]
    assert indices == list(range(16))
    assert unet.input_blocks[1][1].layer_index == 0      # IN01
    assert unet.middle_block[1].layer_index == 6         # MID
    assert unet.output_blocks[11][1].layer_index == 15   # OUT11


def test_diffusers_conversion_covers_the_diffusers_manifest():
    """Our CompVis state dict, converted to the diffusers layout, is exactly the diffusers manifest."""
    manifest = json.loads((FIXTURES / "sd15_diffusers_keys.json").read_text())["keys"]
    sd = full_model_on_meta().state_dict()
    cfg = ModelConfig()
    take = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    got = {
        "unet": convert.unet_compvis_to_diffusers(take(convert.PREFIX_UNET), cfg.unet),
        "vae": convert.vae_compvis_to_diffusers(take(convert.PREFIX_VAE), cfg.vae),
        "text_encoder": convert.text_compvis_to_diffusers(take(convert.PREFIX_TEXT)),
    }
    for part in ("unet", "vae", "text_encoder"):
        assert {k: list(v.shape) for k, v in got[part].items()} == manifest[part], part


def test_ema_key_names_follow_the_manifest():
    """A full checkpoint adds model_ema.decay, model_ema.num_updates and one EMA copy per U-Net weight."""
    from ldm.load import ema_key
    note = json.loads((FIXTURES / "sd15_compvis_keys.json").read_text())["ema_note"]
    unet = [k for k in full_model_on_meta().state_dict() if k.startswith(convert.PREFIX_UNET)]
    names = [ema_key(k) for k in unet]
    assert names[:3] == note["example"]
    assert len(set(names)) + 2 == note["full_checkpoint_extra_key_count"]
