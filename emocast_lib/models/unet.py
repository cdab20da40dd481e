"""The two UNets. The reference UNet returns its per-block features; the denoising UNet takes them
(prepared once per clip into a `ClipContext`) as an argument on every step."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..config import REGIONS, UNetConfig
from .audio_module import AudioModule
from .blocks import Downsample, ResnetBlock, SpatialTransformer, Stage, TimestepEmbedding, Upsample, timestep_embedding
from .motion import MotionModule
from .ops import TorchOps


class _UNet(nn.Module):
    """SD1.5 skeleton; the denoising variant adds audio and motion modules to every stage."""

    def __init__(self, cfg: UNetConfig, denoising: bool, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.cfg = cfg
        dd = {"dtype": dtype, "device": device, "operations": operations}
        bo, n, layers = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
        temb, g, heads, d = cfg.time_embed_dim, cfg.norm_num_groups, cfg.heads, cfg.cross_attention_dim
        self.conv_in = operations.Conv2d(cfg.in_channels, bo[0], 3, padding=1, dtype=dtype, device=device)
        self.time_embedding = TimestepEmbedding(bo[0], temb, **dd)

        def attn(c):
            return SpatialTransformer(c, heads, d, g, **dd)

        def audio(c, cx):
            # The released audio modules run at an inner width taken from another level (Ci below).
            return AudioModule(c, heads * (cx // heads), heads, g, cfg.audio_attention_dim, d,
                               cfg.audio_token_dim, cfg.emotive_head_dim, **dd)

        def motion(c):
            return MotionModule(c, cfg.motion_heads, cfg.motion_max_len, cfg.motion_norm_groups, **dd)

        def stage(resnets, cross, audio_in, c, count, sampler, name):
            return Stage(name, resnets, [attn(c) for _ in range(count)] if cross else [],
                         [audio(c, audio_in(j)) for j in range(count)] if cross and denoising else [],
                         [motion(c) for _ in range(count)] if denoising else [], sampler)

        down, cout = [], bo[0]
        for i, c in enumerate(bo):
            cin, cout = cout, c
            resnets = [ResnetBlock(cin if j == 0 else c, c, temb, g, **dd) for j in range(layers)]
            down.append(stage(resnets, i < n - 1, lambda j, i=i: bo[i - 1] if j == 0 and i > 0 else bo[i], c, layers,
                              Downsample(c, **dd) if i < n - 1 else None, "down"))
        self.down_blocks = nn.ModuleList(down)
        self.mid_block = stage([ResnetBlock(bo[-1], bo[-1], temb, g, **dd) for _ in range(2)], True, lambda j: bo[-1],
                               bo[-1], 1, None, "mid")
        up, rev, prev = [], bo[::-1], bo[-1]
        for i, c in enumerate(rev):
            skip = rev[min(i + 1, n - 1)]
            resnets = [ResnetBlock((prev if j == 0 else c) + (skip if j == layers else c), c, temb, g, **dd)
                       for j in range(layers + 1)]
            up.append(stage(resnets, i > 0, lambda j, i=i: bo[max(2 - i, 0)], c, layers + 1,
                            Upsample(c, **dd) if i < n - 1 else None, "up"))
            prev = c
        self.up_blocks = nn.ModuleList(up)
        if denoising:
            self.conv_norm_out = operations.GroupNorm(g, bo[0], eps=1e-5, dtype=dtype, device=device)
            self.conv_out = operations.Conv2d(bo[0], cfg.out_channels, 3, padding=1, dtype=dtype, device=device)

    def _time(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Embedding of timestep `t` (a scheduler's CPU tensor or one on x's device) in x's dtype and device."""
        return self.time_embedding(timestep_embedding(t.to(x.device), self.cfg.block_out_channels[0]).to(x.dtype))

    def _stages(self) -> Iterator[tuple[str, Stage, int]]:
        """(checkpoint path, stage, grid level) of every stage, in execution order."""
        n = len(self.down_blocks)
        for i, st in enumerate(self.down_blocks):
            yield f"down_blocks.{i}", st, i
        yield "mid_block", self.mid_block, n - 1
        for i, st in enumerate(self.up_blocks):
            yield f"up_blocks.{i}", st, n - 1 - i

    def _run(self, x: torch.Tensor, temb: torch.Tensor, after: Callable) -> torch.Tensor:
        """Down, mid and up stages with SD's skips; `after(path, stage, level, j, x)` runs what follows
        resnet j of a stage with attentions (it differs between the two UNets)."""
        skips = [x]
        for path, st, level in self._stages():
            x = st(x, temb, skips, partial(after, path, st, level))
        return x


class ReferenceUNet(_UNet):
    """2-D UNet run once per clip on the reference latents (timestep 0); only its features are used."""

    def __init__(self, cfg: UNetConfig, dtype=None, device=None, operations=TorchOps):
        super().__init__(cfg, denoising=False, dtype=dtype, device=device, operations=operations)

    def forward(self, sample: torch.Tensor, context: torch.Tensor) -> dict[str, torch.Tensor]:
        """sample (R, 4, h, w); context (2, N, D). Row i is paired with context row i mod 2 (the
        released tiling). Returns {attention path: normed features (R, L, C)}."""
        bank: dict[str, torch.Tensor] = {}
        # Rows are independent, so group them by context row ([0, 2, 4, 1, 3, 5]): each context's keys
        # and values are then projected once for its rows instead of once per row.
        order = torch.arange(sample.shape[0], device=sample.device).view(-1, len(context)).T.reshape(-1)
        restore = torch.argsort(order)

        def after(path, st, level, j, x):
            x, normed = st.attentions[j].write(x, context)
            bank[f"{path}.attentions.{j}"] = normed[restore]
            return x

        x = self.conv_in(sample[order])
        self._run(x, self._time(torch.zeros(1, dtype=torch.long, device=x.device), x), after)
        return bank


@dataclass
class ClipConditioning:
    """Per-clip inputs of the denoising UNet in the released layout; rows are [uncond, cond]."""

    context: torch.Tensor  # (2, 77 + 4, D) text + identity tokens, or (2f, 81, D) per frame
    face_features: torch.Tensor  # (2, C0, f, h, w): zeros, face-locator features
    audio: torch.Tensor  # (2, f, T, Da): zeros, audio tokens
    emotion: torch.Tensor  # (2f, 77, D): conditional emotion text for every row
    masks: dict[str, list[torch.Tensor]]  # "full"/"face"/"lip" -> 4 levels of (2f, h_l * w_l)
    motion_scale: tuple[float, float, float]  # full (pose), face, lip


@dataclass
class ClipContext:
    """Everything the denoising UNet needs that does not change between steps of one clip."""

    face: torch.Tensor  # (2f, C0, h, w)
    layers: dict[str, dict]
    masks: list[list[torch.Tensor]]  # per level: [full, face, lip]
    scales: tuple[float, float, float]


class DenoisingUNet(_UNet):
    def __init__(self, cfg: UNetConfig, dtype=None, device=None, operations=TorchOps):
        super().__init__(cfg, denoising=True, dtype=dtype, device=device, operations=operations)

    @torch.no_grad()
    def prepare(self, cond: ClipConditioning, reference: dict[str, torch.Tensor]) -> ClipContext:
        """Project everything step-invariant once: reference keys/values, text/identity keys/values,
        the emotive audio context and its keys/values, and motion-frame features; in the dtype of the
        text context (the computation's dtype, which casting layers may store their weights apart from)."""
        dtype = cond.context.dtype
        b, c0, f, h, w = cond.face_features.shape
        audio = cond.audio.flatten(0, 1).to(dtype)
        emotion = cond.emotion.to(dtype)
        context = cond.context.to(dtype)
        layers = {}
        for path, st, level in self._stages():
            for j in range(len(st.attentions)):
                key = f"{path}.attentions.{j}"
                # The released code stores reference features in fp16, also in fp32 runs.
                bank = reference[key].to(torch.float16).to(dtype)
                bank = bank.view(b, -1, *bank.shape[1:])  # (2, 1 + m, L, C)
                block = st.attentions[j].transformer_blocks[0]
                hl, wl = h >> level, w >> level
                layers[key] = {
                    "ref_kv": block.attn1.kv(bank[:, 0]),
                    "cross_kv": block.attn2.kv(context),
                    "motion": bank[:, 1:].transpose(-1, -2).reshape(b, -1, bank.shape[-1], hl, wl),
                    "audio_kv": st.audio_modules[j].prepare(audio, emotion),
                }
        masks = [[cond.masks[r][lvl].to(dtype) for r in REGIONS] for lvl in range(len(self.down_blocks))]
        face = cond.face_features.transpose(1, 2).reshape(b * f, c0, h, w).to(dtype)
        return ClipContext(face, layers, masks, tuple(float(s) for s in cond.motion_scale))

    def forward(self, sample: torch.Tensor, t: torch.Tensor, ctx: ClipContext) -> torch.Tensor:
        """sample (2, 4, f, h, w) -> model output (2, 4, f, h, w). The released inference runs this
        network's training-mode branch; this is that branch: motion frames enter every motion module
        of the cross-attention stages, the motion modules of the first up / last down stage are
        skipped, and `motion_scale` reaches every audio module."""
        b, c, f, h, w = sample.shape
        x = self.conv_in(sample.transpose(1, 2).reshape(b * f, c, h, w)) + ctx.face

        def after(path, st, level, j, x):
            lc = ctx.layers[f"{path}.attentions.{j}"]
            x = st.attentions[j](x, lc["ref_kv"], lc["cross_kv"])
            x = st.audio_modules[j](x, lc["audio_kv"], ctx.masks[level], ctx.scales)
            return st.motion_modules[j](x, lc["motion"])

        x = self.conv_out(F.silu(self.conv_norm_out(self._run(x, self._time(t, x), after))))
        return x.view(b, f, -1, h, w).transpose(1, 2)
