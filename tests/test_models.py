"""Model building blocks: fast paths equal the plain PyTorch operation they replace, and the network
built from a casting operations namespace (as ComfyUI passes it) computes what the plain one does."""
from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from tiny_run import run_tiny
from torch import nn

from emocast_lib.bench.tiny import TINY_NET, filled_net, filled_vae
from emocast_lib.models import EmoCASTNet
from emocast_lib.models.blocks import conv2d
from emocast_lib.models.ops import SMALL_ROWS, WIDE_INPUT, linear
from emocast_lib.pipeline import diffusers_vae


@pytest.mark.parametrize("side", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("stride,bias", [(1, True), (2, True), (1, False)])
def test_small_grid_conv_equals_conv2d(side: int, stride: int, bias: bool):
    torch.manual_seed(side)
    conv = nn.Conv2d(16, 24, 3, stride=stride, padding=1, bias=bias)
    x = torch.randn(3, 16, side, side)
    torch.testing.assert_close(conv2d(conv, x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [2, 12, SMALL_ROWS, SMALL_ROWS + 1])
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_few_row_linear_equals_f_linear(rows: int, column_major: bool, bias: bool):
    """The W x^T path (few rows of a wide input) computes F.linear, whatever the input's memory layout
    (a column-major input is what a previous W x^T product hands on)."""
    torch.manual_seed(rows)
    width = WIDE_INPUT + 256
    weight, b = torch.randn(96, width) / width**0.5, torch.randn(96) if bias else None
    x = torch.randn(width, 1, rows).permute(1, 2, 0) if column_major else torch.randn(1, rows, width)
    assert x.is_contiguous() != column_major
    y = linear(x, weight, b)
    assert y.shape == (1, rows, 96)
    torch.testing.assert_close(y, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_small_grid_conv_under_inference_mode_and_weight_change():
    """ComfyUI builds and runs models under inference_mode; the cached centre tap follows the weight."""
    with torch.inference_mode():
        conv = nn.Conv2d(8, 8, 3, padding=1)
        x = torch.randn(2, 8, 1, 1)
        first = conv2d(conv, x)
        conv.weight = nn.Parameter(conv.weight * 2, requires_grad=False)
        torch.testing.assert_close(conv2d(conv, x) - conv.bias[:, None, None], 2 * (first - conv.bias[:, None, None]))


class _FakeComfyCastLayer:
    """Stand-in for ComfyUI's casting layers (`comfy.ops.manual_cast`; ComfyUI is not importable in the
    library's tests): the same `CastWeightBiasOp` flags, and a forward that computes with the weights
    cast to the input's dtype and device. `offloaded` holds the real weights while the parameters are
    meta-device stand-ins, as ComfyUI keeps part of a model on its offload device."""

    comfy_cast_weights = True
    weight_function: ClassVar[list] = []
    bias_function: ClassVar[list] = []
    offloaded: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def cast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = self.offloaded or (self.weight, self.bias)
        return weight.to(x.device, x.dtype), None if bias is None else bias.to(x.device, x.dtype)


class FakeComfyManualCast:
    """Operations namespace standing in for `comfy.ops.manual_cast`."""

    class Linear(_FakeComfyCastLayer, nn.Linear):
        def forward(self, x):
            return F.linear(x, *self.cast(x))

    class Conv2d(_FakeComfyCastLayer, nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, *self.cast(x))

    class GroupNorm(_FakeComfyCastLayer, nn.GroupNorm):
        def forward(self, x):
            return F.group_norm(x, self.num_groups, *self.cast(x), self.eps)

    class LayerNorm(_FakeComfyCastLayer, nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, *self.cast(x), self.eps)


@pytest.mark.parametrize("dtype,tol", [
    # fp64: the two runs agree below fp32's resolution, so any wrong weight or order of regions shows.
    (torch.float64, 1e-6),
    # fp32: the plain run takes the GEMM convolutions and the fused region queries, the casting run the
    # layers' own convolutions and three query products: the same sums in another order, which two
    # clips of DDIM through the tiny fill-rule network amplify to 6.8e-4 (measured; latents' std 1.5).
    (torch.float32, 2e-3),
])
def test_casting_operations_compute_what_the_plain_network_computes(dtype: torch.dtype, tol: float):
    """The network on a ComfyUI-like casting namespace, weights stored as bf16 on an offload stand-in
    (the `meta` device: a layer read without its cast fails there), equals the plain network holding
    the same bf16-rounded weights in the compute dtype. Only the layers' own casts touch weights."""
    stored = {k: v.to(torch.bfloat16) for k, v in filled_net().state_dict().items()}
    plain = EmoCASTNet(TINY_NET, device="meta")
    plain.load_state_dict({k: v.to(dtype) for k, v in stored.items()}, assign=True)
    cast = EmoCASTNet(TINY_NET, device="meta", operations=FakeComfyManualCast)
    cast.load_state_dict(stored, assign=True)
    layers = [m for m in cast.modules() if isinstance(m, _FakeComfyCastLayer)]
    kinds = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
    assert len(layers) == sum(isinstance(m, kinds) for m in plain.modules())  # every layer came from `operations`
    for layer in layers:
        layer.offloaded = (layer.weight.detach(), None if layer.bias is None else layer.bias.detach())
        for name in ("weight", "bias"):
            if getattr(layer, name) is not None:
                setattr(layer, name, nn.Parameter(getattr(layer, name).to("meta"), requires_grad=False))

    vae = diffusers_vae(filled_vae())
    expected_latents, expected_frames = run_tiny(plain.eval(), vae)
    latents, frames = run_tiny(cast.eval(), vae, device="cpu", dtype=dtype)
    torch.testing.assert_close(latents, expected_latents, rtol=tol, atol=tol)
    torch.testing.assert_close(frames, expected_frames, rtol=tol, atol=tol)
