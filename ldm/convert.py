"""The one place where the diffusers folder layout meets the CompVis checkpoint layout.

Stable Diffusion v1 weights are published in two layouts:

* **CompVis single file** (`v1-5-pruned-emaonly.ckpt` / `.safetensors`): one flat state dict
  whose keys are the attribute paths of the original `ldm` code, e.g.
  `model.diffusion_model.input_blocks.1.0.in_layers.0.weight` (U-Net),
  `first_stage_model.encoder.down.0.block.0.conv1.weight` (VAE) and
  `cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight` (CLIP text encoder).
  The modules of this project are named so that their `state_dict()` keys are exactly these.
* **diffusers folder** (`unet/`, `vae/`, `text_encoder/`, each with a `config.json`): the same
  tensors under the attribute paths of diffusers' `UNet2DConditionModel` / `AutoencoderKL` and
  transformers' `CLIPTextModel`, e.g. `down_blocks.0.resnets.0.norm1.weight`.

The tensors are the same in both layouts except for the VAE mid-block attention projections,
which are 1x1 convolutions `[C, C, 1, 1]` in CompVis and `nn.Linear` `[C, C]` in diffusers.
So converting is renaming (plus that one reshape), and everything here works on meta tensors.

Keeping the whole correspondence in one module means the rest of the project only ever sees
CompVis names. The correspondence is not a hand-written table: small functions below describe
how one diffusers block maps to one CompVis block (a resnet, a spatial transformer, ...), and
the block indices are derived from the config (`num_res_blocks`, number of levels, which levels
have attention), so reduced test-size models convert exactly like SD v1.5. The same generated
list of module-name pairs is used in both directions, so the two directions cannot disagree.

The configs are converted here too: `read_diffusers_configs` turns diffusers/transformers
`config.json` dicts into `ldm.config.ModelConfig` (rejecting SD 2.x / SDXL and other
architectures the v1 network cannot represent) and `write_diffusers_configs` is its inverse.
"""
from __future__ import annotations

import json
import re
from typing import Iterable, Iterator, Optional

from torch import Tensor

from ldm.config import CLIPTextConfig, ModelConfig, ScheduleConfig, UNetConfig, VAEConfig

PREFIX_UNET = "model.diffusion_model."
PREFIX_VAE = "first_stage_model."
PREFIX_TEXT = "cond_stage_model.transformer.text_model."

# Top-level keys of a CompVis checkpoint that belong to none of the three networks: the DDPM
# schedule buffers of LatentDiffusion (recomputed from the config), the EMA copy of the U-Net
# in non-"emaonly" checkpoints, and the unused per-timestep `logvar`.
COMPVIS_IGNORED_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
)
COMPVIS_IGNORED_PREFIXES = ("model_ema.",)

_SD2_HINT = "looks like Stable Diffusion 2.x"
_SDXL_HINT = "looks like SDXL"


class ConversionError(KeyError):
    """State-dict keys that have no counterpart in the other layout (or collide there)."""

    MAX_LISTED = 5

    def __init__(self, problem: str, keys: Iterable[str]):
        self.keys = list(keys)
        listed = ", ".join(repr(k) for k in self.keys[: self.MAX_LISTED])
        more = len(self.keys) - self.MAX_LISTED
        tail = f", ... ({more} more)" if more > 0 else ""
        super().__init__(f"{problem}: {len(self.keys)} key(s) in total: {listed}{tail}")

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return self.args[0]


# --------------------------------------------------------------------------------------------
# Module-name correspondences. Each generator yields (diffusers module, CompVis module) pairs;
# a key is `<module>.<parameter>`, and the parameter name is the same in both layouts.
# --------------------------------------------------------------------------------------------

Pairs = Iterator[tuple[str, str]]


def _same(prefix_d: str, prefix_c: str, names: Iterable[str]) -> Pairs:
    for name in names:
        yield f"{prefix_d}.{name}", f"{prefix_c}.{name}"


def _unet_resnet(d: str, c: str) -> Pairs:
    """diffusers ResnetBlock2D <-> CompVis ResBlock (Sequentials: in_layers, emb_layers, out_layers).

    in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, Linear], out_layers = [GroupNorm,
    SiLU, Dropout, conv]: the indices skipped are the layers without weights."""
    for name_d, name_c in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"),
                           ("time_emb_proj", "emb_layers.1"), ("norm2", "out_layers.0"),
                           ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
        yield f"{d}.{name_d}", f"{c}.{name_c}"


def _unet_transformer(d: str, c: str, depth: int) -> Pairs:
    """diffusers Transformer2DModel <-> CompVis SpatialTransformer: identical names inside."""
    yield from _same(d, c, ("norm", "proj_in", "proj_out"))
    for i in range(depth):
        block = [f"transformer_blocks.{i}.{n}" for n in ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2")]
        for attn in ("attn1", "attn2"):
            block += [f"transformer_blocks.{i}.{attn}.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")]
        yield from _same(d, c, block)


def _has_attention(cfg: UNetConfig, level: int) -> bool:
    """CompVis puts a SpatialTransformer at every level whose downsample rate is listed."""
    return 2 ** level in cfg.attention_resolutions


def _unet_pairs(cfg: UNetConfig) -> Pairs:
    """CompVis numbers the blocks of each half consecutively (`input_blocks.N`, `output_blocks.N`);
    diffusers groups them per resolution level (`down_blocks.level.resnets.j`)."""
    levels, n = len(cfg.channel_mult), cfg.num_res_blocks
    yield "time_embedding.linear_1", "time_embed.0"
    yield "time_embedding.linear_2", "time_embed.2"
    yield "conv_in", "input_blocks.0.0"

    # Down: each level is n x (resnet [+ transformer]) then a downsampler (not on the last level).
    # input_blocks.0 is conv_in, so level `l`, resnet `j` is input_blocks.{1 + l*(n+1) + j}.
    for level in range(levels):
        for j in range(n):
            block = 1 + level * (n + 1) + j
            yield from _unet_resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{block}.0")
            if _has_attention(cfg, level):
                yield from _unet_transformer(f"down_blocks.{level}.attentions.{j}",
                                             f"input_blocks.{block}.1", cfg.transformer_depth)
        if level < levels - 1:
            yield f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{(level + 1) * (n + 1)}.0.op"

    yield from _unet_resnet("mid_block.resnets.0", "middle_block.0")
    yield from _unet_transformer("mid_block.attentions.0", "middle_block.1", cfg.transformer_depth)
    yield from _unet_resnet("mid_block.resnets.1", "middle_block.2")

    # Up: up_blocks.u works at level L-1-u and has n+1 resnets (one per skip connection).
    # The upsampler lives inside the last output block of the level, after the transformer if any.
    for u in range(levels):
        level = levels - 1 - u
        attention = _has_attention(cfg, level)
        for j in range(n + 1):
            block = u * (n + 1) + j
            yield from _unet_resnet(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{block}.0")
            if attention:
                yield from _unet_transformer(f"up_blocks.{u}.attentions.{j}",
                                             f"output_blocks.{block}.1", cfg.transformer_depth)
        if level > 0:
            slot = 2 if attention else 1
            yield f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{u * (n + 1) + n}.{slot}.conv"

    yield "conv_norm_out", "out.0"
    yield "conv_out", "out.2"


def _vae_resnet(d: str, c: str) -> Pairs:
    """diffusers ResnetBlock2D <-> CompVis taming ResnetBlock: only the shortcut is renamed."""
    yield from _same(d, c, ("norm1", "conv1", "norm2", "conv2"))
    yield f"{d}.conv_shortcut", f"{c}.nin_shortcut"


_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
# diffusers < 0.14 (which wrote the SD 1.x hub VAE files) named the projections differently.
_VAE_ATTENTION_LEGACY = (("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out"))


def _vae_attention(d: str, c: str, names=_VAE_ATTENTION) -> Pairs:
    for name_d, name_c in names:
        yield f"{d}.{name_d}", f"{c}.{name_c}"


def _vae_mid(coder: str) -> Pairs:
    yield from _vae_resnet(f"{coder}.mid_block.resnets.0", f"{coder}.mid.block_1")
    yield from _vae_attention(f"{coder}.mid_block.attentions.0", f"{coder}.mid.attn_1")
    yield from _vae_resnet(f"{coder}.mid_block.resnets.1", f"{coder}.mid.block_2")


def _vae_pairs(cfg: VAEConfig) -> Pairs:
    levels, n = len(cfg.ch_mult), cfg.num_res_blocks
    for coder in ("encoder", "decoder"):
        yield from _same(coder, coder, ("conv_in", "conv_out"))
        yield f"{coder}.conv_norm_out", f"{coder}.norm_out"
        yield from _vae_mid(coder)
    for level in range(levels):
        for j in range(n):
            yield from _vae_resnet(f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}")
        if level < levels - 1:
            yield f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv"
    # The decoder's `up` ModuleList is indexed by level (CompVis builds it reversed and prepends),
    # while diffusers' up_blocks are in execution order: up_blocks.u is decoder.up.{L-1-u}.
    for u in range(levels):
        level = levels - 1 - u
        for j in range(n + 1):
            yield from _vae_resnet(f"decoder.up_blocks.{u}.resnets.{j}", f"decoder.up.{level}.block.{j}")
        if level > 0:
            yield f"decoder.up_blocks.{u}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv"
    yield "quant_conv", "quant_conv"
    yield "post_quant_conv", "post_quant_conv"


def _vae_legacy_pairs() -> Pairs:
    for coder in ("encoder", "decoder"):
        yield from _vae_attention(f"{coder}.mid_block.attentions.0", f"{coder}.mid.attn_1", _VAE_ATTENTION_LEGACY)


_PARAMS = ("weight", "bias")


def _key_table(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    table = {}
    for module_from, module_to in pairs:
        for p in _PARAMS:
            table[f"{module_from}.{p}"] = f"{module_to}.{p}"
    return table


def _apply(sd: dict, table: dict, what: str, reshape=None) -> dict:
    out, unknown, duplicate = {}, [], []
    for key, tensor in sd.items():
        new = table.get(key)
        if new is None:
            unknown.append(key)
        elif new in out:
            duplicate.append(key)
        else:
            out[new] = reshape(new, tensor) if reshape else tensor
    if unknown:
        raise ConversionError(f"unmapped {what} keys", unknown)
    if duplicate:
        raise ConversionError(f"{what} keys that map onto an already converted key", duplicate)
    return out


def _swap(pairs: Iterable[tuple[str, str]]) -> Pairs:
    return ((c, d) for d, c in pairs)


# ------------------------------------------------------------------------------- U-Net

def unet_diffusers_to_compvis(sd: dict[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """`UNet2DConditionModel` keys -> CompVis `UNetModel` keys (both without prefix)."""
    return _apply(sd, _key_table(_unet_pairs(cfg)), "diffusers U-Net")


def unet_compvis_to_diffusers(sd: dict[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """CompVis `UNetModel` keys (without `model.diffusion_model.`) -> `UNet2DConditionModel` keys."""
    return _apply(sd, _key_table(_swap(_unet_pairs(cfg))), "CompVis U-Net")


# ------------------------------------------------------------------------------- VAE

# The mid-block attention projections: 1x1 convs [C, C, 1, 1] in CompVis, Linear [C, C] in diffusers.
# A 1x1 convolution is the same C -> C linear map at every pixel: the numbers are the same, only
# the weight's two trailing 1s differ.
_COMPVIS_CONV1X1 = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
_DIFFUSERS_LINEAR = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")


def _to_conv1x1(compvis_key: str, t: Tensor) -> Tensor:
    if _COMPVIS_CONV1X1.fullmatch(compvis_key) and t.dim() == 2:
        return t.reshape(t.shape[0], t.shape[1], 1, 1)
    return t


def _to_linear(diffusers_key: str, t: Tensor) -> Tensor:
    if _DIFFUSERS_LINEAR.fullmatch(diffusers_key) and t.dim() == 4:
        return t.reshape(t.shape[0], t.shape[1])
    return t


def vae_diffusers_to_compvis(sd: dict[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """`AutoencoderKL` keys (current `to_q` or legacy `query` attention names) -> CompVis keys."""
    table = _key_table(_vae_pairs(cfg))
    table.update(_key_table(_vae_legacy_pairs()))
    return _apply(sd, table, "diffusers VAE", _to_conv1x1)


def vae_compvis_to_diffusers(sd: dict[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """CompVis `AutoencoderKL` keys (without `first_stage_model.`) -> current diffusers names."""
    return _apply(sd, _key_table(_swap(_vae_pairs(cfg))), "CompVis VAE", _to_linear)


# ------------------------------------------------------------------------------- text encoder

# transformers' CLIPTextTransformer, relative to `text_model.` (the same in both layouts).
_TEXT_KEY = re.compile(
    r"embeddings\.(token_embedding|position_embedding)\.weight"
    r"|embeddings\.position_ids"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias)")


def _text_table(keys: Iterable[str]) -> dict[str, str]:
    """Maps keys with or without `text_model.` (transformers 5 saves without) to the bare key."""
    table = {}
    for key in keys:
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        if _TEXT_KEY.fullmatch(bare):
            table[key] = bare
    return table


def text_diffusers_to_compvis(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """`CLIPTextModel` keys -> keys relative to `cond_stage_model.transformer.text_model.`.

    Accepts `text_model.embeddings...` (transformers 4) and `embeddings...` (transformers 5);
    `embeddings.position_ids` is kept if present (older files store it)."""
    return _apply(sd, _text_table(sd), "diffusers text encoder")


def text_compvis_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys relative to `...text_model.` -> `text_model.`-prefixed keys as in transformers 4 files."""
    table = {key: "text_model." + key for key in sd if _TEXT_KEY.fullmatch(key)}
    return _apply(sd, table, "CompVis text encoder")


def compvis_text_level(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A single file's text keys with the `text_model.` level, as the CompVis layout has them.

    Some community single files (merges descended from the NovelAI checkpoint) store
    `cond_stage_model.transformer.embeddings...` and `...transformer.encoder...`, without it;
    every other key is returned unchanged."""
    root = PREFIX_TEXT[: -len("text_model.")]               # cond_stage_model.transformer.
    out = {}
    for key, tensor in sd.items():
        bare = key[len(root):] if key.startswith(root) else None
        out[PREFIX_TEXT + bare if bare is not None and _TEXT_KEY.fullmatch(bare) else key] = tensor
    return out


# ------------------------------------------------------------------------------- whole model

def diffusers_to_compvis(unet: dict[str, Tensor], vae: dict[str, Tensor], text: dict[str, Tensor],
                         cfg: ModelConfig) -> dict[str, Tensor]:
    """The three diffusers-folder state dicts -> one flat CompVis state dict (with prefixes)."""
    out = {}
    for prefix, part in ((PREFIX_UNET, unet_diffusers_to_compvis(unet, cfg.unet)),
                         (PREFIX_VAE, vae_diffusers_to_compvis(vae, cfg.vae)),
                         (PREFIX_TEXT, text_diffusers_to_compvis(text))):
        out.update({prefix + k: v for k, v in part.items()})
    return out


def compvis_to_diffusers(sd: dict[str, Tensor], cfg: ModelConfig):
    """A flat CompVis state dict -> (unet, vae, text_encoder) state dicts in diffusers layout.

    Schedule buffers, `logvar` and `model_ema.*` are dropped (see COMPVIS_IGNORED_KEYS); text keys
    saved without the `text_model.` level are accepted."""
    unet, vae, text, unknown = {}, {}, {}, []
    text_root = "cond_stage_model.transformer."
    for key, tensor in sd.items():
        if key.startswith(PREFIX_UNET):
            unet[key[len(PREFIX_UNET):]] = tensor
        elif key.startswith(PREFIX_VAE):
            vae[key[len(PREFIX_VAE):]] = tensor
        elif key.startswith(text_root):
            text[key[len(text_root):]] = tensor
        elif not (key in COMPVIS_IGNORED_KEYS or key.startswith(COMPVIS_IGNORED_PREFIXES)):
            unknown.append(key)
    if unknown:
        raise ConversionError("CompVis keys outside model.diffusion_model / first_stage_model / "
                              "cond_stage_model.transformer", unknown)
    text = text_diffusers_to_compvis(text)  # normalises away an optional `text_model.` level
    return (unet_compvis_to_diffusers(unet, cfg.unet), vae_compvis_to_diffusers(vae, cfg.vae),
            text_compvis_to_diffusers(text))


# --------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------

# diffusers' defaults for the fields read below (used when a config.json omits them).
_UNET_DEFAULTS = dict(in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                      cross_attention_dim=1280, attention_head_dim=8, transformer_layers_per_block=1,
                      block_out_channels=[320, 640, 1280, 1280],
                      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)

# Fields for which the CompVis v1 U-Net has exactly one behaviour, with the value meaning it.
_UNET_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": 1e-5,
    "use_linear_projection": False, "dual_cross_attention": False, "num_attention_heads": None,
    "class_embed_type": None, "num_class_embeds": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}

_VAE_DEFAULTS = dict(in_channels=3, out_channels=3, layers_per_block=1, latent_channels=4,
                     norm_num_groups=32, scaling_factor=0.18215, block_out_channels=[64],
                     down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"])
_VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
              "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}

# transformers' CLIPTextConfig defaults.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, layer_norm_eps=1e-5,
                      hidden_act="quick_gelu")


def _varies(value) -> bool:
    return isinstance(value, (list, tuple)) and any(v != value[0] for v in value)


def _uniform(value, what: str, hint: str = ""):
    """A per-level list with one repeated value is that value; anything else is not SD v1."""
    if isinstance(value, (list, tuple)):
        if not value or _varies(value):
            raise ValueError(f"{what}={list(value)} varies per level; the SD v1 U-Net uses one value"
                             + (f" ({hint})" if hint else ""))
        return value[0]
    return value


def _check_fixed(cfg: dict, fixed: dict, what: str):
    for name, expected in fixed.items():
        if name in cfg and _uniform(cfg[name], f"{what} {name}") != expected:
            raise ValueError(f"{what} config {name}={cfg[name]!r} is not supported: "
                             f"the Stable Diffusion v1 architecture has {name}={expected!r}")


def _check_class(cfg: dict, expected: str, what: str):
    name = cfg.get("_class_name", expected)
    if name != expected:
        raise ValueError(f"{what} config is for {name!r}, expected {expected!r}")


def _channel_mult(channels, what: str) -> tuple:
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"{what} block_out_channels {list(channels)} are not multiples of {base}")
    return tuple(c // base for c in channels)


def _detect_other_families(c: dict):
    """Clear messages for the usual suspects before the generic field checks."""
    sdxl = {"addition_embed_type": c.get("addition_embed_type") is not None,
            "cross_attention_dim": c.get("cross_attention_dim") == 2048,
            "transformer_layers_per_block": _varies(c.get("transformer_layers_per_block"))}
    sd2 = {"use_linear_projection": bool(c.get("use_linear_projection")),
           "cross_attention_dim": c.get("cross_attention_dim") == 1024,
           "attention_head_dim": _varies(c.get("attention_head_dim"))}
    for hint, signs in ((_SDXL_HINT, sdxl), (_SD2_HINT, sd2)):
        found = ", ".join(f"{name}={c[name]!r}" for name, hit in signs.items() if hit)
        if found:
            raise ValueError(f"unet config {hint} ({found}); only Stable Diffusion v1 is supported")


def _read_unet(d: dict) -> UNetConfig:
    c = {**_UNET_DEFAULTS, **d}
    _check_class(c, "UNet2DConditionModel", "unet")
    _detect_other_families(c)
    _check_fixed(c, _UNET_FIXED, "unet")
    down, up, channels = list(c["down_block_types"]), list(c["up_block_types"]), list(c["block_out_channels"])
    if len(down) != len(channels) or len(up) != len(channels):
        raise ValueError(f"unet config has {len(channels)} block_out_channels but "
                         f"{len(down)} down / {len(up)} up block types")
    for t in down:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise ValueError(f"unet down block type {t!r} is not supported by the SD v1 U-Net")
    # CompVis uses one attention_resolutions list for both halves, so up must mirror down.
    mirrored = ["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in reversed(down)]
    if up != mirrored:
        raise ValueError(f"unet up_block_types {up} do not mirror down_block_types {down} "
                         f"(expected {mirrored})")
    attention = tuple(sorted((2 ** i for i, t in enumerate(down) if t.startswith("CrossAttn")), reverse=True))
    return UNetConfig(
        in_channels=c["in_channels"], out_channels=c["out_channels"],
        model_channels=channels[0], channel_mult=_channel_mult(channels, "unet"),
        num_res_blocks=_uniform(c["layers_per_block"], "unet layers_per_block"),
        attention_resolutions=attention,  # largest first, as in v1-inference.yaml
        # diffusers' historical misnomer: for SD v1 `attention_head_dim` is the number of heads.
        num_heads=_uniform(c["attention_head_dim"], "unet attention_head_dim", _SD2_HINT),
        context_dim=_uniform(c["cross_attention_dim"], "unet cross_attention_dim"),
        transformer_depth=_uniform(c["transformer_layers_per_block"], "unet transformer_layers_per_block", _SDXL_HINT),
        norm_groups=c["norm_num_groups"],
    )


def _read_vae(d: dict) -> VAEConfig:
    c = {**_VAE_DEFAULTS, **d}
    _check_class(c, "AutoencoderKL", "vae")
    _check_fixed(c, _VAE_FIXED, "vae")
    channels = list(c["block_out_channels"])
    if list(c["down_block_types"]) != ["DownEncoderBlock2D"] * len(channels) \
            or list(c["up_block_types"]) != ["UpDecoderBlock2D"] * len(channels):
        raise ValueError(f"vae block types {c['down_block_types']} / {c['up_block_types']} are not "
                         f"{len(channels)} x DownEncoderBlock2D / UpDecoderBlock2D")
    return VAEConfig(
        in_channels=c["in_channels"], out_ch=c["out_channels"], ch=channels[0],
        ch_mult=_channel_mult(channels, "vae"), num_res_blocks=c["layers_per_block"],
        z_channels=c["latent_channels"], embed_dim=c["latent_channels"],
        norm_groups=c["norm_num_groups"],
        scale_factor=c["scaling_factor"] if c["scaling_factor"] is not None else 0.18215,
    )


def _read_text(d: dict) -> CLIPTextConfig:
    d = d.get("text_config", d)  # a full CLIPConfig nests the text tower's settings
    c = {**_TEXT_DEFAULTS, **d}
    if c["hidden_size"] == 1024:
        raise ValueError(f"text encoder config {_SD2_HINT} (OpenCLIP ViT-H text tower, hidden_size 1024); "
                         f"SD v1 uses CLIP ViT-L/14 (768)")
    if c["hidden_act"] != "quick_gelu":
        raise ValueError(f"text encoder hidden_act {c['hidden_act']!r} is not supported: "
                         f"CLIP ViT-L/14 uses 'quick_gelu'")
    return CLIPTextConfig(**{name: c[name] for name in CLIPTextConfig.__dataclass_fields__})


def read_scheduler_config(d: dict) -> ScheduleConfig:
    """diffusers `scheduler/scheduler_config.json` -> ScheduleConfig (the training noise schedule)."""
    if d.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"scheduler beta_schedule {d['beta_schedule']!r} is not SD v1's 'scaled_linear'")
    if d.get("trained_betas") is not None:
        raise ValueError("scheduler trained_betas are given: SD v1's noise schedule is 'scaled_linear', "
                         "from beta_start and beta_end")
    if d.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"scheduler prediction_type {d['prediction_type']!r} {_SD2_HINT} (v-prediction); "
                         f"SD v1 predicts epsilon")
    default = ScheduleConfig()
    return ScheduleConfig(num_timesteps=d.get("num_train_timesteps", default.num_timesteps),
                          linear_start=d.get("beta_start", default.linear_start),
                          linear_end=d.get("beta_end", default.linear_end))


def write_scheduler_config(schedule: ScheduleConfig) -> dict:
    """ScheduleConfig -> the PNDM `scheduler_config.json` of the SD v1.5 folder."""
    return {"_class_name": "PNDMScheduler", "beta_start": schedule.linear_start,
            "beta_end": schedule.linear_end, "beta_schedule": "scaled_linear",
            "num_train_timesteps": schedule.num_timesteps, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
            "prediction_type": "epsilon", "timestep_spacing": "leading", "trained_betas": None}


def write_pipeline_files(tokenizer, added_words: Optional[dict] = None) -> dict[str, str]:
    """What makes a diffusers folder open as `StableDiffusionPipeline.from_pretrained(folder)`,
    besides the three models: {path in the folder: text}. The tokenizer files are CLIP's BPE in
    transformers' form (`vocab.json`: token -> id; `merges.txt`: the merges in rank order), and
    `added_tokens.json` ({word: id}) for words whose rows a training run added to the token
    table; SD v1 pads with the end token. The safety checker and its feature extractor are left
    out (null)."""
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    end = "<|endoftext|>"
    special = {"bos_token": "<|startoftext|>", "eos_token": end, "unk_token": end, "pad_token": end}
    files = {
        "model_index.json": {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                             "feature_extractor": [None, None], "safety_checker": [None, None],
                             "requires_safety_checker": False, "image_encoder": [None, None],
                             "scheduler": ["diffusers", "PNDMScheduler"],
                             "text_encoder": ["transformers", "CLIPTextModel"],
                             "tokenizer": ["transformers", "CLIPTokenizer"],
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
        "tokenizer/tokenizer_config.json": {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                            "do_lower_case": True, "errors": "replace",
                                            "add_prefix_space": False, **special},
        "tokenizer/special_tokens_map.json": special,
        "tokenizer/vocab.json": tokenizer.encoder,
        **({"tokenizer/added_tokens.json": added_words} if added_words else {}),
    }
    out = {name: json.dumps(value, indent=2, ensure_ascii=False) for name, value in files.items()}
    out["tokenizer/merges.txt"] = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return out


def read_diffusers_configs(unet_cfg: dict, vae_cfg: dict, text_cfg: dict,
                           scheduler_cfg: dict | None = None) -> ModelConfig:
    """`unet/config.json`, `vae/config.json`, `text_encoder/config.json` (and optionally
    `scheduler/scheduler_config.json`) -> ModelConfig. Raises ValueError for anything the
    SD v1 architecture cannot represent (SD 2.x, SDXL, LCM/class-conditioned U-Nets, ...)."""
    schedule = read_scheduler_config(scheduler_cfg) if scheduler_cfg is not None else ScheduleConfig()
    vae = _read_vae(vae_cfg)
    latent_size = unet_cfg.get("sample_size", 64)  # the U-Net's trained size in latents: 64 for SD v1's 512 px
    if isinstance(latent_size, (list, tuple)):       # (height, width) in some configs
        latent_size = latent_size[0]
    return ModelConfig(unet=_read_unet(unet_cfg), vae=vae, text=_read_text(text_cfg), schedule=schedule,
                       image_size=int(latent_size) * vae.downsample_factor)


def _write_unet(cfg: UNetConfig, latent_size: int) -> dict:
    levels = len(cfg.channel_mult)
    bad = [r for r in cfg.attention_resolutions if r not in {2 ** i for i in range(levels)}]
    if bad:
        raise ValueError(f"attention_resolutions {bad} are not downsample rates of a {levels}-level U-Net")
    cross = [_has_attention(cfg, level) for level in range(levels)]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": latent_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cross],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cross)],
        "only_cross_attention": False,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": cfg.num_heads,  # number of heads, see _read_unet
        "use_linear_projection": False,
        "upcast_attention": False,
        "transformer_layers_per_block": cfg.transformer_depth,
    }


def _write_vae(cfg: VAEConfig, image_size: int) -> dict:
    if cfg.embed_dim != cfg.z_channels:
        raise ValueError(f"vae embed_dim {cfg.embed_dim} != z_channels {cfg.z_channels}: diffusers' "
                         f"AutoencoderKL has a single latent_channels")
    levels = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": image_size,
        "scaling_factor": cfg.scale_factor,
    }


def _write_text(cfg: CLIPTextConfig) -> dict:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "projection_dim": 768,
        # The CLIP tokenizer's real ids (the SD 1.5 hub file still says the legacy 0/2); pad_token_id
        # keeps the hub file's 1, which CLIPTextModel never reads (SD pads with 49407).
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def write_diffusers_configs(cfg: ModelConfig) -> tuple[dict, dict, dict]:
    """ModelConfig -> (unet, vae, text_encoder) `config.json` dicts; `read_diffusers_configs` inverts it.
    The U-Net's `sample_size` (in latents) carries the model's image size, as diffusers reads it."""
    latent_size = cfg.image_size // cfg.vae.downsample_factor
    return _write_unet(cfg.unet, latent_size), _write_vae(cfg.vae, cfg.image_size), _write_text(cfg.text)
