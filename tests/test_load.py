"""Loading and saving: both public layouts, the quirks real files have, and clear errors."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, tiny_config, randomize
import ldm
from ldm import convert
from ldm.files import LoadError
from ldm.load import describe_wrong_file
from ldm.model import StableDiffusion


@pytest.fixture(scope="module")
def model():
    return randomize(StableDiffusion(tiny_config()), seed=7).eval()


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype or not sa[k].is_floating_point(), k
        assert torch.equal(sa[k].to(sb[k].dtype), sb[k]), k


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt", "diffusers_folder"])
def test_round_trip_in_every_layout(model, tmp_path, name):
    path = ldm.save(model, tmp_path / name)
    loaded = ldm.load(path)
    assert loaded.config == model.config
    assert_same_parameters(model, loaded)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt", "diffusers_folder"])
def test_the_image_size_survives_every_layout(model, tmp_path, name):
    """sample.py draws at the model's own size by default: a 16-px model must not come back as 512."""
    import dataclasses
    small = StableDiffusion(dataclasses.replace(model.config, image_size=16))
    assert ldm.load(ldm.save(small, tmp_path / name)).config.image_size == 16


def test_diffusers_folder_has_the_diffusers_layout(model, tmp_path):
    folder = ldm.save(model, tmp_path / "sd")
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "model.safetensors")):
        assert (folder / part / "config.json").exists()
        keys = load_file(folder / part / name).keys()
        assert any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys), part


def test_diffusers_folder_loads_in_diffusers(model, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    folder = ldm.save(model, tmp_path / "sd")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.allclose(unet(x, 10, encoder_hidden_states=ctx).sample, model.unet(x, 10, ctx), atol=1e-5)


def test_diffusers_folder_opens_as_a_diffusers_pipeline(model, tmp_path):
    """The saved folder is a whole pipeline: diffusers' tokenizer gives our ids, its text encoder
    our context, its scheduler our noise schedule; and the schedule survives our own round trip."""
    import dataclasses
    diffusers = pytest.importorskip("diffusers")
    custom = StableDiffusion(dataclasses.replace(model.config, schedule=dataclasses.replace(
        model.config.schedule, linear_end=0.02)))
    custom.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    folder = ldm.save(custom, tmp_path / "sd")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    cases = json.loads((ROOT / "tests" / "fixtures" / "tokenizer_cases.json").read_text())["cases"]
    prompts = [c["text"] for c in cases if c["hf_slow_CLIPTokenizer_agrees"] and c["hf_fast_CLIPTokenizerFast_agrees"]]
    assert len(prompts) >= 10
    ours = custom.tokenizer(prompts)
    theirs = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours, theirs.input_ids)
    with torch.no_grad():
        assert torch.allclose(pipe.text_encoder(ours)[0], custom.encode_prompts(prompts), atol=1e-5)
    assert torch.allclose(pipe.scheduler.alphas_cumprod, custom.schedule.alphas_cumprod.double().float(), atol=1e-6)
    assert ldm.load(folder).config == custom.config


def test_pipeline_saved_after_textual_inversion_keeps_its_word(model, tmp_path):
    """diffusers saves a pipeline that learned a word with the word's row in the text encoder's
    table and its name in the tokenizer files: the word is the model's own, as in diffusers."""
    diffusers = pytest.importorskip("diffusers")
    from inversion.files import save_embeddings
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(ldm.save(model, tmp_path / "sd"))
    word = save_embeddings(tmp_path / "toy.safetensors", {"<cat-toy>": torch.randn(1, 32)})
    pipe.load_textual_inversion(str(word))
    pipe.save_pretrained(tmp_path / "learned")
    loaded = ldm.load(tmp_path / "learned")
    assert loaded.tokenizer.added_tokens == {"<cat-toy>": 49408}
    prompt = ["a photo of a <cat-toy> on a table"]
    ids = loaded.tokenizer(prompt)
    assert torch.equal(ids, pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_prompts(prompt), pipe.text_encoder(ids)[0], atol=1e-5)
    # the same table in a single file, where no tokenizer names its extra row
    sd = {k: v for k, v in loaded.state_dict().items()}
    save_file(sd, tmp_path / "single.safetensors", metadata={"ldm_config": json.dumps(model.config.to_dict())})
    with pytest.raises(ldm.LoadError, match="token table of 49,409 rows, 1 more than this model's"):
        ldm.load(tmp_path / "single.safetensors")
    # saved again by us, in each layout, the row keeps its word; diffusers reads it from our folder
    for name in ("again.safetensors", "again.ckpt", "again"):
        again = ldm.load(ldm.save(loaded, tmp_path / name))
        assert again.tokenizer.added_tokens == {"<cat-toy>": 49408}, name
        assert torch.equal(again.tokenizer(prompt), ids)
    reopened = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "again")
    assert reopened.tokenizer(prompt, padding="max_length", max_length=77).input_ids == ids.tolist()
    # a file whose configuration has the extra row but nothing to name it is refused in one line
    save_file(sd, tmp_path / "unnamed.safetensors", metadata={"ldm_config": json.dumps(loaded.config.to_dict())})
    with pytest.raises(ldm.LoadError, match="1 rows past CLIP's vocabulary .* nothing names them"):
        ldm.load(tmp_path / "unnamed.safetensors")


def compvis_file_with(model, tmp_path, edit, name="edited.safetensors"):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    edit(sd)
    path = tmp_path / name
    meta = {"ldm_config": json.dumps(model.config.to_dict())}
    save_file(sd, path, metadata=meta)
    return path


def test_quirks_of_real_files_all_load(model, tmp_path):
    pos = convert.PREFIX_TEXT + "embeddings.position_ids"

    def quirks(sd):
        for name in model.schedule.compvis_buffers():      # schedule buffers absent
            del sd[name]
        sd[pos] = torch.tensor([[float(i) + 0.3 for i in range(77)]])  # position_ids stored as (wrong) floats
        sd["logvar"] = torch.zeros(1000)
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1, dtype=torch.int32)

    loaded = ldm.load(compvis_file_with(model, tmp_path, quirks))
    assert torch.equal(loaded.state_dict()[pos], torch.arange(77).unsqueeze(0))
    assert torch.equal(loaded.betas, model.betas)
    assert_same_parameters(model, loaded)

    loaded = ldm.load(compvis_file_with(model, tmp_path, lambda sd: sd.pop(pos), "nopos.safetensors"))
    assert torch.equal(loaded.state_dict()[pos], torch.arange(77).unsqueeze(0))

    def odd_buffers(sd):  # present, but in half precision and wrong: recomputed, never taken from the file
        for name in model.schedule.compvis_buffers():
            sd[name] = (sd[name] * 2).half()
    loaded = ldm.load(compvis_file_with(model, tmp_path, odd_buffers, "buffers.safetensors"))
    for name, value in model.schedule.compvis_buffers().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_odd_names_and_formats_of_checkpoints(model, tmp_path):
    sd = model.state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()},
                "ldm_config": json.dumps(model.config.to_dict())}, tmp_path / "parallel.CKPT")
    assert_same_parameters(model, ldm.load(tmp_path / "parallel.CKPT"))  # DataParallel's prefix, a capital suffix
    path = compvis_file_with(model, tmp_path, lambda sd: None)
    renamed = tmp_path / "model.bin"                                   # safetensors data under another name
    renamed.write_bytes(path.read_bytes())
    assert_same_parameters(model, ldm.load(renamed))
    torch.save({49408: torch.zeros(3)}, tmp_path / "ids.ckpt")
    with pytest.raises(ldm.LoadError, match="has a key 49408 \\(int\\) that names no tensor"):
        ldm.load(tmp_path / "ids.ckpt")


def test_ema_weights_are_taken_when_asked(model, tmp_path):
    def add_ema(sd):
        for k in [k for k in sd if k.startswith(convert.PREFIX_UNET)]:
            sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k] + 1
    path = compvis_file_with(model, tmp_path, add_ema)
    plain, ema = ldm.load(path), ldm.load(path, ema=True)
    w = "input_blocks.0.0.weight"
    assert torch.equal(plain.unet.state_dict()[w], model.unet.state_dict()[w])
    assert torch.equal(ema.unet.state_dict()[w], model.unet.state_dict()[w] + 1)
    # no EMA copy to take: a file without one, and a diffusers folder
    with pytest.raises(ldm.LoadError, match="emaonly or pruned"):
        ldm.load(compvis_file_with(model, tmp_path, lambda sd: None, "plain.safetensors"), ema=True)
    with pytest.raises(ldm.LoadError, match="no separate EMA copy"):
        ldm.load(ldm.save(model, tmp_path / "folder"), ema=True)
    # an EMA copy with a tensor missing is named by that tensor
    def add_most_ema(sd):
        add_ema(sd)
        del sd["model_ema.diffusion_modelout2bias"]
    with pytest.raises(ldm.LoadError, match=r"lacks 'model_ema.diffusion_modelout2bias' \(the U-Net's "
                                            r"model.diffusion_model.out.2.bias\)"):
        ldm.load(compvis_file_with(model, tmp_path, add_most_ema, "partial.safetensors"), ema=True)


def test_the_ema_copy_is_not_read_unless_asked_for(model, tmp_path, monkeypatch):
    """A full checkpoint's EMA copy is as large as the U-Net: without --ema it stays on disk."""
    import safetensors
    path = compvis_file_with(model, tmp_path, lambda sd: sd.update(
        {"model_ema." + k[len("model."):].replace(".", ""): v.clone() for k, v in list(sd.items())
         if k.startswith(convert.PREFIX_UNET)}))
    read = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    ldm.load(path)
    assert read and not any(k.startswith("model_ema.") for k in read)
    read.clear()
    ldm.load(path, ema=True)
    assert any(k.startswith("model_ema.") for k in read)


def test_diffusers_folder_variants_load(model, tmp_path):
    """Legacy VAE attention names, text keys without `text_model.`, and .bin weights."""
    folder = ldm.save(model, tmp_path / "sd")
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    vae = load_file(vae_file)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in vae.items():
        for new, old in legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[k] = v
    assert renamed.keys() != vae.keys()
    save_file(renamed, vae_file)
    text_file = folder / "text_encoder" / "model.safetensors"
    text = {k[len("text_model."):]: v for k, v in load_file(text_file).items()}
    text_file.unlink()
    torch.save(text, folder / "text_encoder" / "pytorch_model.bin")
    assert_same_parameters(model, ldm.load(folder))


def test_fp16_variant_folder_loads(model, tmp_path):
    """diffusers' `variant="fp16"` files: `*.fp16.safetensors` in half precision, nothing else."""
    folder = ldm.save(model, tmp_path / "sd")
    for part in ("unet", "vae", "text_encoder"):
        for f in (folder / part).glob("*.safetensors"):
            save_file({k: v.half() for k, v in load_file(f).items()}, f.with_suffix(".fp16.safetensors"))
            f.unlink()
    loaded = ldm.load(folder)
    w = "model.diffusion_model.out.2.weight"
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.state_dict()[w], model.state_dict()[w].half().float())


def test_sharded_diffusers_folder_loads(model, tmp_path):
    """Weights saved in shards by diffusers and transformers (`save_pretrained(max_shard_size=...)`):
    an `.index.json` names the file of every tensor; an fp16 variant's index is `.index.fp16.json`."""
    import shutil
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    folder = ldm.save(model, tmp_path / "sd")
    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").half()
    unet.save_pretrained(sharded / "unet", max_shard_size="200KB", variant="fp16")
    text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    text.save_pretrained(sharded / "text_encoder", max_shard_size="200KB")
    shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", sharded / "vae")
    assert (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").exists()
    assert len(list((sharded / "unet").glob("*.safetensors"))) > 1
    assert len(list((sharded / "text_encoder").glob("*.safetensors"))) > 1
    loaded = ldm.load(sharded)
    for key, value in model.state_dict().items():
        expected = value.half().float() if key.startswith("model.diffusion_model.") else value
        assert torch.equal(loaded.state_dict()[key], expected), key

    index = sharded / "text_encoder" / "model.safetensors.index.json"
    shard = sorted((sharded / "text_encoder").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ldm.LoadError, match=f"names the shard '{shard.name}', which is not a file beside it"):
        ldm.load(sharded)
    index.write_text(json.dumps({"weight_map": {"text_model.final_layer_norm.weight": "../../sd/unet/config.json"}}))
    with pytest.raises(ldm.LoadError, match="which is not a file beside it"):
        ldm.load(sharded)
    index.write_text("[]")
    with pytest.raises(ldm.LoadError, match="has no 'weight_map'"):
        ldm.load(sharded)


def test_a_file_without_a_configuration_is_read_as_sd_v1(model, tmp_path, monkeypatch):
    """Public checkpoints carry no configuration: they are all SD v1 size. Here the "SD v1 size"
    is this small model's, so that the file stays small."""
    load_module = sys.modules["ldm.load"]   # the module; `ldm.load` is its function
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "public.safetensors")          # no ldm_config metadata
    monkeypatch.setattr(load_module, "ModelConfig", lambda: model.config)
    assert_same_parameters(model, ldm.load(tmp_path / "public.safetensors"))


def test_fp16_file_loads_as_fp32_and_fp16(model, tmp_path):
    path = ldm.save(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert load_file(path)["model.diffusion_model.out.2.weight"].dtype == torch.float16
    as32 = ldm.load(path, dtype=torch.float32)
    as16 = ldm.load(path, dtype=torch.float16)
    assert as32.dtype == torch.float32 and as16.dtype == torch.float16
    assert as32.betas.dtype == torch.float32 and as16.betas.dtype == torch.float32  # schedule stays fp32
    w = "model.diffusion_model.out.2.weight"
    assert torch.equal(as32.state_dict()[w], model.state_dict()[w].half().float())


def test_ckpt_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(LoadError, match="refuses to load safely .it pickles print, which could run code") as e:
        ldm.load(path)
    assert "\x1b" not in str(e.value)


def save_lightning_checkpoint(path, state_dict, config, monkeypatch, zip_format=True):
    """Writes what the original CompVis .ckpt files pickle: the weights under `state_dict`, beside
    PyTorch Lightning's training state (its ModelCheckpoint class as a dict key, numpy scalars)."""
    import types
    import numpy as np
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = ModelCheckpoint
    with monkeypatch.context() as m:  # the class exists only while saving, as for a user without Lightning
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
            m.setitem(sys.modules, name, types.ModuleType(name))
        m.setitem(sys.modules, module.__name__, module)
        ckpt = {"epoch": 6, "global_step": np.int64(840000), "pytorch-lightning_version": "1.4.2",
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1), "monitor": None,
                                                "last_score": np.float64(0.25), "kth": np.zeros(2)}},
                "state_dict": state_dict,
                "ldm_config": json.dumps(config.to_dict())}  # this model's size (real files are SD v1 size)
        torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_lightning_ckpt_with_text_keys_without_text_model_level_loads(model, tmp_path, monkeypatch, zip_format):
    """A .ckpt as the original ones are written (Lightning's training state beside the weights),
    in the zip format or the pre-1.6 one, whose text keys lack `text_model.` as in some merges."""
    root = "cond_stage_model.transformer."
    sd = {k.replace(convert.PREFIX_TEXT, root): v for k, v in model.state_dict().items()}
    assert sum(k.startswith(convert.PREFIX_TEXT) for k in sd) == 0
    path = tmp_path / "sd-v1.ckpt"
    save_lightning_checkpoint(path, sd, model.config, monkeypatch, zip_format)
    assert "pytorch_lightning" not in sys.modules
    assert_same_parameters(model, ldm.load(path))


def test_a1111_embedding_given_as_a_model_is_named(tmp_path):
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768)}, "name": "x", "step": 10}
    torch.save(a1111, tmp_path / "x.pt")
    with pytest.raises(LoadError, match="textual-inversion embedding"):
        ldm.load(tmp_path / "x.pt")
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(LoadError, match="is an SDXL embedding .*implements SD v1.x"):  # not "use --embedding"
        ldm.load(tmp_path / "xl.safetensors")
    hypernetwork = {768: [{"linear.0.weight": torch.zeros(2, 768)}], "layer_structure": [1, 2, 1],
                    "activation_func": "linear", "name": "h", "step": 5}  # AUTOMATIC1111's layout
    torch.save(hypernetwork, tmp_path / "h.pt")
    with pytest.raises(LoadError, match="is an AUTOMATIC1111 hypernetwork, not a model"):
        ldm.load(tmp_path / "h.pt")
    torch.save({"state_dict": {"a": 1, "b": "x"}}, tmp_path / "odd.ckpt")
    with pytest.raises(LoadError, match=r"holds no tensors \(only int, str\)"):
        ldm.load(tmp_path / "odd.ckpt")


@pytest.mark.parametrize("make, expected", [
    (lambda: {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 320)}, "LoRA"),
    (lambda: {"string_to_param": torch.zeros(1, 768)}, "embedding"),
    (lambda: {"<cat-toy>": torch.zeros(768)}, "embedding"),
    (lambda: {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
              "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, "SDXL"),
    (lambda: {"cond_stage_model.model.ln_final.weight": torch.zeros(1024),
              "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, "SD 2.x"),
    (lambda: {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}, "inpainting"),
    (lambda: {"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 128, 3, 3),
              "encoder.conv_in.bias": torch.zeros(128), "decoder.conv_out.bias": torch.zeros(3),
              "quant_conv.weight": torch.zeros(8, 8, 1, 1)}, "VAE on its own"),
    # a VAE cut from a full checkpoint, with its training extras (were "no U-Net weights")
    (lambda: {"first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
              "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 128, 3, 3),
              "loss.logvar": torch.zeros(()), "model_ema.decay": torch.zeros(())}, "VAE on its own"),
])
def test_wrong_files_are_named(tmp_path, make, expected):
    path = tmp_path / "wrong.safetensors"
    save_file(make(), path)
    with pytest.raises(LoadError, match=expected) as e:
        ldm.load(path)
    assert "\n" not in str(e.value)


def test_a_git_lfs_pointer_is_named(tmp_path):
    pointer = tmp_path / "v1-5-pruned-emaonly.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:6ce0161689\nsize 4265146304\n")
    with pytest.raises(LoadError, match="it is a Git LFS pointer, not the file itself"):
        ldm.load(pointer)


def test_sd2_shapes_are_recognised():
    shapes = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
    assert "2.x" in describe_wrong_file(shapes.keys(), shapes)


def test_truncated_and_missing_and_unknown_files(model, tmp_path):
    good = ldm.save(model, tmp_path / "good.safetensors")
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated"):
        ldm.load(cut)
    cut_ckpt = tmp_path / "cut.ckpt"
    cut_ckpt.write_bytes(ldm.save(model, tmp_path / "good.ckpt").read_bytes()[:5000])
    with pytest.raises(LoadError, match="truncated"):
        ldm.load(cut_ckpt)
    with pytest.raises(LoadError, match="no such file"):
        ldm.load(tmp_path / "absent.safetensors")
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(LoadError, match="unknown format"):
        ldm.load(tmp_path / "weights.onnx")


def test_missing_tensor_and_wrong_shape_are_reported(model, tmp_path):
    key = "model.diffusion_model.out.2.weight"
    path = compvis_file_with(model, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(LoadError, match="lacks 1 of the"):
        ldm.load(path)
    path = compvis_file_with(model, tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(4, 32, 1, 1)), "shape.safetensors")
    with pytest.raises(LoadError, match="wrong shape"):
        ldm.load(path)


def edited(config: dict, part: str, **values):
    config = json.loads(json.dumps(config))
    config[part].update(values)
    return config


@pytest.mark.parametrize("change, message", [
    (lambda c: [1, 2], "a configuration is a JSON object, not list"),
    (lambda c: edited(c, "schedule", num_timesteps=0), "num_timesteps is 0"),
    (lambda c: edited(c, "schedule", num_timesteps="1000"), "num_timesteps is '1000'"),
    # trained, then failed at the validation grid (DDIM 50)
    (lambda c: edited(c, "schedule", num_timesteps=5),
     "num_timesteps is 5; the tools sample with 50 DDIM steps by default"),
    (lambda c: edited(c, "schedule", linear_start=0.5, linear_end=2.0), "they must rise and stay below 1"),
    (lambda c: edited(c, "unet", norm_groups=7), "is not divisible by its 7 norm groups"),
    (lambda c: edited(c, "unet", num_heads=3), "is not divisible by its 3 heads"),         # failed mid-sampling
    (lambda c: edited(c, "text", num_attention_heads=3), "is not divisible by its 3 heads"),
    (lambda c: edited(c, "unet", channel_mult="12"), "channel_mult is '12'"),
    (lambda c: edited(c, "unet", model_channels=10 ** 12), "model_channels is 1000000000000"),  # overflowed
    (lambda c: edited(c, "vae", scale_factor="x"), "scale_factor is 'x'"),  # failed after the sampling
])
def test_a_configuration_no_network_can_be_built_with_is_one_error(model, tmp_path, change, message):
    path = tmp_path / "odd.safetensors"
    config = json.dumps(change(model.config.to_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"ldm_config": config})
    with pytest.raises(LoadError, match="its 'ldm_config' metadata is not a configuration") as error:
        ldm.load(path)
    assert message in str(error.value)


@pytest.mark.parametrize("file, change, message", [
    ("unet/config.json", lambda c: [], "a config.json is not a diffusers configuration"),
    ("scheduler/scheduler_config.json", lambda c: [], "a config.json is not a diffusers configuration"),
    ("scheduler/scheduler_config.json", lambda c: {**c, "num_train_timesteps": 0}, "num_timesteps is 0"),
    ("unet/config.json", lambda c: {**c, "attention_head_dim": 0}, "num_heads is 0"),
    ("unet/config.json", lambda c: {**c, "norm_num_groups": 7}, "not divisible by its 7 norm groups"),
    ("vae/config.json", lambda c: {**c, "scaling_factor": "x"}, "scale_factor is 'x'"),
])
def test_a_diffusers_configuration_no_network_can_be_built_with_is_one_error(model, tmp_path, file, change, message):
    folder = ldm.save(model, tmp_path / "sd")
    path = folder / file
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(LoadError, match=re.escape(message)):
        ldm.load(folder)


def test_incomplete_diffusers_folder(model, tmp_path):
    folder = ldm.save(model, tmp_path / "sd")
    shutil.rmtree(folder / "vae")
    with pytest.raises(LoadError, match="vae/"):
        ldm.load(folder)


def test_peak_memory_while_loading_is_bounded(tmp_path):
    """fp16 file -> fp32 model: peak RSS growth <= 1.5x the fp32 model size (measured in a fresh process)."""
    from ldm.config import ModelConfig, UNetConfig
    cfg = ModelConfig(unet=UNetConfig(model_channels=128, channel_mult=(1, 2, 4), num_res_blocks=2,
                                      attention_resolutions=(2, 4), num_heads=4))
    with torch.device("meta"):
        size = sum(p.numel() for p in StableDiffusion(cfg).parameters()) * 4
    torch.manual_seed(0)
    path = ldm.save(StableDiffusion(cfg), tmp_path / "big.safetensors", dtype=torch.float16)
    code = (
        "import resource, sys, torch, ldm; "
        "from ldm.model import StableDiffusion; "
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024; "
        f"m = ldm.load(r'{path}', dtype=torch.float32); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip())
    assert size > 200e6
    assert growth <= 1.5 * size, f"peak growth {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"


def test_a_diffusers_folders_json_is_read_as_utf8_whatever_the_locale(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "added_tokens.json").write_text(json.dumps({"<café>": 49408}, ensure_ascii=False), encoding="utf-8")
    code = ("import locale, sys; from pathlib import Path; from ldm.load import _added_tokens; "
            "print(locale.getpreferredencoding(False), ascii(_added_tokens(Path(sys.argv[1]))))")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}  # an ASCII locale
    out = subprocess.run([sys.executable, "-c", code, str(tokenizer)], cwd=ROOT, env=env, capture_output=True,
                         text=True, encoding="utf-8")
    encoding, found = out.stdout.strip().split(" ", 1)
    assert out.returncode == 0 and encoding != "UTF-8" and found == ascii({49408: "<café>"}), out.stderr[-500:]
    (tokenizer / "added_tokens.json").write_bytes(b'{"<caf\xe9>": 49408}')  # latin-1: no JSON file
    from ldm.load import _added_tokens
    with pytest.raises(LoadError, match="is not valid JSON"):
        _added_tokens(tokenizer)


@pytest.mark.parametrize("config", ["{not json", json.dumps({"unet": {"use_linear_projection": True}})])
def test_a_configuration_this_version_cannot_read_is_one_error(model, tmp_path, config):
    """Our single files carry their configuration as JSON: bad JSON, or fields of another version,
    are a LoadError (one line at the command line), not a traceback."""
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"ldm_config": config})
    with pytest.raises(ldm.LoadError, match="its 'ldm_config' metadata is not a configuration this version reads"):
        ldm.load(path)


@pytest.mark.parametrize("name, content", [
    ("added_tokens.json", {"<x>": "forty"}),
    ("added_tokens.json", ["<x>", 49408]),
    ("tokenizer.json", {"added_tokens": [{"content": "<x>"}]}),
    ("tokenizer.json", {"added_tokens": [{"id": None, "content": "<x>"}]}),
    ("tokenizer_config.json", {"added_tokens_decoder": {"x49408": {"content": "<x>"}}}),
    ("tokenizer_config.json", {"added_tokens_decoder": ["<x>"]}),
])
def test_a_tokenizer_files_bad_added_tokens_are_one_error(tmp_path, name, content):
    """The names of a diffusers folder's added words, read from any of the three tokenizer files,
    are a LoadError naming the file when they are not {word: integer id}, not a traceback."""
    from ldm.load import _added_tokens
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / name).write_text(json.dumps(content))
    with pytest.raises(LoadError, match=f"{name}.* is not|{name}: its added tokens are not in the layout"):
        _added_tokens(tokenizer)


@pytest.mark.parametrize("named", ['{"<x>": "forty"}', '["<x>"]', "{not json"])
def test_a_single_files_bad_added_tokens_metadata_is_one_error(model, tmp_path, named):
    grown = model.config.to_dict()
    grown["text"]["vocab_size"] += 1
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    table = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    sd[table] = torch.cat([sd[table], sd[table][:1]])
    path = tmp_path / "grown.safetensors"
    save_file(sd, path, metadata={"ldm_config": json.dumps(grown), "added_tokens": named})
    with pytest.raises(ldm.LoadError, match="its 'added_tokens' metadata is not {word: id}"):
        ldm.load(path)
