"""Model building blocks whose fast paths must equal the plain PyTorch operation they replace."""
from __future__ import annotations

import pytest
import torch

from emocast_lib.models.blocks import Conv2d


@pytest.mark.parametrize("side", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("stride,bias", [(1, True), (2, True), (1, False)])
def test_small_grid_conv_equals_conv2d(side: int, stride: int, bias: bool):
    torch.manual_seed(side)
    ours = Conv2d(16, 24, 3, stride=stride, padding=1, bias=bias)
    plain = torch.nn.Conv2d(16, 24, 3, stride=stride, padding=1, bias=bias)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(3, 16, side, side)
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)


def test_small_grid_conv_under_inference_mode_and_weight_change():
    """ComfyUI builds and runs models under inference_mode; the cached centre tap follows the weight."""
    with torch.inference_mode():
        conv = Conv2d(8, 8, 3, padding=1)
        x = torch.randn(2, 8, 1, 1)
        first = conv(x)
        conv.weight = torch.nn.Parameter(conv.weight * 2, requires_grad=False)
        torch.testing.assert_close(conv(x) - conv.bias[:, None, None], 2 * (first - conv.bias[:, None, None]))
