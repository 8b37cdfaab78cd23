"""The frozen networks' precision while training: bf16 under autocast on a CUDA GPU that has it,
fp32 elsewhere, and no autocast for fp32 weights."""
import importlib
import types

import pytest
import torch

from inversion.precision import autocast, fp16_warning, training_dtype


def test_auto_is_fp32_on_the_cpu_and_explicit_choices_are_kept():
    cpu = torch.device("cpu")
    assert training_dtype("auto", cpu) == torch.float32
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        assert training_dtype(name, cpu) == dtype
        assert training_dtype(name, torch.device("cuda")) == dtype


@pytest.mark.parametrize("capability, expected", [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                                   ((7, 5), torch.float32)])  # A100, H100; T4
def test_auto_on_cuda_is_bf16_where_the_gpu_computes_it(monkeypatch, capability, expected):
    # fp16 weights would need a loss scaler for the new word's small gradients; fp32 needs none.
    # A T4 emulates bf16 (torch.cuda.is_bf16_supported() says yes there): slowly, and not in its convolutions
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert training_dtype("auto", torch.device("cuda")) == expected
    warned = fp16_warning(torch.float16, torch.device("cuda"))
    assert ("without a loss scaler" in warned) == (expected == torch.float32)
    assert fp16_warning(torch.float16, torch.device("cpu")) == fp16_warning(torch.float32, torch.device("cuda")) == ""


def test_no_autocast_where_this_pytorch_has_none():
    from inversion.precision import no_autocast
    with no_autocast("mps"):  # torch.autocast("mps", ...) raises before PyTorch 2.5: a plain context instead
        pass
    with torch.autocast("cpu", dtype=torch.bfloat16), no_autocast("cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_autocast_off_the_gpu(dtype):
    model = types.SimpleNamespace(device=torch.device("cpu"), dtype=dtype)
    with autocast(model):
        assert not torch.is_autocast_enabled("cpu")
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32


def test_invert_runs_with_bf16_weights_on_the_cpu(tmp_path, monkeypatch):
    import invert
    loader = importlib.import_module("ldm.load")  # the module: `ldm.load` is also its function
    loaded, load = [], loader.load
    monkeypatch.setattr(loader, "load", lambda *a, **kw: loaded.append(load(*a, **kw)) or loaded[-1])
    assert invert.main(["--steps", "2", "--no-eval", "--precision", "bf16", "--num-images", "2",
                        "--out", str(tmp_path / "run")]) == 0
    assert loaded[0].dtype == torch.bfloat16  # the frozen model trained in bf16
    from safetensors.torch import load_file
    learned = load_file(tmp_path / "run" / "learned_embeds.safetensors")
    (vector,) = learned.values()
    assert vector.dtype == torch.float32 and torch.isfinite(vector).all()
