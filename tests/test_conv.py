"""ldm.conv.Conv2d: the CPU layers it computes as one matrix product, and that it computes them
like nn.Conv2d, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from ldm.conv import Conv2d


def layer(c_in, c_out, k=3, stride=1):
    torch.manual_seed(0)
    return Conv2d(c_in, c_out, k, stride=stride, padding=k // 2).requires_grad_(False)


@pytest.mark.parametrize("c_in, c_out, stride, batch, size", [
    (1280, 1280, 1, 1, 8),   # SD's U-Net at 256 px, lowest levels
    (2560, 1280, 1, 2, 4),   # an output block's first convolution, batch 2 (guidance)
    (1280, 1280, 2, 1, 8),   # the last Downsample, 8×8 -> 4×4
])
def test_large_weights_on_small_images_are_a_matrix_product_equal_to_the_convolution(c_in, c_out, stride, batch, size):
    conv = layer(c_in, c_out, stride=stride)
    x = torch.randn(batch, c_in, size, size, requires_grad=True)
    assert conv.use_matmul(x)
    y = conv(x)
    expected = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    assert y.shape == expected.shape
    assert torch.allclose(y, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    (expected_grad,) = torch.autograd.grad(expected, x, g)
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-4 * expected_grad.abs().max().item())


def test_small_weights_large_images_other_dtypes_and_1x1_layers_stay_ordinary_convolutions():
    big = layer(1280, 1280)
    assert not big.use_matmul(torch.randn(1, 1280, 32, 32))           # 1,024 positions
    assert not big.use_matmul(torch.randn(1, 1280, 24, 24))           # 576 positions
    assert not big.use_matmul(torch.randn(1, 1280, 8, 8, dtype=torch.bfloat16))
    assert not layer(320, 320).use_matmul(torch.randn(1, 320, 4, 4))  # 0.9 M weights
    assert not layer(1280, 1280, k=1).use_matmul(torch.randn(1, 1280, 4, 4))
    x = torch.randn(1280, 4, 4)                                       # unbatched, as nn.Conv2d allows
    assert not big.use_matmul(x) and big(x).shape == (1280, 4, 4)


def test_an_image_gets_the_same_numbers_in_any_batch():
    """The rule looks at one image's size, not the batch's, and the product is taken image by image:
    a seed's image is bit for bit the same alone or among others (sample.py's promise on the CPU)."""
    conv = layer(2560, 1280)
    x = torch.randn(8, 2560, 8, 8)
    alone = [conv(x[i:i + 1]) for i in range(8)]
    for batch in (2, 3, 8):
        assert conv.use_matmul(x[:batch])
        together = conv(x[:batch])
        assert all(torch.equal(together[i:i + 1], alone[i]) for i in range(batch)), batch
