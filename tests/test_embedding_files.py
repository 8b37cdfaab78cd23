"""inversion/files.py: learned-embedding files in every layout, their errors, and their use.

The model here is the tiny random one of conftest (text width 32), so every test is quick;
the diffusers test opens the same model, saved as a folder, as a diffusers pipeline."""

import pytest
import torch
from PIL import Image

from conftest import randomize, tiny_config, write_random_checkpoint
import ldm
import sample
from inversion.files import BaseModel, EmbeddingError, apply_embeddings, load_embeddings, save_a1111, save_embeddings
from inversion.hook import LearnedEmbeddings
from ldm.cli import run
from ldm.files import LoadError
from ldm.model import StableDiffusion

D = 32  # tiny_config's text width


def vectors(n, seed=0, width=D):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return randomize(StableDiffusion(tiny_config()), seed=1).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), image_size=32, seed=3)


# ----------------------------------------------------------------------------- formats

def test_ours_round_trip_with_metadata_and_several_words(tmp_path):
    a, b = vectors(3, 1), vectors(1, 2)
    path = save_embeddings(tmp_path / "learned.safetensors", {"<a>": a, "<b>": b},
                           {"base_model_hash": "abc123", "init_word": "toy", "step": 500})
    embeds, meta = load_embeddings(path)
    assert [w for w, _ in embeds] == ["<a>", "<b>"]
    assert torch.equal(embeds[0][1], a) and torch.equal(embeds[1][1], b)
    assert embeds[0][1].dtype == torch.float32 and embeds[1][1].shape == (1, D)
    assert meta["base_model_hash"] == "abc123" and meta["init_word"] == "toy" and meta["step"] == "500"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left (an interrupted write: test_file_errors)


def test_ours_stores_fp32_even_from_half_precision(tmp_path):
    v = vectors(2).half()
    (word, loaded), = load_embeddings(save_embeddings(tmp_path / "h.safetensors", {"<h>": v}))[0]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, v.float())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a1111_round_trip_names_the_word_after_the_file(tmp_path, suffix):
    v = vectors(4, 5)
    path = save_a1111(tmp_path / f"my-style{suffix}", "<my-style>", v, step=1200,
                      metadata={"base_model_hash": "0123456789abcdef", "base_model": "v1-5.safetensors"})
    (word, loaded), = load_embeddings(path)[0]
    assert word == "my-style" and torch.equal(loaded, v)
    meta = load_embeddings(path)[1]
    assert meta["step"] == "1200" and meta["base_model_hash"] == "0123456789abcdef"


def test_a1111_pt_has_the_webui_layout_and_loads_with_weights_only(tmp_path):
    v = vectors(2)
    path = save_a1111(tmp_path / "thing.pt", "<thing>", v, step=7, metadata={"base_model_hash": "ff00"})
    data = torch.load(path, weights_only=True)
    assert data["string_to_token"] == {"*": 265}
    assert torch.equal(data["string_to_param"]["*"], v)
    assert data["name"] == "thing" and data["step"] == 7 and data["sd_checkpoint"] == "ff00"
    assert data["sd_checkpoint_name"] is None


def test_a1111_safetensors_holds_only_emb_params(tmp_path):
    from safetensors import safe_open
    path = save_a1111(tmp_path / "thing.safetensors", "<thing>", vectors(2), step=3)
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (2, D)
        assert f.metadata()["step"] == "3" and f.metadata()["name"] == "thing"


def test_a1111_pt_converted_key_by_key_to_safetensors_is_named_after_its_file(tmp_path):
    from safetensors.torch import save_file
    v = vectors(2)
    save_file({"string_to_param.*": v}, str(tmp_path / "bad-hands.safetensors"))
    (word, loaded), = load_embeddings(tmp_path / "bad-hands.safetensors")[0]
    assert word == "bad-hands" and torch.equal(loaded, v)


def test_original_textual_inversion_checkpoint_with_a_parameter_dict(tmp_path):
    v = vectors(2, 6)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(v.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "toy.pt")
    (word, loaded), = load_embeddings(tmp_path / "toy.pt")[0]
    assert word == "toy" and torch.equal(loaded, v) and not loaded.requires_grad


def test_sd_concepts_library_bin_with_a_1d_vector(tmp_path):
    v = torch.randn(D)
    torch.save({"<cat-toy>": v}, tmp_path / "learned_embeds.bin")
    (word, loaded), = load_embeddings(tmp_path / "learned_embeds.bin")[0]
    assert word == "<cat-toy>" and loaded.shape == (1, D) and torch.equal(loaded[0], v)
    # a concept folder works too, as diffusers names the file inside it
    assert load_embeddings(tmp_path)[0][0][0] == "<cat-toy>"


def test_diffusers_training_script_safetensors(tmp_path):
    from safetensors.torch import save_file
    v = torch.randn(D)
    save_file({"<dog>": v}, str(tmp_path / "learned_embeds.safetensors"), metadata={"format": "pt"})
    (word, loaded), = load_embeddings(tmp_path / "learned_embeds.safetensors")[0]
    assert word == "<dog>" and torch.equal(loaded, v[None])


def test_names_and_formats_of_real_files(tmp_path):
    from safetensors.torch import save_file
    v = torch.randn(D)
    # diffusers' training script once wrote safetensors data into learned_embeds.bin
    save_file({"<cat-toy>": v[None]}, str(tmp_path / "learned_embeds.bin"), metadata={"format": "pt"})
    assert load_embeddings(tmp_path / "learned_embeds.bin")[0][0][0] == "<cat-toy>"
    torch.save({"<toy-v1.5>": v}, tmp_path / "dotted.bin")   # a dot in a word, not a network's tensor name
    assert load_embeddings(tmp_path / "dotted.bin")[0][0][0] == "<toy-v1.5>"
    torch.save({"<x>": v}, tmp_path / "upper.PT")             # a suffix in capitals
    assert load_embeddings(tmp_path / "upper.PT")[0][0][0] == "<x>"
    torch.save({"proj.0.weight": v}, tmp_path / "net.bin")
    with pytest.raises(EmbeddingError, match="like network weights"):
        load_embeddings(tmp_path / "net.bin")
    save_file({"string_to_param.*": v[None].repeat(2, 1), "string_to_token.*": torch.tensor(265)},
              str(tmp_path / "converted.safetensors"))         # an AUTOMATIC1111 .pt converted key by key
    (word, vectors), = load_embeddings(tmp_path / "converted.safetensors")[0]
    assert word == "converted" and vectors.shape == (2, D)
    torch.save({49408: v}, tmp_path / "ids.bin")              # {token id: vector}: was a TypeError traceback
    with pytest.raises(EmbeddingError, match="has a key 49408 \\(int\\) that is not a word"):
        load_embeddings(tmp_path / "ids.bin")


def test_diffusers_cpu_bin_keeps_only_its_rows(tmp_path):
    """diffusers' example, trained on a CPU, saves its rows as a view of the whole token table, so
    the pickle holds the table; only the word's vectors are kept once loaded."""
    table = torch.randn(49408, D)
    torch.save({"<x>": table[49407:49408]}, tmp_path / "learned_embeds.bin")
    assert (tmp_path / "learned_embeds.bin").stat().st_size > table.numel() * 4
    (word, loaded), = load_embeddings(tmp_path / "learned_embeds.bin")[0]
    assert word == "<x>" and torch.equal(loaded, table[49407:49408])
    assert loaded.untyped_storage().nbytes() == D * 4


# ----------------------------------------------------------------------------- bad files

def one_line_error(path, match, **kwargs):
    with pytest.raises(EmbeddingError) as info:
        load_embeddings(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for word in match:
        assert word in message, message
    assert isinstance(info.value, LoadError)  # so the CLIs print it as one line
    return message


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file(tmp_path, suffix):
    path = save_embeddings(tmp_path / "x.safetensors", {"<x>": vectors(2)}) if suffix == ".safetensors" \
        else save_a1111(tmp_path / "x.pt", "<x>", vectors(2), step=1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error(path, ["truncated"])


def test_full_model_is_not_an_embedding(tmp_path, ckpt):
    one_line_error(ckpt, ["not a textual-inversion embedding", "full model"])


def test_huge_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "model.ckpt"
    with open(path, "wb") as f:
        f.truncate(300 << 20)  # sparse: no disk used
    one_line_error(path, ["300 MB", "too big"])


@pytest.mark.parametrize("layout", ["sparse", "meta"])
def test_sparse_and_meta_tensors_in_a_pt_are_refused_by_name(tmp_path, layout):
    """A .pt may hold any tensor: a sparse one failed in reshape, a meta one (no data) in .item()."""
    from inversion.hiper import TailFileError, load_tail
    make = (lambda *shape: torch.zeros(*shape).to_sparse()) if layout == "sparse" else \
        (lambda *shape: torch.empty(*shape, device="meta"))
    for i, obj in enumerate([{"<a>": make(1, 32)}, {"string_to_param": {"*": make(1, 32)}}]):
        torch.save(obj, tmp_path / f"w{i}.pt")
        with pytest.raises(EmbeddingError, match=f"are a {layout} tensor; expected an ordinary"):
            load_embeddings(tmp_path / f"w{i}.pt", width=32)
    torch.save(make(1, 5, 32), tmp_path / "tail.pt")
    with pytest.raises(TailFileError, match=f"the tail is a {layout} tensor"):
        load_tail(tmp_path / "tail.pt", 32)


def test_a1111_layout_without_a_tensor_is_one_line(tmp_path):
    torch.save({"string_to_param": {"*": {"clip_l": vectors(1), "clip_g": vectors(1)}}, "name": "x"}, tmp_path / "x.pt")
    one_line_error(tmp_path / "x.pt", ["'string_to_param' holds a dict, not a tensor"])


def test_wrong_width_names_the_sd2_family(tmp_path):
    path = save_embeddings(tmp_path / "sd2.safetensors", {"<x>": vectors(1, width=1024)})
    one_line_error(path, ["1024 wide", "SD 2.x", "768 wide"], width=768)


def test_sdxl_embedding_and_missing_file_and_unknown_suffix(tmp_path):
    from safetensors.torch import save_file
    save_file({"clip_l": vectors(1, width=768), "clip_g": vectors(1, width=1280)}, str(tmp_path / "xl.safetensors"))
    one_line_error(tmp_path / "xl.safetensors", ["SDXL"])
    one_line_error(tmp_path / "nothing.pt", ["no such file"])
    (tmp_path / "e.txt").write_text("hello")
    one_line_error(tmp_path / "e.txt", ["unknown embedding format"])


def test_a_text_file_named_pt_is_damage_not_danger(tmp_path):
    (tmp_path / "notes.pt").write_text("not a pickle")
    message = one_line_error(tmp_path / "notes.pt", ["cannot be read as a PyTorch file"])
    assert "safely" not in message and "Weights only" not in message


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"<x>": torch.nn.Linear(2, 2)}, tmp_path / "evil.pt")  # unpickling it would run module code
    one_line_error(tmp_path / "evil.pt", ["refuses to load safely"])


def test_expand_reads_the_words_as_the_tokenizer_does(model):
    learned = LearnedEmbeddings(model.tokenizer)
    learned.add("<cat>", vectors(2))
    learned.add("<cat>-toy", vectors(1))  # begins with another word, as per-image tokens <x>-img0 do
    learned.add("<x>", vectors(3))
    prompt = "a <cat>-toy on a <cat>, <x> and <x>_1"
    assert learned.expand(prompt) == "a <cat>-toy on a <cat> <cat>_1, <x> <x>_1 <x>_2 and <x>_1"
    tok = model.tokenizer  # every word becomes its own tokens, and <cat>-toy stays one token
    assert learned.ids([prompt])[0, 1:14].tolist() == [
        *tok.encode("a")[1:2], tok.added_tokens["<cat>-toy"], *tok.encode("on a")[1:3],
        *learned.token_ids("<cat>"), *tok.encode(",")[1:2], *learned.token_ids("<x>"),
        *tok.encode("and")[1:2], tok.added_tokens["<x>_1"], tok.END_ID]


def test_ordinary_word_is_refused_and_nothing_is_added(tmp_path, model):
    good = save_embeddings(tmp_path / "good.safetensors", {"<good>": vectors(1)})
    bad = save_a1111(tmp_path / "cat.pt", "<cat>", vectors(1), step=1)  # A1111 word = file stem = "cat"
    learned = LearnedEmbeddings(model.tokenizer)
    with pytest.raises(EmbeddingError) as info:
        apply_embeddings(model, learned, [good, bad])
    assert "'cat' is an ordinary word" in str(info.value) and "\n" not in str(info.value)
    assert learned.words == []  # checked before anything was registered


def test_apply_checks_width_and_duplicates(tmp_path, model):
    wide = save_embeddings(tmp_path / "wide.safetensors", {"<w>": vectors(1, width=768)})
    with pytest.raises(EmbeddingError, match="768 wide .an SD 1.x embedding.; this model's text encoder is 32 wide"):
        apply_embeddings(model, LearnedEmbeddings(model.tokenizer), wide)
    a = save_embeddings(tmp_path / "a.safetensors", {"<dup>": vectors(1)})
    b = save_embeddings(tmp_path / "b.safetensors", {"<dup>": vectors(1)})
    with pytest.raises(EmbeddingError, match="already defined by .*a.safetensors"):
        apply_embeddings(model, LearnedEmbeddings(model.tokenizer), [a, b])
    # "<two>" of 2 vectors is the tokens "<two> <two>_1": a word "<two>_1" would share a token
    two = save_embeddings(tmp_path / "two.safetensors", {"<two>": vectors(2), "<two>_1": vectors(1)})
    with pytest.raises(EmbeddingError, match="the token '<two>_1' of '<two>_1' is already taken by '<two>'"):
        apply_embeddings(model, LearnedEmbeddings(model.tokenizer), two)


def test_base_model_hash_mismatch_warns_but_loads(tmp_path, model, ckpt):
    other = save_embeddings(tmp_path / "h.safetensors", {"<hh>": vectors(1)}, {"base_model_hash": "aaaa"})
    ours = save_embeddings(tmp_path / "o.safetensors", {"<oo>": vectors(1)}, BaseModel(ckpt, ldm.load(ckpt)).metadata())
    warnings = []
    learned = LearnedEmbeddings(model.tokenizer)
    assert list(apply_embeddings(model, learned, other, BaseModel(ckpt, model), warn=warnings.append)) == ["<hh>"]
    assert len(warnings) == 1 and "another base model (hash aaaa, this one is " in warnings[0]
    warnings.clear()
    apply_embeddings(model, LearnedEmbeddings(model.tokenizer), ours, BaseModel(ckpt, model), warn=warnings.append)
    assert warnings == []
    # another file of the same weights (its diffusers folder): the file hash differs, the weights hash does not
    folder = ldm.save(ldm.load(ckpt), tmp_path / "folder")
    apply_embeddings(model, LearnedEmbeddings(model.tokenizer), ours, BaseModel(folder, ldm.load(folder)),
                     warn=warnings.append)
    assert warnings == []


def test_a_diffusers_folders_hash_is_of_the_files_it_loads_from(tmp_path):
    """An fp16 variant beside the full weights is not read, so it does not change the hash (it
    used to: the first file by name was hashed, and '.fp16.' sorts first); the file read does."""
    import shutil
    from inversion.files import base_model_hash
    folder = ldm.save(randomize(StableDiffusion(tiny_config()), seed=4).eval(), tmp_path / "folder")
    before = base_model_hash(folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.exists()
    variant = folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", variant)  # any other file
    assert base_model_hash(folder) == before
    variant.unlink()
    shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", unet)
    assert base_model_hash(folder) != before


def test_weights_hash_names_the_weights_not_the_file(tmp_path):
    """The same weights in every layout, and in fp16, have one weights hash; a change to the
    U-Net or the text encoder changes it, a change to the VAE does not. Weights loaded in bf16
    keep the file's (taken on the way); a model cast to bf16 has none."""
    from inversion.files import base_model_hash
    from ldm.load import model_weights_hash as weights_hash
    model = randomize(StableDiffusion(tiny_config()), seed=4).eval()
    ours = weights_hash(model)
    copies = [ldm.save(model, tmp_path / "m.safetensors"), ldm.save(model, tmp_path / "m.ckpt"),
              ldm.save(model, tmp_path / "folder"), ldm.save(model, tmp_path / "h.safetensors", torch.float16)]
    assert len({base_model_hash(c) for c in copies}) == 4
    assert {weights_hash(ldm.load(c)) for c in copies} == {ours}
    assert weights_hash(ldm.load(copies[0], dtype=torch.float16)) == ours
    assert weights_hash(ldm.load(copies[2], dtype=torch.bfloat16)) == ours
    assert weights_hash(model.to(torch.bfloat16)) is None
    model.float()
    for key, changed in (("model.diffusion_model.out.2.bias", True), ("first_stage_model.decoder.conv_out.bias", False),
                         ("cond_stage_model.transformer.text_model.final_layer_norm.bias", True)):
        with torch.no_grad():
            model.state_dict()[key][0] += 0.01
        assert (weights_hash(model) != ours) == changed, key
        ours = weights_hash(model)


def test_a1111_hashes_of_the_same_base_model_are_recognised(tmp_path, model, ckpt):
    """AUTOMATIC1111 records `sd_checkpoint`: older files the sha256 of 64 KB at 1 MB (8 digits),
    newer ones the start of the whole file's sha256 (10 digits). Both name this checkpoint."""
    import hashlib
    from inversion.files import base_model_hashes
    data = ckpt.read_bytes()
    assert len(data) > 0x110000
    legacy, short = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8], hashlib.sha256(data).hexdigest()[:10]
    assert base_model_hashes(ckpt)[1] == legacy
    for recorded, warned in ((legacy, False), (short, False), ("0badcafe", True)):
        path = save_a1111(tmp_path / f"w{recorded}.pt", "<w>", vectors(1), step=1)
        obj = torch.load(path, weights_only=True)
        obj["sd_checkpoint"] = recorded
        torch.save(obj, path)
        warnings = []
        apply_embeddings(model, LearnedEmbeddings(model.tokenizer), path,
                         BaseModel(ckpt, model), warn=warnings.append)
        assert bool(warnings) == warned, (recorded, warnings)


# ----------------------------------------------------------------------------- use

def test_vectors_are_really_used_by_the_text_encoder(tmp_path, model):
    a, b = vectors(2, 10), vectors(1, 11)
    prompt = "a <a> next to a <b>"

    def encode(a_vectors):
        fa = save_embeddings(tmp_path / "a.safetensors", {"<a>": a_vectors})
        fb = save_a1111(tmp_path / "<b>.pt", "<b>", b, step=1)
        learned = LearnedEmbeddings(model.tokenizer)
        apply_embeddings(model, learned, [fa, fb])
        ids = learned.ids([prompt])
        return ids, model.text_encoder(ids, learned.mapping())

    ids, out = encode(a)
    a2 = a.clone()
    a2[1] += vectors(1, 12)[0]  # change the second vector of <a> only (not by a constant: LayerNorm hides that)
    ids2, out2 = encode(a2)
    assert torch.equal(ids, ids2)
    first_changed = ids[0].tolist().index(model.tokenizer.added_tokens["<a>_1"])
    assert torch.equal(out[0, :first_changed], out2[0, :first_changed])  # causal: earlier positions equal
    assert (out[0, first_changed:] - out2[0, first_changed:]).abs().amax() > 1e-3


def test_sample_cli_with_two_embeddings(tmp_path, ckpt, capsys):
    f1 = save_embeddings(tmp_path / "a.safetensors", {"<a>": vectors(2, 1)})
    f2 = save_a1111(tmp_path / "<b>.pt", "<b>", vectors(1, 2), step=3)
    out = tmp_path / "out"
    # (without the learned vectors, the text encoder refuses the new token ids)
    rc = sample.main(["--ckpt", str(ckpt), "--steps", "1", "--scale", "1", "--n", "2", "--batch-size", "2",
                      "--out", str(out), "--embedding", str(f1), "--embedding", str(f2),
                      "--prompt", "a <a> next to a <b>"])
    assert rc == 0 and "warning" not in capsys.readouterr().err
    for name in ("00000-0.png", "00001-1.png", "grid-00000.png"):
        im = Image.open(out / name)
        assert im.text["embeddings"] == "a.safetensors, <b>.pt"
        assert im.text["prompt"] == "a <a> next to a <b>"


def test_sample_cli_warns_of_a_learned_word_that_no_file_defines(tmp_path, ckpt, capsys):
    f1 = save_embeddings(tmp_path / "a.safetensors", {"<a>": vectors(1, 1)})
    rc = sample.main(["--ckpt", str(ckpt), "--steps", "1", "--n", "1", "--out", str(tmp_path / "out"),
                      "--embedding", str(f1), "--prompt", "a <a> and a <A> <3", "--negative", "<blurry>"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "'<A>' in --prompt looks like a learned word, but no --embedding or --neti file defines it" in err
    assert "'<blurry>' in --negative looks like a learned word" in err
    assert "'<a>'" not in err and "<3" not in err


@pytest.mark.parametrize("bad", ["missing", "wide"])
def test_sample_cli_bad_embedding_is_one_line_and_writes_nothing(tmp_path, ckpt, bad, capsys):
    path = tmp_path / "missing.pt"
    if bad == "wide":
        path = save_embeddings(tmp_path / "wide.safetensors", {"<w>": vectors(1, width=768)})
    out = tmp_path / "o"
    rc = run(sample.main, ["--ckpt", str(ckpt), "--prompt", "a <w>", "--steps", "1", "--n", "1",
                           "--out", str(out), "--embedding", str(path)], prog="sample.py")
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error:")
    assert ("no such file" if bad == "missing" else "768 wide") in lines[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- diffusers interop

def test_our_files_load_in_diffusers_load_textual_inversion(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = randomize(StableDiffusion(tiny_config()), seed=4)  # a fresh tokenizer: new ids from 49408, as HF
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(ldm.save(model, tmp_path / "pipe"))

    toy, thing = vectors(3, 20), vectors(2, 21)
    ours = save_embeddings(tmp_path / "learned_embeds.safetensors", {"<cat-toy>": toy}, {"step": "10"})
    a1111 = save_a1111(tmp_path / "<thing>.pt", "<thing>", thing, step=10)  # diffusers takes data["name"]
    pipe.load_textual_inversion(str(ours))
    pipe.load_textual_inversion(str(a1111))

    learned = LearnedEmbeddings(model.tokenizer)
    apply_embeddings(model, learned, [ours, a1111])
    prompt = "a photo of <cat-toy> with a <thing> on it"
    theirs_prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    assert theirs_prompt == learned.expand(prompt)
    theirs_ids = pipe.tokenizer(theirs_prompt, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
    our_ids = learned.ids([prompt])
    assert torch.equal(theirs_ids, our_ids)
    with torch.no_grad():
        theirs = pipe.text_encoder(theirs_ids).last_hidden_state
        mine = model.text_encoder(our_ids, learned.mapping())
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
