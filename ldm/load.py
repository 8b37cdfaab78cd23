"""Loading and saving Stable Diffusion v1 weights: one entry point for both public layouts.

    load("v1-5-pruned-emaonly.safetensors")   # CompVis single file (.safetensors, .ckpt)
    load("stable-diffusion-v1-5/")            # diffusers folder (unet/, vae/, text_encoder/)

Our modules are named after the CompVis keys, so a single file loads by a walk
over its keys; the diffusers layout is renamed in `ldm/convert.py`. Loading is
strict: every expected tensor must be present with its exact shape. What real
files add or omit is tolerated: `model_ema.*`, `logvar`, the schedule buffers
and `position_ids` (rebuilt as arange(77), since some files store it as float).
A file that is not an SD v1 model gets one line saying what it looks like.

Pickled `.ckpt`/`.bin` files are read only with `torch.load(weights_only=True)` (ldm/files.py),
which refuses code execution. The model is built on the meta device and each
tensor is cast and assigned in turn, so the peak memory stays near one model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from clip.config import CLIPTextConfig
from ldm import convert
from ldm.config import ModelConfig
from ldm.files import (ADDED_TOKENS_METADATA_KEY, CONFIG_METADATA_KEY, LoadError, atomic_write, load_error_reason,
                       read_tensors)
from ldm.half_weights import STORAGE_DTYPE, half_weight_names, keep_weights_in_fp16
from ldm.model import StableDiffusion

CLIP_VOCAB_SIZE = CLIPTextConfig().vocab_size  # 49408 rows: CLIP's BPE vocabulary with its start and end tokens
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
POSITION_IDS = convert.PREFIX_TEXT + "embeddings.position_ids"
IGNORED_PREFIXES = ("model_ema.", "logvar", "lvlb_weights")  # training-time extras of real files

DIFFUSERS_WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}


# ----------------------------------------------------------------------------- telling files apart

EMBEDDING_HINT = "is a textual-inversion embedding, not a model; load it with sample.py --embedding"
# invert.py's checkpoint.pt, for --resume (Textual Inversion, NeTI and HiPer alike)
TRAINING_CHECKPOINT_KEYS = {"optimizer", "step", "config", "losses"}
TRAINING_CHECKPOINT_HINT = ("is invert.py's training checkpoint (for --resume); what it learned is in the "
                            "files beside it")


def describe_learned_file(keys, metadata: Dict[str, str]) -> Optional[str]:
    """What a learned file (invert.py's, or an AUTOMATIC1111 .pt embedding) is, and where it goes,
    or None if it is none of them. (The key names are inversion.neti.CONFIG_KEY and
    inversion.hiper.TAIL_KEY; ldm does not import inversion.)"""
    keys = set(keys)
    if TRAINING_CHECKPOINT_KEYS <= keys:
        return TRAINING_CHECKPOINT_HINT
    if "neti_config" in metadata:
        return "is a NeTI mapper, not a model; load it with sample.py --neti"
    if "hiper_tail" in keys:
        return "is a HiPer tail, not a model; load it with sample.py --hiper"
    if "layer_structure" in keys or "activation_func" in keys:
        return "is an AUTOMATIC1111 hypernetwork, not a model; this project does not load hypernetworks"
    if {"clip_l", "clip_g"} <= keys:
        return "is an SDXL embedding (clip_l and clip_g vectors); this project implements SD v1.x"
    if "string_to_param" in keys or "init_word" in metadata:  # AUTOMATIC1111 .pt (dictionaries, not tensors), ours
        return EMBEDDING_HINT
    return None


def describe_wrong_file(keys, shapes: Dict[str, tuple]) -> Optional[str]:
    """What a file that is not an SD v1 model looks like, or None if it might be one."""
    keys = list(keys)
    if not keys:
        return "is empty"
    if any("lora_" in k or "lora." in k or ".lora" in k for k in keys):
        return "is a LoRA (it has 'lora_' keys), not a full model; this project loads full SD v1.x checkpoints"
    if "string_to_param" in keys or "emb_params" in keys or (
            len(keys) <= 8 and not any("." in k for k in keys)
            and all(len(shapes[k]) <= 2 and tuple(shapes[k])[-1:] in ((768,), (1024,), (1280,)) for k in keys)):
        return EMBEDDING_HINT
    if any(k.startswith("conditioner.embedders") for k in keys) or "model.diffusion_model.label_emb.0.0.weight" in keys:
        return "is an SDXL model; this project implements SD v1.x (context width 768, one text encoder)"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "is an SD 2.x model (OpenCLIP text encoder, context width 1024); this project implements SD v1.x"
    to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if to_k in shapes and shapes[to_k][1] == 1024:
        return "is an SD 2.x model (cross-attention context width 1024); this project implements SD v1.x"
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    if conv_in in shapes and shapes[conv_in][1] == 9:
        return "is an inpainting model (9 input channels); this project implements text-to-image SD v1.x"
    if any(k.startswith(("down_blocks.", "mid_block.", "text_model.")) for k in keys):
        return ("holds one component in the diffusers layout; pass the folder that contains "
                "unet/, vae/ and text_encoder/ instead")
    vae_parts = ("encoder.", "decoder.", "quant_conv", "post_quant_conv")
    weights = [k for k in keys if not k.startswith((*IGNORED_PREFIXES, "loss."))]  # training extras aside
    if weights and all(k.removeprefix(convert.PREFIX_VAE).startswith(vae_parts) for k in weights):
        return "is a VAE on its own, not a full model"
    if not any(k.startswith(convert.PREFIX_UNET) for k in keys):
        return "has no U-Net weights (no 'model.diffusion_model.' keys); it is not a Stable Diffusion checkpoint"
    return None


def _check(expected: Dict[str, tuple], found: Dict[str, tuple], where: str):
    """Strict key and shape comparison with a short, readable error."""
    missing = [k for k in expected if k not in found]
    if missing:
        hint = describe_wrong_file(found.keys(), found)
        if hint:
            raise LoadError(f"{where} {hint}")
        raise LoadError(f"{where} lacks {len(missing)} of the {len(expected)} expected tensors "
                        f"(first: {', '.join(missing[:3])}); it may be truncated or not an SD v1 model")
    wrong = [k for k in expected if tuple(found[k]) != tuple(expected[k])]
    if wrong:
        hint = describe_wrong_file(found.keys(), found)
        if hint:
            raise LoadError(f"{where} {hint}")
        k = wrong[0]
        if wrong == [TOKEN_TABLE] and found[k][1:] == expected[k][1:] and found[k][0] > expected[k][0]:
            extra = found[k][0] - expected[k][0]
            raise LoadError(f"{where} has a token table of {found[k][0]:,} rows, {extra} more than this model's: "
                            "words added by a training run, whose names a single file does not keep; use the "
                            "diffusers folder it came from (its tokenizer names them), or the learned embedding")
        raise LoadError(f"{where} has {len(wrong)} tensors of the wrong shape (e.g. {k}: "
                        f"{list(found[k])}, expected {list(expected[k])}); it is a model of another size")


# ----------------------------------------------------------------------------- loading

def ema_key(key: str) -> str:
    """The name of a U-Net weight's EMA copy in a full CompVis checkpoint: Lightning's EMA module
    drops the dots, `model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`."""
    return "model_ema." + key[len("model."):].replace(".", "")


def _take_ema(sd: Dict[str, torch.Tensor]) -> None:
    """Replace the U-Net weights by their EMA copies."""
    if not any(k.startswith("model_ema.") for k in sd):
        raise LoadError("asked for EMA weights but the file has no EMA copy (no model_ema.* keys): it is an emaonly "
                        "or pruned file, whose U-Net weights already are the EMA ones (leave out --ema)")
    for key in [k for k in sd if k.startswith(convert.PREFIX_UNET)]:
        ema = ema_key(key)
        if ema not in sd:
            raise LoadError(f"asked for EMA weights but the file's EMA copy lacks '{ema}' (the U-Net's {key}); "
                            "leave out --ema to use the U-Net weights as they are")
        sd[key] = sd[ema]


def _build(config: ModelConfig, sd: Dict[str, torch.Tensor], where: str, device, dtype,
           half_weights: bool = False) -> StableDiffusion:
    """The model of `config` with the weights `sd` (CompVis names): built on the meta device,
    every key and shape checked against the file's, then each tensor cast to `dtype` (fp16 for
    half weights) and assigned in turn, so the peak memory stays near one model. The schedule
    buffers and position_ids are computed, not read."""
    with torch.device("meta"):
        model = StableDiffusion(config)
    half = half_weight_names(model) if half_weights else set()  # read straight into float16
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = set(SCHEDULE_BUFFERS) | {POSITION_IDS}
    found = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    _check({k: v for k, v in expected.items() if k not in optional}, found, where)

    schedule = model.schedule  # computed on the CPU, even here: real numbers
    buffers = schedule.compvis_buffers()
    # bf16 weights lose the values the weights hash needs: it is taken from the file's, here
    file_weights_hash = None if dtype in HASHED_DTYPES else weights_hash({k: sd[k] for k in expected if k in sd})
    final = {}
    for key in expected:
        if key in buffers:
            final[key] = buffers[key].to(device)  # always recomputed in float32, whatever the file holds
        elif key == POSITION_IDS:
            final[key] = torch.arange(config.text.max_position_embeddings, device=device).unsqueeze(0)
        else:
            final[key] = sd.pop(key).to(device=device, dtype=STORAGE_DTYPE if key in half else dtype)
    model.load_state_dict(final, strict=True, assign=True)
    model.schedule = schedule.to(device)
    if file_weights_hash:
        model.file_weights_hash = file_weights_hash
    model.eval().requires_grad_(False)
    return keep_weights_in_fp16(model) if half_weights else model


def _load_single_file(path: Path, device, dtype, ema: bool, half_weights: bool = False) -> StableDiffusion:
    # a full checkpoint's EMA copy (as large as the U-Net) is read only when asked for
    sd, metadata = read_tensors(path, skip=() if ema else IGNORED_PREFIXES)
    learned = describe_learned_file(sd.keys(), metadata)
    if learned:
        raise LoadError(f"{path} {learned}")
    odd_key = next((k for k in sd if not isinstance(k, str)), None)
    if odd_key is not None:
        raise LoadError(f"{path} has a key {odd_key!r} ({type(odd_key).__name__}) that names no tensor; "
                        "it is not a model checkpoint")
    if sd and not any(torch.is_tensor(v) for v in sd.values()):
        raise LoadError(f"{path} holds no tensors (only {', '.join(sorted({type(v).__name__ for v in sd.values()}))}); "
                        "it is not a model checkpoint")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DataParallel-wrapped model
        sd = {k[len("module."):]: v for k, v in sd.items()}
    sd = convert.compvis_text_level({k: v for k, v in sd.items() if torch.is_tensor(v)})
    if CONFIG_METADATA_KEY in metadata:
        try:
            config = ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
            config.check()
        except (ValueError, TypeError, AttributeError) as e:  # bad JSON, fields of another version, sizes
            # no network can be built with
            raise LoadError(f"{path}: its '{CONFIG_METADATA_KEY}' metadata is not a configuration this version "
                            f"reads ({e})") from None
    else:
        hint = describe_wrong_file(sd.keys(), {k: tuple(v.shape) for k, v in sd.items()})
        if hint:
            raise LoadError(f"{path} {hint}")
        config = ModelConfig()  # the public SD v1.x files carry no configuration: they are all this size
    if ema:
        _take_ema(sd)
    model = _build(config, sd, str(path), device, dtype, half_weights)
    if config.text.vocab_size > CLIP_VOCAB_SIZE:  # a table grown by a training run
        try:
            named = json.loads(metadata.get(ADDED_TOKENS_METADATA_KEY, "{}"))
            pairs = list(named.items())
        except (ValueError, AttributeError) as e:  # not JSON, or not a JSON object
            raise LoadError(f"{path}: its '{ADDED_TOKENS_METADATA_KEY}' metadata is not {{word: id}} ({e})") from None
        added = _ids_to_words(pairs, f"{path}: its '{ADDED_TOKENS_METADATA_KEY}' metadata")
        _register_added_tokens(model, added, str(path))
    return model


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8, whatever the system's locale
    except FileNotFoundError:
        raise LoadError(f"{path.parent.parent}: a diffusers folder needs {path.parent.name}/{path.name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: is not valid JSON ({e})") from None


TOKEN_TABLE = convert.PREFIX_TEXT + "embeddings.token_embedding.weight"


def _added_tokens(tokenizer_folder: Path) -> Dict[int, str]:
    """{id: word} of the words a training run added to a diffusers pipeline's tokenizer (saved after
    Textual Inversion, with their rows in the text encoder's table), as the tokenizer files record
    them: tokenizer.json's added_tokens, added_tokens.json, or tokenizer_config.json's decoder."""
    found: Dict[int, str] = {}
    for name in ("tokenizer.json", "added_tokens.json", "tokenizer_config.json"):
        path = tokenizer_folder / name
        if not path.is_file():
            continue
        data = _read_json(path)
        try:  # (word, id) pairs
            if name == "tokenizer.json":
                pairs = [(t["content"], t["id"]) for t in data.get("added_tokens", [])]
            elif name == "added_tokens.json":
                pairs = list(data.items())
            else:
                pairs = [(t["content"], i) for i, t in data.get("added_tokens_decoder", {}).items()]
        except (AttributeError, TypeError, KeyError) as e:  # not the layout the tokenizer files have
            raise LoadError(f"{path}: its added tokens are not in the layout tokenizers write ({e!r})") from None
        found.update(_ids_to_words(pairs, str(path)))
    return found


def _ids_to_words(pairs, where: str) -> Dict[int, str]:
    """(word, id) pairs, as tokenizer files and our single files record added words -> {id: word}."""
    try:
        return {int(i): str(word) for word, i in pairs}
    except (ValueError, TypeError) as e:
        raise LoadError(f"{where} is not {{word: id}} with integer ids ({e})") from None


def _register_added_tokens(model: StableDiffusion, added: Dict[int, str], where: str) -> None:
    """Give the words a training run added ({id: word}, ids past the BPE vocabulary, rows of the
    text encoder's own table) to our tokenizer, in the same order, so that they get the same ids."""
    tokenizer = model.tokenizer
    base = len(tokenizer.encoder)          # 49408: the BPE vocabulary and its two special tokens
    rows = model.config.text.vocab_size
    added = {i: w for i, w in added.items() if base <= i < rows}
    if not added:
        raise LoadError(f"{where}: its token table has {rows - base} rows past CLIP's vocabulary (words added by "
                        "a training run) and nothing names them; load the file that names them, or the learned "
                        "embedding")
    if sorted(added) != list(range(base, base + len(added))):
        raise LoadError(f"{where}: its tokenizer's added words have ids {sorted(added)}; expected "
                        f"{base}, {base + 1}, ... in order")
    for i in sorted(added):
        tokenizer.add_token(added[i])


def _index_name(name: str) -> str:
    """The index of a sharded save of `name`: "model.fp16.safetensors" -> "model.safetensors.index.fp16.json"
    (the names diffusers and transformers give them)."""
    base, *variant, ext = name.split(".")
    return ".".join([base, ext, "index", *variant, "json"])


def diffusers_weights_file(folder: Path, part: str) -> Optional[Path]:
    """The file `load` reads for one part ('unet', 'vae', 'text_encoder') of a diffusers folder:
    the first of DIFFUSERS_WEIGHTS[part] there, each name before the index of its shards (a
    .json); None if there is none."""
    names = [n for name in DIFFUSERS_WEIGHTS[part] for n in (name, _index_name(name))]
    return next((folder / part / n for n in names if (folder / part / n).exists()), None)


def _weight_map(index: Path) -> Dict[str, str]:
    """A sharded save's index: each tensor's name -> the file beside the index that holds it
    (`{"weight_map": {name: "model-00001-of-00002.safetensors", ...}}`)."""
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoadError(f"{index}: has no 'weight_map'; a sharded save's index names the file of every tensor")
    for shard in set(map(str, weight_map.values())):
        if Path(shard).name != shard or not (index.parent / shard).is_file():
            raise LoadError(f"{index}: names the shard '{shard}', which is not a file beside it; download it again")
    return {name: str(shard) for name, shard in weight_map.items()}


def shard_files(index: Path) -> List[Path]:
    """The shards an index names, in order."""
    return [index.parent / shard for shard in sorted(set(_weight_map(index).values()))]


def _read_sharded(index: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a sharded save, from the shards its index names."""
    weight_map = _weight_map(index)
    tensors: Dict[str, torch.Tensor] = {}
    for path in shard_files(index):
        tensors.update(read_tensors(path)[0])
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise LoadError(f"{index}: its shards lack {len(missing)} of the tensors it lists (first: {missing[0]}); "
                        "download them again")
    return tensors


def _load_diffusers_folder(folder: Path, device, dtype, half_weights: bool = False) -> StableDiffusion:
    parts = {}
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part).is_dir():
            raise LoadError(f"{folder}: a diffusers folder needs the subfolders unet/, vae/ and text_encoder/ "
                            f"('{part}/' is missing)")
        parts[part] = _read_json(folder / part / "config.json")
    scheduler = folder / "scheduler" / "scheduler_config.json"   # the noise schedule, if the folder has one
    try:
        config = convert.read_diffusers_configs(parts["unet"], parts["vae"], parts["text_encoder"],
                                                _read_json(scheduler) if scheduler.exists() else None)
    except ValueError as e:  # an architecture SD v1 is not
        raise LoadError(f"{folder}: {e}") from None
    except (TypeError, AttributeError, KeyError) as e:  # a config.json that is not an object of settings
        raise LoadError(f"{folder}: a config.json is not a diffusers configuration ({load_error_reason(e)})") from None
    try:
        config.check()
    except ValueError as e:
        raise LoadError(f"{folder}: its configuration is invalid ({e})") from None
    sd: Dict[str, torch.Tensor] = {}
    to_compvis = {"unet": (lambda s: convert.unet_diffusers_to_compvis(s, config.unet), convert.PREFIX_UNET),
                  "vae": (lambda s: convert.vae_diffusers_to_compvis(s, config.vae), convert.PREFIX_VAE),
                  "text_encoder": (convert.text_diffusers_to_compvis, convert.PREFIX_TEXT)}
    for part, (rename, prefix) in to_compvis.items():
        weights = diffusers_weights_file(folder, part)
        if weights is None:
            raise LoadError(f"{folder}: {part}/ has no weights (expected one of {', '.join(DIFFUSERS_WEIGHTS[part])}, "
                            "or a sharded one's .index.json)")
        tensors = _read_sharded(weights) if weights.name.endswith(".json") else read_tensors(weights)[0]
        try:
            renamed = rename(tensors)
        except convert.ConversionError as e:
            raise LoadError(f"{weights}: {e.args[0] if e.args else e}") from None
        sd.update({prefix + k: v for k, v in renamed.items()})
    model = _build(config, sd, str(folder), device, dtype, half_weights)
    if config.text.vocab_size > CLIP_VOCAB_SIZE:  # a table grown by a training run
        _register_added_tokens(model, _added_tokens(folder / "tokenizer"), str(folder))
    return model


def load(path, device="cpu", dtype=torch.float32, ema: bool = False, half_weights: bool = False) -> StableDiffusion:
    """Load an SD v1.x model from a CompVis single file or a diffusers folder.

    `dtype` is the dtype of the weights in memory (fp16 files load as fp32 and back);
    `ema=True` takes the EMA copy of the U-Net from a full (non-"emaonly") checkpoint;
    `half_weights=True` keeps the linear, convolution and embedding weights in float16 for
    float32 arithmetic (ldm/half_weights.py: half the memory), and needs dtype float32."""
    if half_weights and dtype != torch.float32:
        raise ValueError(f"half_weights computes in float32; dtype is {dtype}")
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file or folder")
    if not path.is_file() and not path.is_dir():  # a pipe would block the read until it is written to
        raise LoadError(f"{path}: is not a regular file or a folder")
    device = torch.device(device)
    if path.is_dir():
        if ema:
            raise LoadError(f"{path}: a diffusers folder holds one U-Net and no separate EMA copy; EMA weights "
                            "come from a full CompVis file (leave out --ema)")
        return _load_diffusers_folder(path, device, dtype, half_weights)
    return _load_single_file(path, device, dtype, ema, half_weights)


# ----------------------------------------------------------------------------- saving


HASHED_DTYPES = (torch.float32, torch.float16)  # weights that still hold the values weights_hash rounds to fp16


def weights_hash(tensors: Dict[str, torch.Tensor]) -> str:
    """The hash of a model's weights rather than of its file: sha256 over the U-Net's and the
    text encoder's tensors by their CompVis names, each rounded to fp16 (16 hex digits).

    The same model saved another way (a diffusers folder, a .ckpt and its .safetensors, the fp16
    file of an fp32 one) has another file hash but this same weights hash: every layout loads
    under the CompVis names, and rounding fp32 to fp16 gives what the fp16 file holds. The VAE is
    left out, since a learned word or tail acts through the text encoder and the U-Net (a swapped
    VAE keeps it)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key]
        if key.startswith((convert.PREFIX_UNET, convert.PREFIX_TEXT)) and key != POSITION_IDS:
            h.update(f"{key} {tuple(tensor.shape)}\n".encode())
            h.update(tensor.detach().to("cpu", torch.float16).contiguous().numpy())
    return h.hexdigest()[:16]


def model_weights_hash(model: StableDiffusion) -> Optional[str]:
    """`weights_hash` of a model: of its weights when they are fp32 or fp16; for bfloat16 ones,
    which no longer hold the file's values, the one `load` took from the file on the way."""
    if model.dtype in HASHED_DTYPES:
        return weights_hash(model.state_dict())
    return getattr(model, "file_weights_hash", None)


def _cast(sd: Dict[str, torch.Tensor], dtype) -> Dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and k not in SCHEDULE_BUFFERS else v)
            .detach().cpu().contiguous() for k, v in sd.items()}


def _added_words(model: StableDiffusion) -> Dict[str, int]:
    """{word: id} of the words whose rows a training run added to the token table ({} for SD's own
    table), saved with the model so that a reload gives each row its word again."""
    rows = model.config.text.vocab_size
    if rows <= CLIP_VOCAB_SIZE:
        return {}
    return {word: i for word, i in model.tokenizer.added_tokens.items() if i < rows}


def save(model: StableDiffusion, path, dtype: Optional[torch.dtype] = None,
         metadata: Optional[Dict[str, str]] = None) -> Path:
    """Save in the layout the path names: `x.safetensors` or `x.ckpt` (CompVis single file,
    configuration in the metadata), or a folder (the diffusers layout: a folder that
    `StableDiffusionPipeline.from_pretrained` opens, with the scheduler and tokenizer files)."""
    path = Path(path)
    sd = _cast(model.state_dict(), dtype)
    added = _added_words(model)
    described = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict()),
                 **({ADDED_TOKENS_METADATA_KEY: json.dumps(added, ensure_ascii=False)} if added else {})}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        meta = {**described, **(metadata or {})}
        atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    elif path.suffix in (".ckpt", ".pt"):
        atomic_write(path, lambda tmp: torch.save({"state_dict": sd, **described}, tmp))
    elif path.suffix == "":
        _save_diffusers_folder(model, sd, path)
    else:  # "sd-v1.5" too: a folder's name has no suffix here, so that "x.safetensor" is not taken for one
        raise LoadError(f"{path}: cannot save as '{path.suffix}'; use .safetensors, .ckpt or a folder name "
                        "without a dot")
    return path


def _save_diffusers_folder(model: StableDiffusion, sd: Dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file
    cfg = model.config
    unet_json, vae_json, text_json = convert.write_diffusers_configs(cfg)
    take = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    parts = {
        "unet": (convert.unet_compvis_to_diffusers(take(convert.PREFIX_UNET), cfg.unet), unet_json,
                 "diffusion_pytorch_model.safetensors"),
        "vae": (convert.vae_compvis_to_diffusers(take(convert.PREFIX_VAE), cfg.vae), vae_json,
                "diffusion_pytorch_model.safetensors"),
        "text_encoder": (convert.text_compvis_to_diffusers(take(convert.PREFIX_TEXT)), text_json,
                         "model.safetensors"),
    }
    write_text = lambda path, text: atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    for part, (tensors, config_json, filename) in parts.items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        atomic_write(folder / part / filename, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        write_text(folder / part / "config.json", json.dumps(config_json, indent=2))
    write_text(folder / "scheduler" / "scheduler_config.json",
               json.dumps(convert.write_scheduler_config(cfg.schedule), indent=2))
    for name, text in convert.write_pipeline_files(model.tokenizer, _added_words(model)).items():
        write_text(folder / name, text)
