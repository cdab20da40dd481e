"""Audio modules of the denoising UNet: emotive audio attention and mask-gated audio cross-attention
(emocast/models/transformer_3d_text.py, `Transformer3DModel` with `use_audio_module`, whose block is
`AudioTemporalBasicTransformerBlock` of emocast/models/attention_text.py)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import REGIONS
from .attention import Attention, FeedForward, attend
from .blocks import pointwise, to_grid, to_tokens
from .ops import TorchOps, linear, own_weights


class AudioBlock(nn.Module):
    """`AudioTemporalBasicTransformerBlock`: self-attention; the emotive audio context (emotion tokens attend
    to the audio tokens); three region cross-attentions on it, each masked and through a 1x1 conv; feed-forward."""

    def __init__(self, dim: int, heads: int, audio_dim: int, emo_dim: int, token_dim: int, emo_head_dim: int,
                 dtype=None, device=None, operations=TorchOps):
        super().__init__()
        dd = {"dtype": dtype, "device": device}
        self.norm1 = operations.LayerNorm(dim, **dd)
        self.attn1 = Attention(dim, dim, heads, dim // heads, operations=operations, **dd)
        # Emotion tokens query the audio tokens: emotion-aware audio context (77 tokens).
        self.attn_audioemo = Attention(emo_dim, token_dim, heads, emo_head_dim, out_dim=emo_dim, operations=operations,
                                       **dd)
        self.postnorm_audioemo = operations.LayerNorm(emo_dim, **dd)
        self.norm2 = operations.LayerNorm(dim, **dd)
        for i, region in enumerate(REGIONS):
            setattr(self, f"attn2_{i}", Attention(dim, audio_dim, heads, dim // heads, operations=operations, **dd))
            setattr(self, f"zero_conv_{region}", operations.Conv2d(dim, dim, 1, **dd))
        self.norm3 = operations.LayerNorm(dim, **dd)
        self.ff = FeedForward(dim, operations=operations, **dd)

    def _regions(self) -> list[Attention]:
        return [getattr(self, f"attn2_{i}") for i in range(len(REGIONS))]

    def prepare(self, audio: torch.Tensor, emotion: torch.Tensor) -> dict:
        """Step-invariant part, per clip: the emotive context Z (rows, 77, D) from emotion (rows, 77, D)
        and audio tokens (rows, T, Da), and the keys/values of the three region attentions on it,
        stacked as extra heads so the three run as one attention call."""
        # Consecutive rows with the same emotion and audio (every unconditional row) are computed once.
        repeat = (audio[1:] == audio[:-1]).flatten(1).all(1) & (emotion[1:] == emotion[:-1]).flatten(1).all(1)
        same = torch.cat([torch.zeros(1, dtype=torch.bool, device=audio.device), repeat])
        first, group = (~same).nonzero()[:, 0], (~same).cumsum(0) - 1
        z = self.postnorm_audioemo(self.attn_audioemo(emotion[first], audio[first]))
        regions = self._regions()
        k = torch.cat([a.to_k(z) for a in regions], dim=-1)[group]
        v = torch.cat([a.to_v(z) for a in regions], dim=-1)[group]
        z = z[group]
        # Rows whose context is one repeated token (the unconditional half: silent audio makes Z equal
        # to the output bias everywhere) attend uniformly, so their result is that token's value.
        same = (z == z[:, :1]).all(dim=2).all(dim=1)
        fixed = int(same.long().cumprod(0).sum())
        # The three query projections as one product, when the layers compute with their own weights.
        own = [own_weights(a.to_q) for a in regions]
        q = torch.cat([w for w, _ in own]) if all(own) else None
        return {"q": q, "k": k[fixed:], "v": v[fixed:], "fixed": v[:fixed, 0]}

    def forward(self, x: torch.Tensor, ctx: dict, masks: list[torch.Tensor], scales) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        n2 = self.norm2(x)
        regions = self._regions()
        fixed = ctx["fixed"]
        rows = n2[len(fixed):]
        q = linear(rows, ctx["q"], None) if ctx["q"] is not None else torch.cat([a.to_q(rows) for a in regions], dim=-1)
        att = attend(q, ctx["k"], ctx["v"], regions[0].heads * len(regions))
        att = torch.cat([fixed[:, None].expand(-1, x.shape[1], -1), att])
        out = x
        for i, (attn, region) in enumerate(zip(regions, REGIONS)):
            y = attn.to_out[0](att.chunk(len(regions), dim=-1)[i])
            # The mask gates before the 1x1 conv, so the conv bias reaches every position.
            out = out + scales[i] * pointwise(getattr(self, f"zero_conv_{region}"), y * masks[i][:, :, None])
        return out + self.ff(self.norm3(out))


class AudioModule(nn.Module):
    """`Transformer3DModel` with `use_audio_module`: GroupNorm, 1x1 conv to the inner width, one `AudioBlock`,
    1x1 conv back, residual."""

    def __init__(self, c: int, inner: int, heads: int, groups: int, audio_dim: int, emo_dim: int,
                 token_dim: int, emo_head_dim: int, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        dd = {"dtype": dtype, "device": device}
        self.norm = operations.GroupNorm(groups, c, eps=1e-6, **dd)
        self.proj_in = operations.Conv2d(c, inner, 1, **dd)
        self.transformer_blocks = nn.ModuleList([AudioBlock(inner, heads, audio_dim, emo_dim, token_dim, emo_head_dim,
                                                            operations=operations, **dd)])
        self.proj_out = operations.Conv2d(inner, c, 1, **dd)

    def prepare(self, audio: torch.Tensor, emotion: torch.Tensor) -> dict:
        return self.transformer_blocks[0].prepare(audio, emotion)

    def forward(self, x: torch.Tensor, kvs: dict, masks: list[torch.Tensor], scales) -> torch.Tensor:
        h, w = x.shape[-2:]
        t = self.transformer_blocks[0](pointwise(self.proj_in, to_tokens(self.norm(x))), kvs, masks, scales)
        return x + to_grid(pointwise(self.proj_out, t), h, w)
