"""The two UNets of EmoCAST: the reference UNet (emocast/models/unet_2d_condition_text.py,
`UNet2DConditionModel`) returns its per-block features, and the denoising UNet
(emocast/models/unet_3d_text.py, `UNet3DConditionModel`, after Hallo's hallo/models/unet_3d.py) takes
them, prepared once per clip into a `ClipContext`, as an argument on every step. Frames are folded
into the batch, so both are built from the same per-frame blocks."""
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


@dataclass(frozen=True)
class StageLayout:
    """What one stage holds (the arguments of `get_down_block` / `UNetMidBlock3DCrossAttn` /
    `get_up_block` in emocast/models/unet_3d_blocks_text.py, Hallo's hallo/models/unet_3d_blocks.py)."""

    kind: str  # "down", "mid" or "up"
    channels: int  # output width of every resnet
    resnet_inputs: tuple[int, ...]  # input width of each resnet (in an up stage: with the skip it joins)
    cross_attention: bool  # a spatial transformer after each resnet (in the mid stage: after the first)
    audio_widths: tuple[int, ...] = ()  # denoising UNet: inner width of the audio module after each transformer
    motion_modules: int = 0  # denoising UNet: motion modules the stage holds (one per transformer run)
    sampler: bool = False  # ends with a downsampler / upsampler

    @property
    def attention_layers(self) -> int:
        return 0 if not self.cross_attention else 1 if self.kind == "mid" else len(self.resnet_inputs)


def unet_layout(cfg: UNetConfig) -> dict[str, list[StageLayout]]:
    """The stages of the SD1.5 UNet of `cfg` under their checkpoint names, as UNet3DConditionModel builds
    them: cross-attention in all stages but the deepest down stage and the first up stage."""
    widths, layers = cfg.block_out_channels, cfg.layers_per_block
    last = len(widths) - 1
    down = []
    for i, c in enumerate(widths):
        inputs = (widths[max(i - 1, 0)],) + (c,) * (layers - 1)
        down.append(StageLayout(kind="down", channels=c, resnet_inputs=inputs, cross_attention=i < last,
                                # The released audio modules are as wide as their resnet's input.
                                audio_widths=inputs if i < last else (), motion_modules=layers, sampler=i < last))
    mid = StageLayout(kind="mid", channels=widths[-1], resnet_inputs=(widths[-1],) * 2, cross_attention=True,
                      audio_widths=(widths[-1],), motion_modules=1)
    up, reverse = [], widths[::-1]
    for i, c in enumerate(reverse):
        prev, mirror = reverse[max(i - 1, 0)], reverse[min(i + 1, last)]  # previous stage out, mirrored stage in
        # Each resnet joins one down-path output, last of all the mirrored down stage's input.
        inputs = tuple((prev if j == 0 else c) + (mirror if j == layers else c) for j in range(layers + 1))
        up.append(StageLayout(kind="up", channels=c, resnet_inputs=inputs, cross_attention=i > 0,
                              # ... and here as wide as the mirrored down stage's input (upstream `in_channels`).
                              audio_widths=(mirror,) * (layers + 1) if i > 0 else (), motion_modules=layers + 1,
                              sampler=i < last))
    return {"down_blocks": down, "mid_block": [mid], "up_blocks": up}


class _UNet(nn.Module):
    """SD1.5 skeleton; the denoising variant adds audio and motion modules to its stages."""

    def __init__(self, cfg: UNetConfig, denoising: bool, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.cfg = cfg
        dd = {"dtype": dtype, "device": device}
        c0 = cfg.block_out_channels[0]
        self.conv_in = operations.Conv2d(cfg.in_channels, c0, 3, padding=1, **dd)
        self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim, operations=operations, **dd)
        layout = unet_layout(cfg)
        stage = partial(self._stage, denoising=denoising, operations=operations, **dd)
        self.down_blocks = nn.ModuleList(stage(s) for s in layout["down_blocks"])
        self.mid_block = stage(layout["mid_block"][0])
        self.up_blocks = nn.ModuleList(stage(s) for s in layout["up_blocks"])
        if denoising:
            self.conv_norm_out = operations.GroupNorm(cfg.norm_num_groups, c0, eps=1e-5, **dd)
            self.conv_out = operations.Conv2d(c0, cfg.out_channels, 3, padding=1, **dd)

    def _stage(self, spec: StageLayout, denoising: bool, dtype, device, operations) -> Stage:
        cfg, c = self.cfg, spec.channels
        dd = {"dtype": dtype, "device": device, "operations": operations}
        resnets = [ResnetBlock(cin, c, temb=cfg.time_embed_dim, groups=cfg.norm_num_groups, **dd)
                   for cin in spec.resnet_inputs]
        attentions = [SpatialTransformer(c, heads=cfg.heads, context_dim=cfg.cross_attention_dim,
                                         groups=cfg.norm_num_groups, **dd) for _ in range(spec.attention_layers)]
        # Upstream passes the head width `width // heads`, so the inner width is a multiple of the heads.
        audio = [AudioModule(c, inner=cfg.heads * (width // cfg.heads), heads=cfg.heads, groups=cfg.norm_num_groups,
                             audio_dim=cfg.audio_attention_dim, emo_dim=cfg.cross_attention_dim,
                             token_dim=cfg.audio_token_dim, emo_head_dim=cfg.emotive_head_dim, **dd)
                 for width in spec.audio_widths] if denoising else []
        motion = [MotionModule(c, heads=cfg.motion_heads, max_len=cfg.motion_max_len, groups=cfg.motion_norm_groups,
                               **dd) for _ in range(spec.motion_modules)] if denoising else []
        sampler = (Downsample if spec.kind == "down" else Upsample)(c, **dd) if spec.sampler else None
        return Stage(spec.kind, resnets, attentions, audio, motion, sampler)

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

    def _run(self, x: torch.Tensor, temb: torch.Tensor, after: Callable, deep: DeepFeatures | None = None,
             ) -> torch.Tensor:
        """Down, mid and up stages with SD's skips; `after(path, stage, level, j, x)` runs what follows
        resnet j of a stage with attentions (it differs between the two UNets). With `deep` (see
        `DeepFeatures`) a full pass keeps the input of the last up stage, a shallow pass reuses it."""
        skips = [x]
        stages = list(self._stages())
        if deep is not None and deep.features is not None:
            # Shallow pass: the first down stage (its sampler only feeds the deep stages), then the last
            # up stage on the reused deep features, joined with this pass's shallow skips.
            (p0, s0, l0), (p1, s1, l1) = stages[0], stages[-1]
            s0(x, temb, skips, partial(after, p0, s0, l0), sample=False)
            return s1(deep.rows(x.shape[0]), temb, skips, partial(after, p1, s1, l1))
        for k, (path, st, level) in enumerate(stages):
            if deep is not None and k == len(stages) - 1:
                deep.features = x
            x = st(x, temb, skips, partial(after, path, st, level))
        return x


class ReferenceUNet(_UNet):
    """2-D UNet run once per clip on the reference latents (timestep 0); only its features are used (the
    `write` mode of `ReferenceAttentionControl`, emocast/models/mutual_self_attention_text.py)."""

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
    """Everything the denoising UNet needs that does not change between steps of one clip. Rows are
    [uncond frames, cond frames] (`guided`), or the cond frames alone (`conditional()`)."""

    face: torch.Tensor  # (2f, C0, h, w)
    layers: dict[str, dict]
    masks: list[list[torch.Tensor]]  # per level: [full, face, lip]
    scales: tuple[float, float, float]
    guided: bool = True

    def conditional(self) -> ClipContext:
        """The context of the conditional half alone, for steps without guidance (half the batch)."""
        f = self.face.shape[0] // 2

        def cond(t: torch.Tensor) -> torch.Tensor:  # rows are one per CFG half, or one per frame of each
            return t[t.shape[0] // 2:]

        def audio(kv: dict) -> dict:  # the first rows are `fixed` (see AudioBlock.prepare), then k/v rows
            fixed = len(kv["fixed"])
            return kv | {"fixed": kv["fixed"][f:], "k": kv["k"][max(f - fixed, 0):], "v": kv["v"][max(f - fixed, 0):]}

        layers = {key: lc | {"cross_kv": tuple((cond(k), cond(v)) for k, v in lc["cross_kv"]),
                             "motion": cond(lc["motion"]), "audio_kv": audio(lc["audio_kv"])}
                  for key, lc in self.layers.items()}
        return ClipContext(self.face[f:], layers, [[m[f:] for m in level] for level in self.masks], self.scales,
                           guided=False)


@dataclass
class DeepFeatures:
    """DeepCache-style reuse across adjacent steps (Ma et al. 2023): the input of the denoising UNet's
    last up stage, i.e. everything below the first level, kept by a full pass (`features` None) and
    reused by shallow passes (`features` set), which run only the first down stage and the last up stage."""

    features: torch.Tensor | None = None

    def rows(self, n: int) -> torch.Tensor:
        """The kept features for a batch of `n` rows: all of them, or the conditional half of a
        guided batch for a step without guidance."""
        assert self.features is not None
        return self.features if len(self.features) == n else self.features[-n:]


class DenoisingUNet(_UNet):
    """The 3-D denoising UNet with motion and audio modules; its spatial transformers read the reference
    features (the `read` mode of `ReferenceAttentionControl`)."""

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

    def forward(self, sample: torch.Tensor, t: torch.Tensor, ctx: ClipContext, deep: DeepFeatures | None = None,
                ) -> torch.Tensor:
        """sample (2, 4, f, h, w) [uncond, cond] -> model output (2, 4, f, h, w); (1, 4, f, h, w), the
        conditional half alone, with `ctx.conditional()`. The released inference runs this network's
        training-mode branch; this is that branch: motion frames enter every motion module of the
        cross-attention stages, the motion modules of the first up / last down stage are skipped, and
        `motion_scale` reaches every audio module. `deep`: reuse of the deep features (`DeepFeatures`)."""
        b, c, f, h, w = sample.shape
        if b != (2 if ctx.guided else 1):
            raise ValueError(f"a batch of {b} for a {'guided' if ctx.guided else 'conditional-only'} clip context")
        uncond = f if ctx.guided else 0
        x = self.conv_in(sample.transpose(1, 2).reshape(b * f, c, h, w)) + ctx.face

        def after(path, st, level, j, x):
            lc = ctx.layers[f"{path}.attentions.{j}"]
            x = st.attentions[j](x, lc["ref_kv"], lc["cross_kv"], uncond)
            x = st.audio_modules[j](x, lc["audio_kv"], ctx.masks[level], ctx.scales)
            return st.motion_modules[j](x, lc["motion"])

        x = self.conv_out(F.silu(self.conv_norm_out(self._run(x, self._time(t, x), after, deep))))
        return x.view(b, f, -1, h, w).transpose(1, 2)
