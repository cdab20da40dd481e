"""AnimateDiff motion module: temporal self-attention over [motion frames, clip frames].

Hallo's hallo/models/motion_module.py (from AnimateDiff's animatediff/models/motion_module.py):
`VanillaTemporalModule` -> `TemporalTransformer3DModel` -> `TemporalTransformerBlock` (two
`VersatileAttention` self-attentions with a `PositionalEncoding`, then a feed-forward)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .attention import Attention, FeedForward
from .ops import TorchOps


def sinusoidal_pe(max_len: int, width: int) -> torch.Tensor:
    """Motion-module temporal position table (1, max_len, width): sin on even, cos on odd channels."""
    position = torch.arange(max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
    pe = torch.zeros(1, max_len, width)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


class _PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int, dtype=None, device=None):
        super().__init__()
        self.register_buffer("pe", sinusoidal_pe(max_len, dim).to(device=device, dtype=dtype))


class TemporalAttention(Attention):
    def __init__(self, dim: int, heads: int, max_len: int, dtype=None, device=None, operations=TorchOps):
        super().__init__(dim, dim, heads, dim // heads, dtype=dtype, device=device, operations=operations)
        self.pos_encoder = _PositionalEncoding(dim, max_len, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The position table is added to the attention input only, not to the residual stream; it
        # follows the input like the layers' weights (a no-op unless the model is cast or offloaded).
        x = x + self.pos_encoder.pe[:, : x.shape[1]].to(x)
        return super().forward(x)


class _TemporalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        dd = {"dtype": dtype, "device": device}
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_len, operations=operations, **dd)
                                               for _ in range(2)])
        self.norms = nn.ModuleList([operations.LayerNorm(dim, **dd) for _ in range(2)])
        self.ff = FeedForward(dim, operations=operations, **dd)
        self.ff_norm = operations.LayerNorm(dim, **dd)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            t = t + attn(norm(t))
        return t + self.ff(self.ff_norm(t))


class _TemporalTransformer(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, groups: int, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        dd = {"dtype": dtype, "device": device}
        self.norm = operations.GroupNorm(groups, dim, eps=1e-6, **dd)
        self.proj_in = operations.Linear(dim, dim, **dd)
        self.transformer_blocks = nn.ModuleList([_TemporalBlock(dim, heads, max_len, operations=operations, **dd)])
        self.proj_out = operations.Linear(dim, dim, **dd)


class MotionModule(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, groups: int, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.temporal_transformer = _TemporalTransformer(dim, heads, max_len, groups, dtype=dtype, device=device,
                                                         operations=operations)

    def forward(self, x: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """x (B*f, C, h, w) clip frames; motion (B, m, C, h, w) motion-frame features.
        Returns the clip frames only (B*f, C, h, w)."""
        tt = self.temporal_transformer
        b, m, c, h, w = motion.shape
        f = x.shape[0] // b
        frames = torch.cat([motion, x.view(b, f, c, h, w)], dim=1).flatten(0, 1)  # (B*(m+f), C, h, w)
        t = tt.proj_in(tt.norm(frames).flatten(2).transpose(1, 2))  # (B*F, L, C), GroupNorm per frame
        # Attend over frames at each spatial position.
        t = t.view(b, m + f, h * w, c).transpose(1, 2).reshape(b * h * w, m + f, c)
        for block in tt.transformer_blocks:
            t = block(t)
        t = tt.proj_out(t).view(b, h * w, m + f, c)[:, :, m:]  # only the clip frames are kept
        out = t.permute(0, 2, 3, 1).reshape(b * f, c, h, w)
        return x + out
