"""The README's Python listing runs as it is, and says what it computes."""
import re

import torch

from conftest import ROOT


def test_the_python_api_listing_runs_as_written(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listing = re.search(r"## The Python API\n.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it saves copy.safetensors where it runs
    (tmp_path / "weights").symlink_to(ROOT / "weights")
    names = {}
    exec(compile(listing, "README.md", "exec"), names)
    tok, model = names["tok"], names["model"]
    assert tok.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]  # as its comment says
    assert names["ids"].shape == (1, 77) and names["context"].shape == (1, 77, 64)
    assert names["x0"].shape == (1, 4, 8, 8) and names["eps"].shape == names["x_t"].shape == (1, 4, 8, 8)
    images = names["images"]
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    copy = __import__("ldm").load(tmp_path / "copy.safetensors")
    assert torch.equal(copy.state_dict()["model.diffusion_model.out.2.bias"],
                       model.state_dict()["model.diffusion_model.out.2.bias"])
