"""--half-weights (ldm/half_weights.py): the large weights kept in fp16, the arithmetic float32's.

A model whose weights already hold fp16 values computes the same numbers with them stored in
fp16, forward and backward, in half the memory, and keeps less for the backward pass; the
command lines learn and draw the same numbers from an fp16 file with and without the flag."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import invert
import ldm
import ldm.conv
import sample
from ldm.cli import run
from ldm.half_weights import HalfConv2d, HalfEmbedding, HalfLinear, half_weight_names, keep_weights_in_fp16
from ldm.load import model_weights_hash


def rounded_to_fp16(model):
    """A float32 copy of `model` whose layer weights hold fp16 values: what half weights compute with."""
    model = copy.deepcopy(model)
    for key in half_weight_names(model):
        weight = model.get_parameter(key)
        weight.data = weight.data.half().float()
    return model


@pytest.fixture
def pair(model):
    """(float32 model with fp16-valued weights, the same model with those weights stored in fp16)."""
    full = rounded_to_fp16(model).requires_grad_(False)
    return full, keep_weights_in_fp16(copy.deepcopy(full))


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_same_names_half_the_bytes(pair):
    full, half = pair
    assert list(half.state_dict()) == list(full.state_dict())
    names = half_weight_names(half)
    assert "model.diffusion_model.input_blocks.0.0.weight" in names  # a U-Net convolution
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in names
    assert "first_stage_model.decoder.conv_out.weight" in names  # the VAE's nn.Conv2d
    for key, tensor in half.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == (torch.float16 if key in names else torch.float32), key
    assert weight_bytes(half) < 0.55 * weight_bytes(full)
    kinds = {type(m) for m in half.modules()}
    assert {HalfLinear, HalfConv2d, HalfEmbedding} <= kinds and not kinds & {torch.nn.Linear, torch.nn.Conv2d}
    assert half.dtype == torch.float32  # what the model computes in, for its inputs


def test_same_numbers_forward_and_backward(pair):
    full, half = pair
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    assert torch.equal(full.encode_prompts(["a photo of a toy", "x"]), half.encode_prompts(["a photo of a toy", "x"]))
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    assert torch.equal(full.encode_images(images, sample=False), half.encode_images(images, sample=False))
    assert torch.equal(full.decode_latents(x), half.decode_latents(x))
    text = torch.randn(2, 77, 32, generator=g)
    results = []
    for m in (full, half):
        context = text.clone().requires_grad_(True)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: kept.append(s.numel() * s.element_size()) or s,
                                                      lambda s: s):
            out = m.unet(x, t, context)
        out.pow(2).mean().backward()
        results.append((out.detach(), context.grad, sum(kept)))
    (out, grad, kept), (out_h, grad_h, kept_h) = results
    assert torch.equal(out, out_h)
    assert torch.equal(grad_h, grad)
    # A layer keeps its fp16 weight, not its input: less is kept for the backward pass.
    assert kept_h < 0.8 * kept, (kept_h, kept)


def test_matrix_product_convolution_keeps_its_path_and_gradient(monkeypatch):
    """A large-weight convolution on a small image (ldm/conv.py's matrix-product path) takes that
    path with fp16 weights too, forward and backward, with the same numbers."""
    monkeypatch.setattr(ldm.conv, "MATMUL_MIN_WEIGHT", 100)
    calls = []
    as_matmul = ldm.conv.conv2d_as_matmul
    monkeypatch.setattr(ldm.half_weights, "conv2d_as_matmul", lambda *a: calls.append(1) or as_matmul(*a))
    torch.manual_seed(0)
    for stride in (1, 2):
        calls.clear()  # each stride takes the path itself
        conv = ldm.conv.Conv2d(8, 16, 3, stride=stride, padding=1).requires_grad_(False)
        conv.weight.data = conv.weight.data.half().float()
        half = keep_weights_in_fp16(copy.deepcopy(conv))
        x = torch.randn(2, 8, 6, 6)
        (x1, x2) = (x.clone().requires_grad_(True) for _ in range(2))
        y, y_h = conv(x1), half(x2)
        assert torch.equal(y, y_h) and calls
        grad = torch.randn_like(y)
        y.backward(grad), y_h.backward(grad)
        assert torch.equal(x2.grad, x1.grad)


def test_refuses_trainable_or_non_float32_weights():
    with pytest.raises(ValueError, match="frozen"):
        keep_weights_in_fp16(torch.nn.Linear(4, 4))
    trainable_bias = torch.nn.Linear(4, 4)
    trainable_bias.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):  # its gradient would be lost
        keep_weights_in_fp16(trainable_bias)
    with pytest.raises(ValueError, match="float32"):
        keep_weights_in_fp16(torch.nn.Linear(4, 4).to(torch.bfloat16).requires_grad_(False))


@pytest.fixture(scope="module")
def fp16_ckpt(ckpt, tmp_path_factory):
    """The shared random checkpoint saved as an fp16 file: its weights hold fp16 values."""
    return ldm.save(ldm.load(ckpt), tmp_path_factory.mktemp("fp16") / "tiny-fp16.safetensors", dtype=torch.float16)


def test_load_reads_straight_into_fp16(fp16_ckpt):
    full, half = ldm.load(fp16_ckpt), ldm.load(fp16_ckpt, half_weights=True)
    names = half_weight_names(half)
    assert all(half.get_parameter(k).dtype == torch.float16 for k in names)
    assert all(torch.equal(half.state_dict()[k].float(), v) for k, v in full.state_dict().items())
    assert not any(p.requires_grad for p in half.parameters())
    assert model_weights_hash(half) == model_weights_hash(full)  # learned files name the same base model
    with pytest.raises(ValueError, match="float32"):
        ldm.load(fp16_ckpt, dtype=torch.bfloat16, half_weights=True)


def spy_on_half_layers(monkeypatch) -> list:
    """A list that each fp16-weight convolution appends to when it runs."""
    used, forward = [], HalfConv2d.forward
    monkeypatch.setattr(HalfConv2d, "forward", lambda self, x: used.append(1) or forward(self, x))
    return used


@pytest.mark.parametrize("method, learned", [("ti", "learned_embeds.safetensors"), ("neti", "neti_mapper.safetensors"),
                                             ("hiper", "hiper_tail.safetensors")])
def test_invert_learns_the_same_numbers_from_an_fp16_file(fp16_ckpt, image_folder, tmp_path, capsys, monkeypatch,
                                                          method, learned):
    data = (["--image", str(image_folder / "0.png"), "--source", "a toy"] if method == "hiper"
            else ["--images", str(image_folder), "--placeholder", "<toy>", "--init-word", "toy"])
    base = ["--method", method, "--ckpt", str(fp16_ckpt), *data, "--batch", "2", "--steps", "2"]
    used = spy_on_half_layers(monkeypatch)
    files = {}
    for flag in ([], ["--half-weights"]):
        out = tmp_path / ("half" if flag else "plain")
        used.clear()
        assert run(invert.main, base + flag + ["--out", str(out)], prog="invert.py") == 0, capsys.readouterr().err
        assert bool(used) == bool(flag)  # the flag reached the model
        files[bool(flag)] = load_file(out / learned)
    assert files[True].keys() == files[False].keys()
    assert all(torch.equal(files[True][k], files[False][k]) for k in files[False])


def test_sample_draws_the_same_image_from_an_fp16_file(fp16_ckpt, tmp_path, monkeypatch):
    used = spy_on_half_layers(monkeypatch)
    pixels = {}
    for flag in ([], ["--half-weights"]):
        out = tmp_path / ("half" if flag else "plain")
        used.clear()
        assert sample.main(["--ckpt", str(fp16_ckpt), "--prompt", "a toy", "--n", "1", "--steps", "2",
                            "--out", str(out)] + flag) == 0
        assert bool(used) == bool(flag)
        pixels[bool(flag)] = np.asarray(Image.open(out / "00000-0.png"))
    assert np.array_equal(pixels[True], pixels[False])


@pytest.mark.parametrize("main, prog, argv", [
    (invert.main, "invert.py", ["--steps", "1"]),
    (sample.main, "sample.py", ["--prompt", "a toy", "--n", "1", "--steps", "1"])])
def test_half_weights_with_half_precision_is_one_line(fp16_ckpt, tmp_path, capsys, main, prog, argv):
    rc = run(main, argv + ["--ckpt", str(fp16_ckpt), "--half-weights", "--precision", "bf16",
                           "--out", str(tmp_path / "out")], prog=prog)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "--half-weights keeps fp16 weights for fp32 arithmetic" in err[0] and "--precision fp32" in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
