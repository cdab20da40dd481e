"""Where the network's layers come from: an operations namespace, as comfy/ldm models take `operations=`.

Every weight-holding layer is made by `operations.Linear / Conv2d / GroupNorm / LayerNorm` with the
usual torch arguments plus `dtype=` and `device=`. The default is plain torch, so the library runs
without ComfyUI; ComfyUI passes its own namespace (`comfy.ops.manual_cast`, or `pick_operations(...)`'s
choice), whose layers may compute with a copy of their weights cast to the input's dtype and device.

Weights may be stored in an 8-bit float format (`STORAGE_FORMATS`, ComfyUI's `weight_dtype` choices): then only
the Linear and Conv2d weights are (`large_weights`), and their layers compute with a copy cast to the input's
dtype, as ComfyUI's casting layers do; `CastOps` is the plain torch namespace that does this.

A few fast paths need a layer's weight itself (the small-grid GEMM convolution, 1x1 convolutions on
tokens, the three region queries fused into one product). They ask `own_weights(layer)` first: it
hands out the parameters only when the layer computes with them as they are; a layer that casts is
called instead, so its cast, offload and weight patches are always its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import STORAGE_FORMATS

# Few rows and a wide input: MKL's sgemm re-packs the weight operand of x @ W^T on every call, while in
# W @ x^T the weight is the streamed operand (measured on CPU, float32, cold weights: 10-25 % faster at
# 8-64 rows for 1280-wide inputs, no gain below 1024 or above 64 rows). x^T must be the transposed view
# of a row-major x: given a column-major x^T instead, MKL splits the product worse across threads (two
# threads gain 1.4-1.6x instead of 2.0-2.2x on these shapes, with cold weights; one thread is the same).
SMALL_ROWS, WIDE_INPUT = 64, 1024


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear`, computed as (W x^T)^T for few rows of a wide float32 input on the CPU."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > SMALL_ROWS or x.shape[-1] < WIDE_INPUT or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    # (x often arrives column-major: the transposed output of the previous product, kept by elementwise ops)
    xt = x.reshape(rows, -1).contiguous().t()
    return weight_product(weight, xt, bias).t().reshape(*x.shape[:-1], -1)


def weight_product(weight: torch.Tensor, xt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`weight @ xt (+ bias)` for `xt` the transposed view of a row-major matrix (see SMALL_ROWS)."""
    return torch.mm(weight, xt) if bias is None else torch.addmm(bias[:, None], weight, xt)


class Linear(nn.Linear):
    """`nn.Linear` through `linear` (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class TorchOps:
    """The plain torch layers (the library's default namespace)."""

    Linear = Linear
    Conv2d = nn.Conv2d
    GroupNorm = nn.GroupNorm
    LayerNorm = nn.LayerNorm


class CastLinear(Linear):
    """`Linear` computing with its weight and bias cast to the input's dtype (they may be stored in fp8)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class CastConv2d(nn.Conv2d):
    """`nn.Conv2d` (zero padding) computing with its weight and bias cast to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups)


class CastOps(TorchOps):
    """Plain torch layers whose Linear and Conv2d weights may be stored in another dtype than they compute in
    (the library's namespace for `STORAGE_FORMATS`)."""

    Linear = CastLinear
    Conv2d = CastConv2d


def large_weights(module: nn.Module) -> set[str]:
    """State-dict keys of the weights of its Linear and Conv2d layers (ComfyUI's layers subclass them too): the
    tensors a storage format applies to. Norms, biases and buffers keep the model's dtype."""
    return {f"{name}.weight" if name else "weight" for name, m in module.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module computes in: that of its first floating parameter not stored in a storage format
    (the library keeps norms and biases in the compute dtype)."""
    stored = set(STORAGE_FORMATS.values())
    return next(p.dtype for p in module.parameters() if p.is_floating_point() and p.dtype not in stored)


def own_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`(weight, bias)` of a layer that computes with its parameters as they are, else None.

    A layer casts when it says so the way ComfyUI's layers do (`comfy.ops.CastWeightBiasOp`): its
    `comfy_cast_weights` flag (set by `manual_cast`, or per layer by ComfyUI's partial loading) or
    patch functions in `weight_function` / `bias_function`; the test is the one their forward makes. The
    library's own casting layers (`CastOps`) always cast."""
    if isinstance(layer, (CastLinear, CastConv2d)):
        return None
    # The class test keeps plain torch layers off nn.Module's slow attribute fallback.
    if getattr(type(layer), "comfy_cast_weights", None) is not None and (
            layer.comfy_cast_weights or layer.weight_function or layer.bias_function):
        return None
    return layer.weight, layer.bias
