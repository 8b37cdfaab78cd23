"""ldm/convert.py: diffusers folder layout <-> CompVis single-file layout, and config.json <-> ModelConfig.

The SD v1.5 tests run on meta tensors built from the key/shape manifests in tests/fixtures; the
small-config tests build real (tiny) diffusers / transformers models from the configs we write.
"""
import json
import re
from pathlib import Path

import pytest
import torch

from ldm.config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from ldm.convert import (
    PREFIX_TEXT, PREFIX_UNET, PREFIX_VAE, ConversionError, compvis_to_diffusers,
    diffusers_to_compvis, read_diffusers_configs, read_scheduler_config, text_compvis_to_diffusers,
    text_diffusers_to_compvis, unet_compvis_to_diffusers, unet_diffusers_to_compvis,
    vae_compvis_to_diffusers, vae_diffusers_to_compvis, write_diffusers_configs, write_scheduler_config,
)

FIXTURES = Path(__file__).parent / "fixtures"
COMPVIS = json.loads((FIXTURES / "sd15_compvis_keys.json").read_text())
DIFFUSERS = json.loads((FIXTURES / "sd15_diffusers_keys.json").read_text())
SCHEDULE_BUFFERS = [b for b in COMPVIS["buffers"] if "." not in b]


def meta(shapes: dict) -> dict:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def shapes(sd: dict) -> dict:
    return {k: list(v.shape) for k, v in sd.items()}


def compvis_part(prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in COMPVIS["keys"].items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------
# Independent expectations: the CompVis key names, generated the way ldm's UNetModel / Encoder /
# Decoder constructors number their modules (checked against the SD v1.5 manifest below).
# --------------------------------------------------------------------------------------------

def wb(name):
    return [f"{name}.weight", f"{name}.bias"]


def compvis_unet_keys(cfg: UNetConfig) -> set:
    def res(p, cin, cout):
        keys = [k for n in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3")
                for k in wb(f"{p}.{n}")]
        return keys + (wb(f"{p}.skip_connection") if cin != cout else [])

    def st(p):
        keys = wb(f"{p}.norm") + wb(f"{p}.proj_in") + wb(f"{p}.proj_out")
        for d in range(cfg.transformer_depth):
            b = f"{p}.transformer_blocks.{d}"
            for attn in ("attn1", "attn2"):
                keys += [f"{b}.{attn}.to_{x}.weight" for x in "qkv"] + wb(f"{b}.{attn}.to_out.0")
            keys += [k for n in ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2") for k in wb(f"{b}.{n}")]
        return keys

    mc, last = cfg.model_channels, len(cfg.channel_mult) - 1
    keys = wb("time_embed.0") + wb("time_embed.2") + wb("input_blocks.0.0")
    ch, skips, ds, idx = mc, [mc], 1, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            keys += res(f"input_blocks.{idx}.0", ch, mult * mc)
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                keys += st(f"input_blocks.{idx}.1")
            skips.append(ch)
            idx += 1
        if level != last:
            keys += wb(f"input_blocks.{idx}.0.op")
            skips.append(ch)
            ds, idx = ds * 2, idx + 1
    keys += res("middle_block.0", ch, ch) + st("middle_block.1") + res("middle_block.2", ch, ch)
    idx = 0
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            keys += res(f"output_blocks.{idx}.0", ch + skips.pop(), mult * mc)
            ch, sub = mult * mc, 1
            if ds in cfg.attention_resolutions:
                keys += st(f"output_blocks.{idx}.1")
                sub = 2
            if level and i == cfg.num_res_blocks:
                keys += wb(f"output_blocks.{idx}.{sub}.conv")
                ds //= 2
            idx += 1
    return set(keys + wb("out.0") + wb("out.2"))


def compvis_vae_keys(cfg: VAEConfig) -> set:
    def block(p, cin, cout):
        return [k for n in ("norm1", "conv1", "norm2", "conv2") for k in wb(f"{p}.{n}")] + \
            (wb(f"{p}.nin_shortcut") if cin != cout else [])

    def mid(p):
        return block(f"{p}.mid.block_1", 0, 0) + block(f"{p}.mid.block_2", 0, 0) + \
            [k for n in ("norm", "q", "k", "v", "proj_out") for k in wb(f"{p}.mid.attn_1.{n}")]

    keys = wb("quant_conv") + wb("post_quant_conv")
    for coder in ("encoder", "decoder"):
        keys += wb(f"{coder}.conv_in") + wb(f"{coder}.conv_out") + wb(f"{coder}.norm_out") + mid(coder)
    mults, last = (1,) + tuple(cfg.ch_mult), len(cfg.ch_mult) - 1
    for level in range(len(cfg.ch_mult)):
        cin = cfg.ch * mults[level]
        for j in range(cfg.num_res_blocks):
            keys += block(f"encoder.down.{level}.block.{j}", cin, cfg.ch * cfg.ch_mult[level])
            cin = cfg.ch * cfg.ch_mult[level]
        if level != last:
            keys += wb(f"encoder.down.{level}.downsample.conv")
    cin = cfg.ch * cfg.ch_mult[-1]
    for level in reversed(range(len(cfg.ch_mult))):
        for j in range(cfg.num_res_blocks + 1):
            keys += block(f"decoder.up.{level}.block.{j}", cin, cfg.ch * cfg.ch_mult[level])
            cin = cfg.ch * cfg.ch_mult[level]
        if level != 0:
            keys += wb(f"decoder.up.{level}.upsample.conv")
    return set(keys)


def test_expected_key_generators_match_sd15_manifest():
    cfg = ModelConfig()
    assert compvis_unet_keys(cfg.unet) == set(compvis_part(PREFIX_UNET))
    assert compvis_vae_keys(cfg.vae) == set(compvis_part(PREFIX_VAE))


# --------------------------------------------------------------------------------------------
# SD v1.5 manifests (meta tensors)
# --------------------------------------------------------------------------------------------

def test_sd15_diffusers_to_compvis_gives_the_compvis_checkpoint_keys_and_shapes():
    cfg, d = ModelConfig(), DIFFUSERS["keys"]
    unet = unet_diffusers_to_compvis(meta(d["unet"]), cfg.unet)
    vae = vae_diffusers_to_compvis(meta(d["vae"]), cfg.vae)
    text = text_diffusers_to_compvis(meta(d["text_encoder"]))
    assert shapes(unet) == compvis_part(PREFIX_UNET)
    assert shapes(vae) == compvis_part(PREFIX_VAE)
    assert shapes(text) == compvis_part(PREFIX_TEXT)
    assert "embeddings.token_embedding.weight" in text and "embeddings.position_ids" in text
    assert len(unet) + len(vae) + len(text) == 1131
    # spot checks of the index arithmetic
    assert unet["output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)  # level 3: no attention
    assert unet["output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)  # after a transformer
    assert vae["decoder.up.0.block.2.conv1.weight"].shape == (128, 128, 3, 3)
    assert vae["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_sd15_compvis_to_diffusers_gives_the_diffusers_folder_keys_and_shapes():
    cfg, d = ModelConfig(), DIFFUSERS["keys"]
    assert shapes(unet_compvis_to_diffusers(meta(compvis_part(PREFIX_UNET)), cfg.unet)) == d["unet"]
    assert shapes(vae_compvis_to_diffusers(meta(compvis_part(PREFIX_VAE)), cfg.vae)) == d["vae"]
    assert shapes(text_compvis_to_diffusers(meta(compvis_part(PREFIX_TEXT)))) == d["text_encoder"]


def test_whole_checkpoint_helpers_on_sd15():
    cfg, d = ModelConfig(), DIFFUSERS["keys"]
    flat = diffusers_to_compvis(meta(d["unet"]), meta(d["vae"]), meta(d["text_encoder"]), cfg)
    expected = {k: v for k, v in COMPVIS["keys"].items() if k not in SCHEDULE_BUFFERS}
    assert shapes(flat) == expected
    # the full checkpoint (schedule buffers and EMA keys are dropped)
    full = meta(COMPVIS["keys"])
    full["model_ema.decay"] = torch.empty((), device="meta")
    full["model_ema.diffusion_modeltime_embed0weight"] = torch.empty((1280, 320), device="meta")
    unet, vae, text = compvis_to_diffusers(full, cfg)
    assert (shapes(unet), shapes(vae), shapes(text)) == (d["unet"], d["vae"], d["text_encoder"])
    with pytest.raises(ConversionError, match="cond_stage_model.something"):
        compvis_to_diffusers({**full, "cond_stage_model.something": torch.empty(1)}, cfg)


def test_sd15_legacy_vae_attention_names_are_accepted():
    cfg = ModelConfig().vae
    legacy = DIFFUSERS["vae_legacy_attention_names"]["current_to_legacy"]
    old = {legacy.get(k, k): v for k, v in DIFFUSERS["keys"]["vae"].items()}
    assert "encoder.mid_block.attentions.0.query.weight" in old
    vae = vae_diffusers_to_compvis(meta(old), cfg)
    assert shapes(vae) == compvis_part(PREFIX_VAE)
    # written back with the current names
    assert shapes(vae_compvis_to_diffusers(vae, cfg)) == DIFFUSERS["keys"]["vae"]


def test_both_spellings_of_one_attention_weight_is_an_error():
    cfg = ModelConfig().vae
    sd = meta({"encoder.mid_block.attentions.0.to_q.weight": [512, 512],
               "encoder.mid_block.attentions.0.query.weight": [512, 512]})
    with pytest.raises(ConversionError, match="query"):
        vae_diffusers_to_compvis(sd, cfg)


def test_text_keys_without_text_model_level():
    stripped = {k[len("text_model."):]: v for k, v in DIFFUSERS["keys"]["text_encoder"].items()}
    text = text_diffusers_to_compvis(meta(stripped))
    assert shapes(text) == compvis_part(PREFIX_TEXT)
    assert shapes(text_compvis_to_diffusers(text)) == DIFFUSERS["keys"]["text_encoder"]


def test_conversion_renames_without_copying():
    sd = {"conv_in.weight": torch.randn(320, 4, 3, 3),
          "encoder.mid_block.attentions.0.to_q.weight": torch.randn(512, 512)}
    unet = unet_diffusers_to_compvis({"conv_in.weight": sd["conv_in.weight"]}, UNetConfig())
    assert unet["input_blocks.0.0.weight"] is sd["conv_in.weight"]
    vae = vae_diffusers_to_compvis({"encoder.mid_block.attentions.0.to_q.weight": sd["encoder.mid_block.attentions.0.to_q.weight"]}, VAEConfig())
    q = vae["encoder.mid.attn_1.q.weight"]
    assert q.shape == (512, 512, 1, 1) and q.data_ptr() == sd["encoder.mid_block.attentions.0.to_q.weight"].data_ptr()


# --------------------------------------------------------------------------------------------
# Unknown keys
# --------------------------------------------------------------------------------------------

def test_unknown_key_raises_conversion_error_naming_it():
    sd = meta(DIFFUSERS["keys"]["unet"])
    sd["down_blocks.0.resnets.0.mystery.weight"] = torch.empty(1, device="meta")
    with pytest.raises(ConversionError, match="mystery") as info:
        unet_diffusers_to_compvis(sd, UNetConfig())
    assert isinstance(info.value, KeyError)
    assert info.value.keys == ["down_blocks.0.resnets.0.mystery.weight"]


def test_error_lists_at_most_five_keys_and_the_total():
    sd = {f"bogus.{i}.weight": torch.empty(1, device="meta") for i in range(8)}
    with pytest.raises(ConversionError) as info:
        vae_diffusers_to_compvis(sd, VAEConfig())
    message = str(info.value)
    assert "8" in message and "bogus.4.weight" in message and "bogus.5.weight" not in message


def test_blocks_outside_the_configured_model_are_unknown():
    small = UNetConfig(channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,))
    for key in ("down_blocks.2.resnets.0.conv1.weight",          # no third level
                "down_blocks.0.resnets.1.conv1.weight",          # only one resnet per level
                "down_blocks.1.attentions.0.norm.weight",        # no attention at level 1
                "down_blocks.1.downsamplers.0.conv.weight",      # last level does not downsample
                "mid_block.attentions.0.transformer_blocks.1.norm1.weight"):  # depth 1
        with pytest.raises(ConversionError):
            unet_diffusers_to_compvis({key: torch.empty(1, device="meta")}, small)
    with pytest.raises(ConversionError):
        unet_compvis_to_diffusers({"input_blocks.4.0.in_layers.0.weight": torch.empty(1, device="meta")}, small)
    with pytest.raises(ConversionError):
        text_diffusers_to_compvis({"text_projection.weight": torch.empty(1, device="meta")})


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

def manifest_configs():
    c = DIFFUSERS["configs"]
    return dict(c["unet"]), {k: v for k, v in c["vae"].items() if k != "note"}, \
        {k: v for k, v in c["text_encoder"].items() if k != "note"}


def test_read_sd15_configs_gives_the_defaults():
    cfg = read_diffusers_configs(*manifest_configs(), scheduler_cfg=DIFFUSERS["configs"]["scheduler"])
    default = ModelConfig()
    assert cfg.unet == default.unet and cfg.vae == default.vae and cfg.text == default.text
    assert cfg.schedule == default.schedule
    assert cfg.unet.attention_resolutions == (4, 2, 1)


def test_original_runwayml_vae_config_without_scaling_factor():
    unet, vae, text = manifest_configs()
    del vae["scaling_factor"]
    assert read_diffusers_configs(unet, vae, text).vae.scale_factor == 0.18215


def test_write_sd15_configs_matches_the_hub_files_and_round_trips():
    unet, vae, text = write_diffusers_configs(ModelConfig())
    hub_unet, hub_vae, hub_text = manifest_configs()
    assert unet == hub_unet
    assert vae == hub_vae
    ids = ("bos_token_id", "eos_token_id")  # the hub file has the legacy 0/2
    assert {k: v for k, v in text.items() if k not in ids} == {k: v for k, v in hub_text.items() if k not in ids}
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (49406, 49407, 1)
    assert read_diffusers_configs(unet, vae, text) == ModelConfig()
    assert read_scheduler_config(write_scheduler_config(ModelConfig().schedule)) == ModelConfig().schedule
    assert write_scheduler_config(ModelConfig().schedule) == DIFFUSERS["configs"]["scheduler"]
    # another schedule is named for what it is
    for key, value, says in (("beta_schedule", "linear", "beta_schedule 'linear' is not SD v1's"),
                             ("trained_betas", [0.1] * 1000, "trained_betas are given")):
        with pytest.raises(ValueError, match=says):
            read_scheduler_config({**write_scheduler_config(ModelConfig().schedule), key: value})


def test_attention_head_dim_list_and_nested_clip_config():
    unet, vae, text = manifest_configs()
    unet["attention_head_dim"] = [8, 8, 8, 8]
    cfg = read_diffusers_configs(unet, vae, {"text_config": text, "model_type": "clip"})
    assert cfg.unet.num_heads == 8 and cfg.text == CLIPTextConfig()


def sd2_unet():
    unet = manifest_configs()[0]
    unet.update(use_linear_projection=True, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20])
    return unet


def sdxl_unet():
    unet = manifest_configs()[0]
    unet.update(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                addition_embed_type="text_time", addition_time_embed_dim=256, cross_attention_dim=2048,
                attention_head_dim=[5, 10, 20], use_linear_projection=True,
                projection_class_embeddings_input_dim=2816)
    return unet


@pytest.mark.parametrize("make_unet, family", [(sd2_unet, "2.x"), (sdxl_unet, "SDXL")])
def test_other_families_are_rejected_with_a_clear_message(make_unet, family):
    _, vae, text = manifest_configs()
    with pytest.raises(ValueError, match=family):
        read_diffusers_configs(make_unet(), vae, text)


def test_sd2_text_encoder_is_rejected():
    unet, vae, text = manifest_configs()
    text.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, hidden_act="gelu")
    with pytest.raises(ValueError, match="2.x"):
        read_diffusers_configs(unet, vae, text)


@pytest.mark.parametrize("part, change, message", [
    ("unet", {"time_cond_proj_dim": 256}, "time_cond_proj_dim=256"),      # LCM-distilled U-Net
    ("unet", {"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ("unet", {"num_class_embeds": 1000}, "num_class_embeds=1000"),
    ("unet", {"up_block_types": ["UpBlock2D"] * 4}, "do not mirror"),    # halves must mirror
    ("unet", {"block_out_channels": [320, 640, 1280, 1000]}, "not multiples of 320"),
    ("unet", {"mid_block_type": None}, "mid_block_type=None"),
    ("unet", {"_class_name": "UNet2DModel"}, "'UNet2DModel', expected 'UNet2DConditionModel'"),
    ("vae", {"use_quant_conv": False}, "use_quant_conv=False"),
    ("vae", {"shift_factor": 0.1159}, "shift_factor=0.1159"),
    ("vae", {"down_block_types": ["DownEncoderBlock2D"] * 3}, "vae block types"),
    ("text", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unrepresentable_configs_raise_value_error(part, change, message):
    unet, vae, text = manifest_configs()
    {"unet": unet, "vae": vae, "text": text}[part].update(change)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_diffusers_configs(unet, vae, text)


def test_write_rejects_what_diffusers_cannot_express():
    with pytest.raises(ValueError, match="attention_resolutions"):
        write_diffusers_configs(ModelConfig(unet=UNetConfig(attention_resolutions=(3,))))
    with pytest.raises(ValueError, match="embed_dim 8 != z_channels 4"):
        write_diffusers_configs(ModelConfig(vae=VAEConfig(embed_dim=8)))


# --------------------------------------------------------------------------------------------
# Small configs with real diffusers / transformers models
# --------------------------------------------------------------------------------------------

def small_config(attention_resolutions) -> ModelConfig:
    return ModelConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=attention_resolutions, num_heads=4, context_dim=32,
                        norm_groups=8),
        vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        text=CLIPTextConfig(vocab_size=100, max_position_embeddings=16, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        image_size=24,
    )


@pytest.fixture(scope="module")
def diffusers_classes():
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, transformers


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("attention_resolutions, upsample_key", [
    ((1,), "output_blocks.1.1.conv.weight"),   # attention on the first level only
    ((2,), "output_blocks.1.2.conv.weight"),   # attention on the last level: upsampler after it
])
def test_small_diffusers_models_convert_and_round_trip(diffusers_classes, attention_resolutions, upsample_key):
    UNet, VAE, transformers = diffusers_classes
    cfg = small_config(attention_resolutions)
    unet_json, vae_json, text_json = write_diffusers_configs(cfg)
    torch.manual_seed(0)
    unet_model, vae_model = UNet.from_config(unet_json), VAE.from_config(vae_json)
    text_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_json))

    # diffusers / transformers parsed our JSON the way we meant it
    built = read_diffusers_configs(dict(unet_model.config), dict(vae_model.config), text_model.config.to_dict())
    assert (built.unet, built.vae, built.text) == (cfg.unet, cfg.vae, cfg.text)
    # the image size travels as the U-Net's sample_size in latents, which diffusers' pipelines read
    assert built.image_size == 24 and unet_model.config.sample_size == 24 // cfg.vae.downsample_factor

    unet_sd, vae_sd = unet_model.state_dict(), vae_model.state_dict()
    text_sd = text_model.state_dict()  # transformers 5: no `text_model.` level
    unet = unet_diffusers_to_compvis(unet_sd, cfg.unet)
    vae = vae_diffusers_to_compvis(vae_sd, cfg.vae)
    text = text_diffusers_to_compvis(text_sd)

    assert set(unet) == compvis_unet_keys(cfg.unet)
    assert set(vae) == compvis_vae_keys(cfg.vae)
    assert unet[upsample_key].shape == (64, 64, 3, 3)
    if attention_resolutions == (1,):
        assert unet["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (32, 32)
        assert "input_blocks.4.1.norm.weight" not in unet
    else:
        assert unet["input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"].shape == (64, 32)
    assert unet["middle_block.1.proj_in.weight"].shape == (64, 64, 1, 1)
    assert vae["decoder.up.0.block.1.conv1.weight"].shape == (32, 32, 3, 3)
    assert vae["decoder.up.1.upsample.conv.weight"].shape == (64, 64, 3, 3)
    assert vae["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert torch.equal(vae["decoder.mid.attn_1.proj_out.weight"][:, :, 0, 0],
                       vae_sd["decoder.mid_block.attentions.0.to_out.0.weight"])
    assert torch.equal(unet["output_blocks.0.0.skip_connection.weight"],
                       unet_sd["up_blocks.0.resnets.0.conv_shortcut.weight"])
    assert "embeddings.token_embedding.weight" in text

    assert_same_tensors(unet_compvis_to_diffusers(unet, cfg.unet), unet_sd)
    assert_same_tensors(vae_compvis_to_diffusers(vae, cfg.vae), vae_sd)
    assert_same_tensors(text_compvis_to_diffusers(text), {"text_model." + k: v for k, v in text_sd.items()})

    # the converted weights load back into fresh diffusers models
    fresh = UNet.from_config(unet_json)
    fresh.load_state_dict(unet_compvis_to_diffusers(unet, cfg.unet), strict=True)
    assert_same_tensors(fresh.state_dict(), unet_sd)
    fresh_vae = VAE.from_config(vae_json)
    fresh_vae.load_state_dict(vae_compvis_to_diffusers(vae, cfg.vae), strict=True)
    assert_same_tensors(fresh_vae.state_dict(), vae_sd)
