import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"

from ldm.config import ModelConfig, UNetConfig, VAEConfig, CLIPTextConfig  # noqa: E402


def tiny_config() -> ModelConfig:
    """A few-hundred-kilobyte SD v1 with every kind of block: two U-Net levels with attention
    at the first only, two transformer blocks, a 2-layer text encoder."""
    return ModelConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(1,), num_heads=4, context_dim=32,
                        transformer_depth=1, norm_groups=8),
        vae=VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        text=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4),
    )


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Fill every floating parameter with noise, so zero-initialised layers are exercised too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = p.dim() == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if is_norm_scale else 0.0))
    return module


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """The results tables set torch's thread count for their process (--threads); a test that
    runs one in this process must not leave the next tests on another count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A folder of three random 24×20 RGB PNGs: training images for the command-line tests
    (one folder per test module, so that a module's changes to it stay there)."""
    import numpy as np
    from PIL import Image
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def model():
    """A random tiny_config() model at 16 px, new in each test: what the trainers learn against."""
    from ldm.model import StableDiffusion
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.image_size = 16
    return randomize(StableDiffusion(cfg), seed=1)


@pytest.fixture
def images() -> torch.Tensor:
    """Three random 16-px training images (3, 3, 16, 16) in [-1, 1]."""
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def write_random_checkpoint(folder: Path, image_size: int = 16, seed: int = 2) -> Path:
    """A random tiny_config() model saved as folder/tiny.safetensors (CompVis layout), the
    stand-in for real weights in the command-line tests."""
    import ldm
    from ldm.model import StableDiffusion
    cfg = tiny_config()
    cfg.image_size = image_size
    return ldm.save(randomize(StableDiffusion(cfg), seed=seed), Path(folder) / "tiny.safetensors")


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A random 16-px tiny checkpoint file, shared by the command-line tests."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt"))
