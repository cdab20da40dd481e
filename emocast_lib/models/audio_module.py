"""Audio modules of the denoising UNet: emotive audio attention and mask-gated audio cross-attention."""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, FeedForward
from .blocks import pointwise, to_grid, to_tokens

REGIONS = ("full", "face", "lip")


class AudioBlock(nn.Module):
    def __init__(self, dim: int, heads: int, audio_dim: int, emo_dim: int, token_dim: int, emo_head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, dim // heads)
        # Emotion tokens query the audio tokens: emotion-aware audio context (77 tokens).
        self.attn_audioemo = Attention(emo_dim, token_dim, heads, emo_head_dim, out_dim=emo_dim)
        self.postnorm_audioemo = nn.LayerNorm(emo_dim)
        self.norm2 = nn.LayerNorm(dim)
        for i, region in enumerate(REGIONS):
            setattr(self, f"attn2_{i}", Attention(dim, audio_dim, heads, dim // heads))
            setattr(self, f"zero_conv_{region}", nn.Conv2d(dim, dim, 1))
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def prepare(self, audio: torch.Tensor, emotion: torch.Tensor) -> list:
        """Step-invariant part: the emotive context and its key/value projections for the three
        region attentions. audio (rows, T, Da), emotion (rows, 77, D)."""
        z = self.postnorm_audioemo(self.attn_audioemo(emotion, audio))
        return [getattr(self, f"attn2_{i}").kv(z) for i in range(3)]

    def forward(self, x: torch.Tensor, kvs: list, masks: list[torch.Tensor], scales) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        n2 = self.norm2(x)
        out = x
        for i, region in enumerate(REGIONS):
            # The mask gates before the 1x1 conv, so the conv bias reaches every position.
            y = getattr(self, f"attn2_{i}")(n2, kv=kvs[i]) * masks[i][:, :, None]
            out = out + scales[i] * pointwise(getattr(self, f"zero_conv_{region}"), y)
        return out + self.ff(self.norm3(out))


class AudioModule(nn.Module):
    def __init__(self, c: int, inner: int, heads: int, groups: int, audio_dim: int, emo_dim: int,
                 token_dim: int, emo_head_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.proj_in = nn.Conv2d(c, inner, 1)
        self.transformer_blocks = nn.ModuleList([AudioBlock(inner, heads, audio_dim, emo_dim, token_dim, emo_head_dim)])
        self.proj_out = nn.Conv2d(inner, c, 1)

    def prepare(self, audio: torch.Tensor, emotion: torch.Tensor) -> list:
        return self.transformer_blocks[0].prepare(audio, emotion)

    def forward(self, x: torch.Tensor, kvs: list, masks: list[torch.Tensor], scales) -> torch.Tensor:
        h, w = x.shape[-2:]
        t = self.transformer_blocks[0](pointwise(self.proj_in, to_tokens(self.norm(x))), kvs, masks, scales)
        return x + to_grid(pointwise(self.proj_out, t), h, w)
