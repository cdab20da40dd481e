"""Where the network's layers come from: an operations namespace, as comfy/ldm models take `operations=`.

Every weight-holding layer is made by `operations.Linear / Conv2d / GroupNorm / LayerNorm` with the
usual torch arguments plus `dtype=` and `device=`. The default is plain torch, so the library runs
without ComfyUI; ComfyUI passes its own namespace (`comfy.ops.manual_cast`, or `pick_operations(...)`'s
choice), whose layers may compute with a copy of their weights cast to the input's dtype and device.

A few fast paths need a layer's weight itself (the small-grid GEMM convolution, 1x1 convolutions on
tokens, the three region queries fused into one product). They ask `own_weights(layer)` first: it
hands out the parameters only when the layer computes with them as they are; a layer that casts is
called instead, so its cast, offload and weight patches are always its own.
"""
from __future__ import annotations

import torch
from torch import nn


class TorchOps:
    """The plain torch layers (the library's default namespace)."""

    Linear = nn.Linear
    Conv2d = nn.Conv2d
    GroupNorm = nn.GroupNorm
    LayerNorm = nn.LayerNorm


def own_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`(weight, bias)` of a layer that computes with its parameters as they are, else None.

    A layer casts when it says so the way ComfyUI's layers do (`comfy.ops.CastWeightBiasOp`): its
    `comfy_cast_weights` flag (set by `manual_cast`, or per layer by ComfyUI's partial loading) or
    patch functions in `weight_function` / `bias_function`; the test is the one their forward makes."""
    # The class test keeps plain torch layers off nn.Module's slow attribute fallback.
    if getattr(type(layer), "comfy_cast_weights", None) is not None and (
            layer.comfy_cast_weights or layer.weight_function or layer.bias_function):
        return None
    return layer.weight, layer.bias
