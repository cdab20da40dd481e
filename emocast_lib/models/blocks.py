"""SD1.5 building blocks shared by both UNets. Frames are folded into the batch (row b*f + k),
so every block here is per frame, as in the released "inflated" 3-D UNet (Hallo's hallo/models/resnet.py
runs diffusers' 2-D layers on every frame)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KV, Attention, DecoupledCrossAttention, FeedForward, attend
from .ops import TorchOps, linear, own_weights, weight_product


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, cosine half first, frequency shift 0 (SD's `flip_sin_to_cos`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1, 1).float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """diffusers' `TimestepEmbedding` (embeddings.py): linear, SiLU, linear."""

    def __init__(self, dim: int, out: int, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.linear_1 = operations.Linear(dim, out, dtype=dtype, device=device)
        self.linear_2 = operations.Linear(out, out, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


SMALL_GRID = 16  # grid cells up to which the GEMM convolution wins (measured on CPU at the released widths)


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`, run as a single GEMM on small CPU inputs. At the released widths the deep levels
    have 1x1-4x4 grids, where oneDNN re-lays out the (large) weights on every call and is 3-4x
    slower than im2col + one matrix product; on a 1x1 grid a padded 3x3 kernel reduces to its centre."""
    n, _, h, w = x.shape
    own = own_weights(conv) if x.device.type == "cpu" and h * w <= SMALL_GRID and conv.groups == 1 else None
    if own is None:
        return conv(x)
    weight, bias = own
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    if h == w == 1 and s == (1, 1) and p == (k[0] // 2, k[1] // 2):
        return linear(x.flatten(1), _centre(conv, weight), bias)[:, :, None, None]
    cols = F.unfold(x, k, conv.dilation, p, s)  # (n, cin*kh*kw, L)
    oh, ow = (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1
    y = weight_product(weight.flatten(1), cols.transpose(1, 2).reshape(-1, cols.shape[1]).t(), bias)
    return y.view(-1, n, oh, ow).transpose(0, 1).contiguous()


def _centre(conv: nn.Conv2d, weight: torch.Tensor) -> torch.Tensor:
    """Contiguous copy of the centre tap, kept on the layer and remade only when its weight tensor
    changes (slicing it on every call costs more than the product itself)."""
    # Inference tensors (ComfyUI loads models under inference_mode) have no version counter; they
    # cannot be modified in place either, so their address identifies them.
    key = (weight.data_ptr(), weight.dtype, 0 if weight.is_inference() else weight._version)
    if getattr(conv, "_centre_key", None) != key:
        p = conv.padding
        conv._centre_weight = weight.detach()[:, :, p[0], p[1]].contiguous()
        conv._centre_key = key
    return conv._centre_weight


class ResnetBlock(nn.Module):
    """hallo/models/resnet.py `ResnetBlock3D` (diffusers' `ResnetBlock2D` per frame)."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        dd = {"dtype": dtype, "device": device}
        self.norm1 = operations.GroupNorm(groups, cin, eps=1e-5, **dd)
        self.conv1 = operations.Conv2d(cin, cout, 3, padding=1, **dd)
        self.time_emb_proj = operations.Linear(temb, cout, **dd)
        self.norm2 = operations.GroupNorm(groups, cout, eps=1e-5, **dd)
        self.conv2 = operations.Conv2d(cout, cout, 3, padding=1, **dd)
        self.conv_shortcut = operations.Conv2d(cin, cout, 1, **dd) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = conv2d(self.conv1, F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = conv2d(self.conv2, F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else conv2d(self.conv_shortcut, x)) + h


class Downsample(nn.Module):
    """hallo/models/resnet.py `Downsample3D`: a strided 3x3 convolution."""

    def __init__(self, c: int, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.conv = operations.Conv2d(c, c, 3, stride=2, padding=1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(self.conv, x)


class Upsample(nn.Module):
    """hallo/models/resnet.py `Upsample3D`: nearest x2, then a 3x3 convolution."""

    def __init__(self, c: int, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.conv = operations.Conv2d(c, c, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(self.conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))


def pointwise(conv: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv applied to tokens (B, L, C) directly: it is a per-token linear map."""
    own = own_weights(conv)
    if own is None:  # a casting layer computes itself, on a (B, C, L, 1) grid
        return conv(t.transpose(1, 2)[..., None])[..., 0].transpose(1, 2)
    return linear(t, own[0].flatten(1), own[1])


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def to_grid(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], -1, h, w)


class TransformerBlock(nn.Module):
    """emocast/models/attention_text.py `BasicTransformerBlock`: self-attention, decoupled text/identity
    cross-attention, GEGLU feed-forward; `write`/`read` are the two modes emocast/models/
    mutual_self_attention_text.py's `ReferenceAttentionControl` gives it."""

    def __init__(self, dim: int, heads: int, context_dim: int, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        dd = {"dtype": dtype, "device": device}
        self.norm1 = operations.LayerNorm(dim, **dd)
        self.attn1 = Attention(dim, dim, heads, dim // heads, operations=operations, **dd)
        self.norm2 = operations.LayerNorm(dim, **dd)
        self.attn2 = DecoupledCrossAttention(dim, context_dim, heads, dim // heads, operations=operations, **dd)
        self.norm3 = operations.LayerNorm(dim, **dd)
        self.ff = FeedForward(dim, operations=operations, **dd)

    def write(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference pass: a plain block that also returns its normed input (the reference feature)."""
        n = self.norm1(x)
        x = x + self.attn1(n, n)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x)), n

    def read(self, x: torch.Tensor, ref_kv: KV, cross_kv, uncond: int) -> torch.Tensor:
        """Denoising pass. Rows are [uncond frames (the first `uncond` rows: all or none of them), cond
        frames]. The unconditional half attends to itself only; conditional frame j (row f + j of the
        full CFG batch) also attends to the reference-frame features of CFG half `(f + j) mod 2`
        (`ref_kv`, 2 rows) — the released row-parity pairing, kept for parity."""
        n = self.norm1(x)
        a = self.attn1
        q, k, v = a.to_q(n), a.to_k(n), a.to_v(n)
        u, f = uncond, x.shape[0] - uncond
        parity = torch.arange(f, 2 * f, device=x.device) % 2
        kc = torch.cat([k[u:], ref_kv[0][parity]], dim=1)
        vc = torch.cat([v[u:], ref_kv[1][parity]], dim=1)
        out = attend(q[u:], kc, vc, a.heads)
        if u:
            out = torch.cat([attend(q[:u], k[:u], v[:u], a.heads), out])
        x = x + a.to_out[0](out)
        x = x + self.attn2(self.norm2(x), kv=cross_kv)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm -> 1x1 conv -> one transformer block -> 1x1 conv, residual: emocast/models/
    transformer_2d_text.py `Transformer2DModel` (reference UNet) and transformer_3d_text.py
    `Transformer3DModel` (denoising UNet, frames folded into the batch)."""

    def __init__(self, c: int, heads: int, context_dim: int, groups: int, dtype=None, device=None,
                 operations=TorchOps):
        super().__init__()
        dd = {"dtype": dtype, "device": device}
        self.norm = operations.GroupNorm(groups, c, eps=1e-6, **dd)
        self.proj_in = operations.Conv2d(c, c, 1, **dd)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(c, heads, context_dim, operations=operations, **dd)])
        self.proj_out = operations.Conv2d(c, c, 1, **dd)

    def _wrap(self, x: torch.Tensor, body) -> tuple[torch.Tensor, object]:
        h, w = x.shape[-2:]
        t, extra = body(pointwise(self.proj_in, to_tokens(self.norm(x))))
        return x + to_grid(pointwise(self.proj_out, t), h, w), extra

    def write(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference pass: the output and the block's normed input (the reference feature)."""
        return self._wrap(x, lambda t: self.transformer_blocks[0].write(t, context))

    def forward(self, x: torch.Tensor, ref_kv: KV, cross_kv, uncond: int) -> torch.Tensor:
        """Denoising pass (`TransformerBlock.read`); the first `uncond` rows are the unconditional half."""
        return self._wrap(x, lambda t: (self.transformer_blocks[0].read(t, ref_kv, cross_kv, uncond), None))[0]


class Stage(nn.Module):
    """One down, mid or up stage: resnets, each followed by the stage's attention where it has one,
    then a down or up sampler. emocast/models/unet_3d_blocks_text.py (`CrossAttnDownBlock3D`,
    `DownBlock3D`, `UNetMidBlock3DCrossAttn`, `CrossAttnUpBlock3D`, `UpBlock3D`) and the 2-D blocks
    of unet_2d_blocks_text.py; the module names are theirs, so the state dict is the checkpoint's."""

    def __init__(self, kind: str, resnets, attentions=(), audio_modules=(), motion_modules=(), sampler=None):
        super().__init__()
        self.kind = kind  # "down", "mid" or "up"
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        if audio_modules:
            self.audio_modules = nn.ModuleList(audio_modules)
        if motion_modules:
            self.motion_modules = nn.ModuleList(motion_modules)
        if sampler is not None:  # checkpoint keys `downsamplers.0` / `upsamplers.0`
            setattr(self, f"{kind}samplers", nn.ModuleList([sampler]))

    @property
    def sampler(self) -> nn.Module | None:
        samplers = getattr(self, f"{self.kind}samplers", None)
        return None if samplers is None else samplers[0]

    def forward(self, x: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor],
                after: Callable[[int, torch.Tensor], torch.Tensor], sample: bool = True) -> torch.Tensor:
        """SD's skip connections: a down stage appends the output of each resnet (with what follows it)
        and of its sampler to `skips`; an up stage joins the last of them to each resnet's input.
        `after(j, x)` runs what follows resnet j (it differs between the two UNets). `sample=False`
        leaves the sampler out (its output only feeds deeper stages)."""
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1) if self.kind == "up" else x, temb)
            if j < len(self.attentions):  # the mid stage: resnet, attention, resnet
                x = after(j, x)
            if self.kind == "down":
                skips.append(x)
        if self.sampler is not None and sample:
            x = self.sampler(x)
            if self.kind == "down":
                skips.append(x)
        return x
