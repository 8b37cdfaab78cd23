"""NeTI: the space-time mapper, its text conditioning, training, files and command lines."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
import inversion.neti as neti
from inversion.neti import (MapperConfig, NeTI, NeTIConfig, NeTIError, NeTIMapper, SpaceTimeConditioning,
                            encode_with_bypass, load_mapper, nested_dropout_keep, save_mapper,
                            space_time_conditioning)
from inversion.trainer import TrainingError
from ldm.model import StableDiffusion

TEMPLATES = ["a photo of a {}", "a rendering of a {}"]


def make(model, images, tmp_path, **kw):
    cfg = NeTIConfig(**{**dict(placeholder="<x>", init_word="object", steps=4, batch=2, grad_accum=1,
                               save_every=2), **kw})
    return NeTI(model, images, cfg, tmp_path, TEMPLATES, log=lambda s: None)


def mapper_for(model, **kw) -> NeTIMapper:
    return NeTIMapper(MapperConfig(width=model.config.text.hidden_size,
                                   num_layers=model.unet.num_cross_attention_layers, **kw))


def constant(mapper: NeTIMapper) -> NeTIMapper:
    """A mapper that ignores (t, ℓ): the anchor layer outputs 0 whatever its input."""
    with torch.no_grad():
        mapper.anchors.weight.zero_()
        mapper.anchors.bias.zero_()
    return mapper


def noisy_latents(model, batch=2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 4, 2, 2, generator=g), torch.tensor([10, 700])[:batch]


# ----------------------------------------------------------------------------- the mapper

def test_encoding_separates_layers_and_anchors_start_as_codes():
    m = NeTIMapper(MapperConfig())  # SD sizes: 16 layers, 10 time anchors
    code = lambda t, l: m.encoding(torch.tensor([float(t)]), torch.tensor([float(l)]))[0]
    assert torch.allclose(code(500, 3).norm(), torch.tensor(1.0))
    assert code(500, 3) @ code(501, 3) > 0.99        # σ_t = 0.03: neighbouring timesteps look alike
    assert code(500, 3) @ code(500, 4) < 0.3         # σ_ℓ = 2: neighbouring layers do not
    similarity = m.anchors.weight @ code(300, 5)     # anchors (t_a, ℓ), t_a = 0, 100, ..., ℓ inner
    assert similarity.argmax() == 3 * 16 + 5 and torch.allclose(similarity.max(), torch.tensor(1.0))


def test_word_has_the_super_category_norm_and_the_bypass_is_separate(model):
    m = mapper_for(model, target_norm=2.5)
    t, layer = torch.tensor([0, 999, 400]), torch.tensor([0, 3, 1])
    word, bypass = m(t, layer)
    assert word.shape == bypass.shape == (3, 32)
    assert torch.allclose(word.norm(dim=-1), torch.full((3,), 2.5))
    assert not torch.allclose(word[0], word[1])      # it depends on (t, ℓ)
    assert mapper_for(model, bypass=False)(t, layer)[1] is None


def test_nested_dropout_truncates_whole_layers_from_random_indices():
    g = torch.Generator().manual_seed(0)
    assert (nested_dropout_keep(3, 4, 128, 0.0, g) == 128).all()
    keep = nested_dropout_keep(3, 4, 128, 1.0, g)
    assert keep.shape == (12,) and (keep < 128).all() and len(set(keep.tolist())) > 1
    rows = torch.stack([nested_dropout_keep(5, 16, 128, 0.5, g).reshape(16, 5) for _ in range(20)])
    truncated = rows < 128
    assert (truncated.all(-1) | ~truncated.any(-1)).all()   # a layer is truncated for all rows or none
    assert 0.3 < truncated.float().mean() < 0.7


def test_truncation_moves_the_output_monotonically_in_k(model):
    m = mapper_for(model, seed=0)
    t = torch.arange(0, 1000, 37).repeat_interleave(4)
    layer = torch.arange(4).repeat(len(t) // 4)
    full = torch.cat(m(t, layer), -1)
    ks = (4, 16, 64, 128)
    dist = [(torch.cat(m(t, layer, k), -1) - full).norm().item() for k in ks]
    assert all(a > b for a, b in zip(dist, dist[1:])) and dist[-1] == 0
    # the same in the text the U-Net reads at one timestep (keys and values, every layer)
    at = lambda k: SpaceTimeConditioning(model, m, "<x>", ["a photo of a <x>"], k).at(500)
    ref = at(None)
    dist = [sum((a - b).pow(2).sum() for a, b in zip(sum(at(k), []), sum(ref, []))).sqrt().item() for k in ks]
    assert all(a > b for a, b in zip(dist, dist[1:])) and dist[-1] == 0


# ----------------------------------------------------------------------------- text conditioning

def test_same_text_in_every_layer_equals_the_single_conditioning_unet(model):
    m = constant(mapper_for(model))
    token = model.tokenizer.add_token("<x>")
    ids = model.tokenizer(["a photo of a <x>", "a <x> on the left"])
    z, t = noisy_latents(model)
    with torch.no_grad():
        keys, values = space_time_conditioning(model.text_encoder, m, ids, token, t)
        assert len(keys) == len(values) == model.unet.num_cross_attention_layers
        assert all(torch.equal(k, keys[0]) for k in keys) and all(torch.equal(v, values[0]) for v in values)
        per_layer = model.unet(z, t, keys, values)
        single = model.unet(z, t, keys[0], values[0])
    assert torch.allclose(per_layer, single, atol=1e-6)


def test_without_bypass_and_dropout_a_constant_mapper_is_textual_inversion(model):
    m = constant(mapper_for(model, bypass=False, target_norm=1.7))
    token = model.tokenizer.add_token("<x>")
    ids = model.tokenizer(["a photo of a <x>", "a <x> on the left"])
    z, t = noisy_latents(model)
    v = m(torch.tensor([0]), torch.tensor([0]))[0][0]     # the one vector the mapper gives
    with torch.no_grad():
        keys, values = space_time_conditioning(model.text_encoder, m, ids, token, t)
        neti_eps = model.unet(z, t, keys, values)
        ti_eps = model.unet(z, t, model.text_encoder(ids, {token: v}))
    assert values is None
    assert torch.allclose(neti_eps, ti_eps, atol=1e-5)
    assert not torch.allclose(neti_eps, model.unet(z, t, model.text_encoder(ids, {token: v * 0.5})), atol=1e-4)


def test_the_mapper_computes_in_float32_under_the_training_autocast(model, monkeypatch):
    # Training runs the frozen networks under bf16 autocast; the mapper must give the word and
    # bypass it gives at sampling time, which runs without autocast.
    m = mapper_for(model)
    seen = []
    forward = m.forward
    monkeypatch.setattr(m, "forward", lambda *a: seen.append(forward(*a)) or seen[-1])
    token = model.tokenizer.add_token("<x>")
    ids = model.tokenizer(["a photo of a <x>"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        space_time_conditioning(model.text_encoder, m, ids, token, torch.tensor([500]))
    with torch.no_grad():
        space_time_conditioning(model.text_encoder, m, ids, token, torch.tensor([500]))
    (word, bypass), (word_fp32, bypass_fp32) = seen
    assert word.dtype == bypass.dtype == torch.float32
    assert torch.equal(word, word_fp32) and torch.equal(bypass, bypass_fp32)


def test_bypass_changes_only_the_values_at_the_word(model):
    m = mapper_for(model)
    token = model.tokenizer.add_token("<x>")
    ids = model.tokenizer(["a photo of a <x>"])
    word, bypass = m(torch.tensor([300]), torch.tensor([1]))
    with torch.no_grad():
        keys, values = encode_with_bypass(model.text_encoder, ids, token, word, bypass)
        plain, none = encode_with_bypass(model.text_encoder, ids, token, word, None)
    assert none is None and torch.equal(keys, plain)
    changed = (values != keys).any(-1)[0]
    assert changed.tolist() == (ids[0] == token).tolist()
    z, t = noisy_latents(model, 1)
    with torch.no_grad():
        assert not torch.allclose(model.unet(z, t[:1], keys, values), model.unet(z, t[:1], keys), atol=1e-5)
    # before the final LayerNorm, the added bypass is 0.2 × |h| along b
    model.text_encoder.text_model.final_layer_norm = torch.nn.Identity()
    with torch.no_grad():
        h, bypassed = encode_with_bypass(model.text_encoder, ids, token, word, bypass)
    at = ids[0] == token
    added = (bypassed - h)[0, at]
    assert torch.allclose(added.norm(dim=-1), 0.2 * h[0, at].norm(dim=-1), rtol=1e-4)
    assert torch.allclose(torch.cosine_similarity(added, bypass, dim=-1), torch.ones(1), atol=1e-4)


# ----------------------------------------------------------------------------- training

def test_only_the_mapper_learns_and_the_model_stays_bit_identical(model, images, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = make(model, images, tmp_path, grad_accum=2)
    start = {k: v.clone() for k, v in t.mapper.state_dict().items()}
    t.loss(0).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in t.mapper.parameters())
    optimized = {id(p) for p in t.optimizer.params}
    assert optimized == {id(p) for p in t.mapper.parameters()}
    t.run(progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(t.mapper.anchors.weight, start["anchors.weight"])
    assert torch.equal(t.mapper.encoding.w, start["encoding.w"])      # the frequencies stay fixed
    assert t.step == 4 and len(t.losses) == 4
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "loss.csv").read_text().count("\n") == 5


def test_text_encoder_runs_once_per_step_on_all_layers(model, images, tmp_path):
    t = make(model, images, tmp_path, batch=3)
    calls = []
    hooks = [model.text_encoder.text_model.embeddings.register_forward_hook(
                 lambda mod, inp, out: calls.append(("text", tuple(inp[0].shape)))),
             model.unet.register_forward_hook(lambda mod, inp, out: calls.append(("unet", len(inp[2]))))]
    t.train_step()
    t.train_step()
    for h in hooks:
        h.remove()
    L = model.unet.num_cross_attention_layers
    assert calls == [("text", (3 * L, 77)), ("unet", L)] * 2


def test_guided_denoiser_sends_values_of_both_halves():
    from ldm.samplers import guided_denoiser
    calls = []

    def unet(x, t, context, value_context=None):
        calls.append((context, value_context))
        return torch.zeros_like(x)
    x, t = torch.zeros(2, 4, 2, 2), torch.tensor([7, 7])
    cond, uncond, values = torch.ones(1, 77, 8), torch.zeros(1, 77, 8), torch.full((1, 77, 8), 2.0)
    guided_denoiser(unet, cond, uncond, 3.0, value_cond=lambda step: [values * step] * 2)(x, t)
    keys, vals = calls[0]
    assert torch.equal(keys, torch.cat([uncond.expand(2, 77, 8), cond.expand(2, 77, 8)]))
    assert len(vals) == 2 and torch.equal(vals[1][:2], uncond.expand(2, 77, 8)) and (vals[1][2:] == 14).all()
    guided_denoiser(unet, cond, uncond, 3.0)(x, t)
    assert calls[1][1] is None


def test_sampling_computes_each_timesteps_text_once(model, monkeypatch):
    from ldm.generate import generate
    m = mapper_for(model)
    seen = []
    real = neti.space_time_conditioning

    def counting(text_encoder, mapper, ids, token_id, t, *args):
        seen.append((int(t[0]), ids.shape[0]))
        return real(text_encoder, mapper, ids, token_id, t, *args)
    monkeypatch.setattr(neti, "space_time_conditioning", counting)
    prompts = ["a photo of a <x>"] * 3
    c = SpaceTimeConditioning(model, m, "<x>", prompts)
    a = generate(model, prompts, [0, 1, 2], steps=4, cond=c.keys, value_cond=c.value_cond)
    timesteps = model.schedule.ddim_timesteps(4).tolist()
    assert seen == [(t, 1) for t in timesteps]          # once per timestep, for the one distinct prompt
    b = generate(model, prompts, [0, 1, 2], steps=4, cond=c.keys, value_cond=c.value_cond)
    assert len(seen) == 4 and torch.equal(a, b)         # the next batch reuses the cache
    assert c.keys(timesteps[0])[0].shape == (1, 77, 32)


def test_mixed_prompts_keep_their_rows(model):
    m = mapper_for(model)
    c = SpaceTimeConditioning(model, m, "<x>", ["a <x>", "a photo of a <x>", "a <x>"])
    one = SpaceTimeConditioning(model, m, "<x>", ["a photo of a <x>"])
    keys, values = c.at(250)
    assert keys[2].shape == (3, 77, 32)
    assert torch.equal(keys[1][0], keys[1][2]) and torch.allclose(values[3][1], one.at(250)[1][3][0], atol=1e-6)


def test_resume_is_bit_identical(model, images, tmp_path):
    full = make(model, images, tmp_path / "full", grad_accum=2)
    full.run(progress=False)
    first = make(model, images, tmp_path / "split", grad_accum=2)
    first.cfg.steps = 2  # stop half way, as an interrupted run would
    first.run(progress=False)
    second = make(model, images, tmp_path / "split", grad_accum=2)
    assert second.resume() and second.step == 2
    second.run(progress=False)
    assert all(torch.equal(a, b) for a, b in zip(full.mapper.state_dict().values(),
                                                 second.mapper.state_dict().values()))
    assert second.losses == full.losses


def test_resume_with_other_settings_is_refused(model, images, tmp_path):
    make(model, images, tmp_path).run(progress=False)
    with pytest.raises(TrainingError, match=r"does not match this run \(--sigma-t 0.03 in the checkpoint, 0.1 now\)"):
        make(model, images, tmp_path, sigma_t=0.1).resume()


def test_nan_loss_skips_the_step(model, images, tmp_path, monkeypatch):
    t = make(model, images, tmp_path)
    start = {k: v.clone() for k, v in t.mapper.state_dict().items()}
    messages = []
    t.log = messages.append
    monkeypatch.setattr(t, "loss", lambda step, micro=0: torch.tensor(float("nan"), requires_grad=True))
    assert t.train_step() is None and t.step == 1 and "skipped" in messages[0]
    assert all(torch.equal(v, start[k]) for k, v in t.mapper.state_dict().items())


def test_ctrl_c_saves_what_was_learned(model, images, tmp_path, monkeypatch):
    t = make(model, images, tmp_path, steps=100, save_every=1000)
    saved, real_step = [], t.train_step

    def step_then_interrupt():
        if t.step == 2:
            raise KeyboardInterrupt
        return real_step()
    monkeypatch.setattr(t, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        t.run(on_save=lambda tr: saved.append(tr.step), progress=False)
    assert saved == [2] and make(model, images, tmp_path, steps=100, save_every=1000).resume()


def test_bad_settings_are_refused(model, images, tmp_path):
    for kw, message in [(dict(init_word="xylophonist bananas"), "one token"),
                        (dict(placeholder="cat"), "already a word"),
                        (dict(nested_dropout=1.5), "between 0 and 1"), (dict(sigma_l=0.0), "--sigma-l")]:
        with pytest.raises(TrainingError, match=message):
            make(model, images, tmp_path, **kw)


# ----------------------------------------------------------------------------- files

def test_save_and_load_round_trip(model, tmp_path):
    m = mapper_for(model, seed=5, target_norm=0.7)
    path = save_mapper(tmp_path / "m.safetensors", m, {"placeholder": "<x>", "init_word": "toy", "step": 7})
    loaded, meta = load_mapper(path, model)
    assert meta["placeholder"] == "<x>" and meta["init_word"] == "toy" and meta["step"] == "7"
    assert meta["method"] == "neti" and loaded.config == m.config
    t, layer = torch.tensor([3, 998]), torch.tensor([0, 3])
    assert all(torch.equal(a, b) for a, b in zip(m(t, layer, 9), loaded(t, layer, 9)))
    assert not any(p.requires_grad for p in loaded.parameters())

    other = tiny_config()
    other.text.hidden_size = other.unet.context_dim = 48
    with pytest.raises(NeTIError, match="text width 32"):
        load_mapper(path, StableDiffusion(other))
    from inversion.files import save_embeddings
    ti = save_embeddings(tmp_path / "ti.safetensors", {"<x>": torch.zeros(1, 32)})
    with pytest.raises(NeTIError, match="not a NeTI mapper"):
        load_mapper(ti, model)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(NeTIError, match="cannot be read"):
        load_mapper(tmp_path / "junk.safetensors", model)
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}}, tmp_path / "word.pt")
    with pytest.raises(NeTIError, match=r"\.pt or \.bin learned word .* goes to --embedding"):
        load_mapper(tmp_path / "word.pt", model)


@pytest.mark.parametrize("field, value, message", [
    ("num_features", 10 ** 7, "num_features is 10000000, not a whole number up to 16,384"),  # was killed for memory
    ("hidden", 10 ** 6, "hidden is 1000000"),
    ("target_norm", "x", "target_norm is 'x', not a number > 0"),   # failed mid-sampling
    ("bypass", "no", "bypass is 'no', not true or false"),          # was read as true
    ("time_anchors", 0, "time_anchors is 0"),
    ("time_anchors", 5000, "time_anchors 5000 is more than the 1000 timesteps"),
    ("sigma_t", float("inf"), "sigma_t is inf"),
])
def test_a_mapper_file_whose_configuration_cannot_be_built_is_one_error(model, tmp_path, field, value, message):
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = save_mapper(tmp_path / "m.safetensors", mapper_for(model), {"placeholder": "<x>", "step": 1})
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["neti_config"])
    config[field] = value
    meta["neti_config"] = json.dumps(config)
    save_file(tensors, path, metadata=meta)
    with pytest.raises(NeTIError, match="a damaged NeTI mapper") as error:
        load_mapper(path, model)
    assert message in str(error.value)


# ----------------------------------------------------------------------------- command lines

def invert(argv, capsys):
    import invert as invert_py
    from ldm.cli import run
    rc = run(invert_py.main, ["--method", "neti", *argv], prog="invert.py")
    return rc, capsys.readouterr()


def sample(argv, capsys):
    import sample as sample_py
    from ldm.cli import run
    rc = run(sample_py.main, argv, prog="sample.py")
    return rc, capsys.readouterr()


def test_invert_writes_a_mapper_that_sample_py_reads(ckpt, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc, cap = invert(["--ckpt", str(ckpt), "--images", str(image_folder), "--placeholder", "<toy>", "--init-word", "toy",
                      "--steps", "2", "--batch", "2", "--out", str(out)], capsys)
    assert rc == 0, cap.err
    assert "effective lr = 0.001 x batch 2 x 1 = 0.002" in cap.out
    assert "4 cross-attention layers" in cap.out
    for name in ("neti_mapper.safetensors", "checkpoint.pt", "loss.csv", "samples/step-000002.png"):
        assert (out / name).exists(), name
    mapper, meta = load_mapper(out / "neti_mapper.safetensors")
    assert meta["placeholder"] == "<toy>" and meta["init_word"] == "toy" and meta["step"] == "2"
    assert len(meta["base_model_hash"]) == 16 and mapper.config.num_layers == 4
    assert meta["base_model"] == ckpt.name

    rc, cap = invert(["--ckpt", str(ckpt), "--images", str(image_folder), "--placeholder", "<toy>", "--init-word", "toy",
                      "--steps", "3", "--batch", "2", "--out", str(out), "--resume"], capsys)
    assert rc == 0 and "resuming at step 2" in cap.out, cap.err

    drawn = {}
    for name, extra in (("full", []), ("truncated", ["--truncation", "8"]),
                        ("negative", ["--truncation", "8", "--negative", "a blurry <toy>"])):
        rc, cap = sample(["--ckpt", str(ckpt), "--prompt", "a photo of <toy>", "--neti",
                          str(out / "neti_mapper.safetensors"), "--n", "2", "--steps", "2", "--out",
                          str(tmp_path / name), *extra], capsys)
        assert rc == 0 and (tmp_path / name / "00001-1.png").exists(), cap.err
        assert "looks like a learned word" not in cap.err  # the mapper defines <toy> (in the negative too)
        drawn[name] = np.asarray(Image.open(tmp_path / name / "00000-0.png"))
    assert Image.open(tmp_path / "truncated" / "00000-0.png").text["truncation"] == "8"
    assert not np.array_equal(drawn["full"], drawn["truncated"])       # 8 of the 128 hidden units: another word
    assert not np.array_equal(drawn["truncated"], drawn["negative"])
    mapper_file = str(out / "neti_mapper.safetensors")
    rc, cap = sample(["--ckpt", str(ckpt), "--prompt", "a red circle", "--neti", mapper_file, "--n", "1",
                      "--steps", "1", "--out", str(tmp_path / "u")], capsys)
    assert rc == 0 and cap.err.count("warning: the prompt does not use the learned word '<toy>'") == 1, cap.err
    rc, cap = sample(["--ckpt", str(ckpt), "--prompt", "a red circle", "--neti", mapper_file, "--height", "33",
                      "--out", str(tmp_path / "h")], capsys)  # refused: its error alone, no warning first
    assert rc == 2 and len(cap.err.strip().splitlines()) == 1 and "height 33" in cap.err, cap.err


def test_default_run_learns_a_tiny_world_concept(ckpt, tmp_path, capsys):
    out = tmp_path / "ring"
    rc, cap = invert(["--ckpt", str(ckpt), "--steps", "1", "--batch", "2", "--num-images", "2", "--no-eval",
                      "--out", str(out)], capsys)
    assert rc == 0, cap.err
    assert load_mapper(out / "neti_mapper.safetensors")[1]["placeholder"] == "<ring>"
    assert len(list((out / "train_images").glob("*.png"))) == 2


def test_bad_input_gives_one_line_exit_2_and_no_files(ckpt, image_folder, tmp_path, capsys):
    common = ["--ckpt", str(ckpt), "--images", str(image_folder), "--placeholder", "<toy>", "--init-word", "toy"]
    for argv, message in [
        (common + ["--num-vectors", "2"], "--num-vectors is not an option of --method neti"),
        (common + ["--image", str(image_folder)], "--image is not an option of --method neti"),
        (common + ["--nested-dropout", "1.5"], "--nested-dropout"),
        (common + ["--sigma-t", "0"], "--sigma-t"),
        (common + ["--sigma-t", "1e39"], "--sigma-t must be at most 100"),  # trained on NaN: "lower --lr"
        (common + ["--sigma-l", "101"], "--sigma-l must be at most 100"),
        (common + ["--grad-accum", "0"], "--grad-accum"),
        (["--ckpt", str(ckpt), "--images", str(image_folder), "--placeholder", "<a>", "--init-word", "gold fish tank"],
         "one token"),
        (["--ckpt", str(ckpt), "--images", str(image_folder), "--placeholder", "cat", "--init-word", "toy"],
         "already a word"),
        (["--ckpt", str(ckpt), "--images", str(image_folder)], "--placeholder"),
        (common + ["--resume"], "--resume"),
    ]:
        out = tmp_path / "bad"
        rc, cap = invert(argv + ["--out", str(out)], capsys)
        lines = cap.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and message in lines[0], (argv, cap.err)
        assert not out.exists() or not any(out.rglob("*.*")), argv

    ti = tmp_path / "ti.safetensors"
    from inversion.files import save_embeddings
    save_embeddings(ti, {"<x>": torch.zeros(1, 32)})
    mapper = save_mapper(tmp_path / "m.safetensors", NeTIMapper(MapperConfig(width=32, num_layers=4)),
                         {"placeholder": "<toy>"})
    base = ["--ckpt", str(ckpt), "--prompt", "a <toy>", "--n", "1", "--steps", "1", "--out", str(tmp_path / "s")]
    for argv, message in [
        (base + ["--truncation", "4"], "--truncation needs --neti"),
        (base + ["--neti", str(tmp_path / "none.safetensors")], "no such file"),
        (base + ["--neti", str(ti)], "not a NeTI mapper"),
        (base + ["--neti", str(mapper), "--truncation", "500"], "between 1 and 128"),
        (base + ["--neti", str(mapper), "--hiper", str(ti)], "not both"),
        (base + ["--embedding", str(mapper)], "sample.py --neti"),
        (base + ["--neti", str(mapper), "--embedding", str(save_embeddings(tmp_path / "toy.safetensors",
                                                                            {"<toy>": torch.zeros(1, 32)}))],
         "also defined by an --embedding file"),                      # one word, two meanings: was silent
    ]:
        rc, cap = sample(argv, capsys)
        lines = cap.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and message in lines[0], (argv, cap.err)
        assert not (tmp_path / "s").exists()


def test_the_base_model_is_hashed_once_for_all_learned_files(ckpt, tmp_path, capsys, monkeypatch):
    """An embedding and a NeTI mapper that both record their base model: the checkpoint (4 GB for
    SD) is read to hash it once, and both see the other model's hash."""
    import inversion.files
    from inversion.files import save_embeddings
    calls = []
    real = inversion.files.file_hash
    monkeypatch.setattr(inversion.files, "file_hash", lambda path: calls.append(path) or real(path))
    emb = save_embeddings(tmp_path / "e.safetensors", {"<e>": torch.zeros(1, 32)}, {"base_model_hash": "aaaa"})
    mapper = save_mapper(tmp_path / "m.safetensors", NeTIMapper(MapperConfig(width=32, num_layers=4)),
                         {"placeholder": "<toy>", "base_model_hash": "bbbb"})
    rc, cap = sample(["--ckpt", str(ckpt), "--prompt", "a <toy> and a <e>", "--neti", str(mapper), "--embedding",
                      str(emb), "--n", "1", "--steps", "1", "--out", str(tmp_path / "s")], capsys)
    assert rc == 0, cap.err
    assert cap.err.count("another base model") == 2
    assert calls == [ckpt]
