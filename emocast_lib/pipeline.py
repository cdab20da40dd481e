"""End to end: prepared inputs -> video frames, clip by clip (used by the CLI and the sampler node).

The VAE is injected as two callables so that ComfyUI's VAE object and a diffusers AutoencoderKL both
fit: `encode(pixels (N, 3, H, W) in [-1, 1]) -> unscaled latent mean (N, 4, h, w)` and
`decode(unscaled latents (N, 4, h, w)) -> pixels (N, 3, H, W) in [0, 1]`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch

from .config import REGIONS, SamplingConfig
from .emotion import STRENGTH_RANGE, strength_problem
from .models import ClipConditioning, ClipContext, EmoCASTNet
from .models.ops import compute_dtype
from .sampling import EmotionHalf, OnStep, ShouldStop, check_settings, denoise_clip


@dataclass
class Vae:
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    decode_batch: int = 8  # frames per decode call: bounds memory at large sizes


@dataclass
class Portrait:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1], square, H divisible by 64
    identity: torch.Tensor | None  # (E,) raw face-recognition embedding; None = no identity (zeros of the
    # network's width, the reference's no-face fallback)
    face_region: torch.Tensor  # (3, H, W) in [0, 1]
    masks: dict[str, list[torch.Tensor]]  # "full"/"face"/"lip" -> 4 levels of (h_l * w_l,) in [0, 1]


@dataclass
class Emotion:
    cond: torch.Tensor  # (1 or frames, 77, D): emotion prompt hidden states, one row per video frame
    uncond: torch.Tensor  # (1, 77, D): empty prompt
    # (1 or frames,): each frame's multiple of emotion_cfg (Emotion Schedule segment strengths); None: 1
    strength: torch.Tensor | None = None


@dataclass
class AudioWindows:
    windows: torch.Tensor  # (frames, 5, layers, C); frames a multiple of the clip length
    length: int  # real frame count; the video is trimmed to it


@dataclass
class ClipResult:
    index: int
    frames: torch.Tensor  # (n, 3, H, W) float32 in [0, 1] on the CPU, already trimmed to the audio
    latents: torch.Tensor  # (1, 4, n, h, w) in the model's scale (VAE latents x 0.18215)


def make_portrait(image: np.ndarray, landmarks: np.ndarray, identity: np.ndarray | None, size: int,
                  expand_ratio: float = 1.2) -> Portrait:
    """RGB uint8 (H, W, 3) portrait + its (478, 2) pixel landmarks + identity embedding (None: no
    identity) -> network inputs at the model's native `size`, resized and masked as the reference does."""
    from .face import compute_masks, mask_sizes, reference_image

    h, w = image.shape[:2]
    if h != w:
        raise ValueError(f"the portrait is {w}x{h}; EmoCAST takes square portraits (the original code would "
                         f"stretch it): crop it square around the face with the Crop Portrait node")
    masks = compute_masks(landmarks, h, w, expand_ratio, image_size=size)
    sides = mask_sizes(size)
    ident = None if identity is None else torch.as_tensor(np.asarray(identity), dtype=torch.float32)
    return Portrait(reference_image(image, size), ident,
                    masks.face_region, {"full": [masks.full_masks[s][0] for s in sides],
                                        "face": [masks.face_masks[s][0] for s in sides],
                                        "lip": [masks.lip_masks[s][0] for s in sides]})


def num_clips(audio: AudioWindows, settings: SamplingConfig) -> int:
    return audio.windows.shape[0] // settings.frames_per_clip


def _per_frame(cond: torch.Tensor, frames: int) -> torch.Tensor:
    if cond.shape[0] == 1:
        return cond.expand(frames, *cond.shape[1:])
    if cond.shape[0] < frames:  # a schedule covering the real frames: hold its last row over the padding
        cond = torch.cat([cond, cond[-1:].expand(frames - cond.shape[0], *cond.shape[1:])])
    return cond[:frames]


def emotion_scales(settings: SamplingConfig, emotion: Emotion, frames: int) -> torch.Tensor | None:
    """Each frame's emotion guidance scale (frames,) in float64: emotion_cfg (cfg when unset) times the
    frame's strength; None when every frame's is cfg (the released guidance, no neutral half)."""
    scale = settings.cfg_scale if settings.emotion_cfg is None else settings.emotion_cfg
    if emotion.strength is None:
        return None if scale == settings.cfg_scale else torch.full((frames,), float(scale), dtype=torch.float64)
    strength = emotion.strength.reshape(-1).double()
    low, high = STRENGTH_RANGE
    bad = strength[~(strength.isfinite() & (strength >= low) & (strength <= high))]
    if len(bad):
        raise ValueError(strength_problem(float(bad[0])))
    return scale * _per_frame(strength, frames)


@torch.no_grad()
def iter_clips(net: EmoCASTNet, vae: Vae, portrait: Portrait, audio: AudioWindows, emotion: Emotion,
               settings: SamplingConfig = SamplingConfig(), on_step: OnStep | None = None,
               should_stop: ShouldStop | None = None, noise: Callable[[int], torch.Tensor] | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Iterator[ClipResult]:
    """Generate the video clip by clip; memory does not grow with the audio length.

    `noise(clip)` may supply each clip's initial latents; by default one CPU generator seeded with
    `settings.seed` draws them in turn, as the released script does with its global generator.
    The network computes on `device` in `dtype`, by default those of its weights, fp8-stored ones aside
    (casting layers, e.g. ComfyUI's, may keep their weights elsewhere and in another dtype)."""
    check_settings(settings)
    scales = emotion_scales(settings, emotion, audio.windows.shape[0])
    device, dtype = torch.device(device or next(net.parameters()).device), dtype or compute_dtype(net)
    f, m, scale = settings.frames_per_clip, settings.motion_frames, settings.latent_scale
    total = audio.windows.shape[0]
    if total % f:
        raise ValueError(f"audio windows cover {total} frames, not a multiple of the clip length {f}")
    emo = _per_frame(emotion.cond, total).to(device, dtype)
    uncond_text = emotion.uncond.reshape(1, *emotion.uncond.shape[-2:]).to(device, dtype)
    src = portrait.pixels.to(device, dtype)
    _, H, W = src.shape
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    draw = noise or (lambda clip: torch.randn((1, 4, f, H // 8, W // 8), generator=generator))

    # Clip-invariant conditioning, computed once for the whole video.
    if portrait.identity is None:  # the one home of the no-identity embedding: zeros of the network's width
        ident = torch.zeros(1, net.config.image_proj.embedding_dim, device=device, dtype=dtype)
    else:
        ident = portrait.identity.reshape(1, -1).to(device, dtype)
    image_tokens = net.imageproj(torch.cat([torch.zeros_like(ident), ident]))  # (2, 4, D)
    region = portrait.face_region.to(device, dtype).expand(3, H, W)
    feats = net.face_locator(region[None].expand(f, -1, -1, -1))  # (f, C0, h, w)
    feats = feats.transpose(0, 1)[None]
    face = torch.cat([torch.zeros_like(feats), feats])  # (2, C0, f, h, w)
    masks = {r: [lvl.to(device, dtype).reshape(1, -1).expand(2 * f, -1) for lvl in portrait.masks[r]] for r in REGIONS}
    # The neutral half's text tokens: the empty prompt in both rows, with the identity tokens of each half.
    neutral_context = torch.cat([uncond_text.expand(2, -1, -1), image_tokens], dim=1)  # (2, 81, D)

    reference = ReferenceBank(net, vae, src, m, scale, device, dtype)
    prev: torch.Tensor | None = None
    for clip in range(total // f):
        frames = slice(clip * f, (clip + 1) * f)
        tokens = net.audioproj(audio.windows[frames][None].to(device, dtype))  # (1, f, T, Da)
        clip_emo = emo[frames]
        text = torch.cat([uncond_text.expand(f, -1, -1), clip_emo])  # (2f, 77, D)
        context = torch.cat([text, image_tokens.repeat_interleave(f, 0)], dim=1)  # (2f, 81, D)
        # The reference pass sees one emotion per clip: the clip's middle frame.
        motion = None if prev is None else prev[-m:]
        bank = reference(motion, context[f // 2 :: f])  # rows f // 2, f + f // 2
        cond = ClipConditioning(context=_collapse(context, f), face_features=face,
                                audio=torch.cat([torch.zeros_like(tokens), tokens]),
                                emotion=torch.cat([clip_emo, clip_emo]), masks=masks,
                                motion_scale=settings.motion_scale)
        ctx = net.denoising_unet.prepare(cond, bank)
        half = None
        if scales is not None and bool((scales[frames] != settings.cfg_scale).any()):
            half = EmotionHalf(neutral_half(net, reference, motion, cond, neutral_context), scales[frames])
        latents = draw(clip).to(device, dtype)
        latents = denoise_clip(net.denoising_unet, ctx, latents, settings, clip, on_step, should_stop, half)
        video = decode_frames(vae, latents[0].transpose(0, 1) / scale)  # (f, 3, H, W) in [0, 1]
        prev = video[-m:].to(device, dtype) * 2 - 1
        keep = min(f, audio.length - clip * f)
        yield ClipResult(clip, video[:keep].float().cpu(), latents[:, :, :keep].float().cpu())


def neutral_half(net: EmoCASTNet, reference: ReferenceBank, motion: torch.Tensor | None, cond: ClipConditioning,
                 context: torch.Tensor) -> ClipContext:
    """The neutral half's conditional-only context: the clip's conditioning `cond` with the empty prompt
    wherever the emotion prompt enters: the text tokens (`context`, (2, 81, D), [unconditional, empty
    prompt + identity]), the emotive audio attention, and the reference pass it reads (run on `context`);
    identity, face and audio as they are."""
    bank = reference(motion, context)
    empty = context[:1, : -net.config.image_proj.tokens]
    neutral = replace(cond, context=context, emotion=empty.expand(cond.emotion.shape[0], -1, -1))
    return net.denoising_unet.prepare(neutral, bank).conditional()


class ReferenceBank:
    """The reference UNet's features of each clip, in the released row layout: rows [source, motion
    frames] twice, row i paired with context row i mod 2 (uncond, cond).

    The source portrait is encoded once per video, and its rows (the source under both contexts) are
    computed once per reference context, i.e. once per video with one emotion prompt: they are the
    same calls on the same inputs in every clip, so reusing them changes no bit. The last two contexts
    are kept (the clip's and, with emotion guidance, the neutral half's). Each clip then encodes and runs
    only its motion frames (encoded once for both contexts); the first clip, whose motion frames are the
    source, runs neither."""

    def __init__(self, net: EmoCASTNet, vae: Vae, source: torch.Tensor, motion_frames: int, scale: float,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """`device`/`dtype`: where and in what the network computes (default: those of its weights)."""
        self.net, self.vae, self.scale = net, vae, scale
        p = next(net.parameters())
        self.latent = (vae.encode(source[None]) * scale).to(device or p.device, dtype or p.dtype)  # (1, 4, h, w)
        self.rows = [(i % (1 + motion_frames), i % 2) for i in range(2 * (1 + motion_frames))]  # (frame, context)
        self.sources: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []  # (context, source rows (2, L, C))
        self.motion: tuple[torch.Tensor, torch.Tensor] | None = None  # the last motion frames and their latents

    def __call__(self, motion: torch.Tensor | None, context: torch.Tensor) -> dict[str, torch.Tensor]:
        """motion (m, 3, H, W) pixels in [-1, 1], None for the first clip; context (2, N, D)."""
        source = self._source(context)
        if motion is None:
            return {k: _rows(v, [c for _, c in self.rows]) for k, v in source.items()}
        # The motion rows, each (frame, context) pair once, alternating contexts as the UNet pairs rows
        # (a side with fewer pairs is padded with a spare row, dropped after).
        pairs = sorted({r for r in self.rows if r[0] > 0})
        sides = [[j for j, c in pairs if c == ctx] for ctx in (0, 1)]
        n = max(map(len, sides))
        sides = [side + [pairs[0][0]] * (n - len(side)) for side in sides]
        order = [(side[k], ctx) for k in range(n) for ctx, side in enumerate(sides)]
        if self.motion is None or self.motion[0] is not motion:
            self.motion = (motion, (self.vae.encode(motion) * self.scale).to(self.latent))
        out = self.net.reference_unet(_rows(self.motion[1], [j - 1 for j, _ in order]), context)
        index = [c if j == 0 else 2 + order.index((j, c)) for j, c in self.rows]
        return {k: _rows(torch.cat([source[k], v]), index) for k, v in out.items()}

    def _source(self, context: torch.Tensor) -> dict[str, torch.Tensor]:
        for known, rows in self.sources:
            if torch.equal(known, context):
                return rows
        rows = self.net.reference_unet(self.latent.expand(2, -1, -1, -1), context)
        self.sources = [(context, rows), *self.sources[:1]]
        return rows


def _rows(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    """t[index] for a short list of rows, without an index tensor (none is made on another device)."""
    return torch.stack([t[i] for i in index])


def _collapse(context: torch.Tensor, f: int) -> torch.Tensor:
    """(2f, N, D) -> (2, N, D) when every frame of each half is the same (a single emotion): the
    denoising UNet then projects one text row per half, as the released code does."""
    halves = context.view(2, f, *context.shape[1:])
    return halves[:, 0] if bool((halves == halves[:, :1]).all()) else context


def decode_frames(vae: Vae, latents: torch.Tensor) -> torch.Tensor:
    """Unscaled latents (n, 4, h, w) -> (n, 3, H, W) in [0, 1], a bounded batch at a time."""
    return torch.cat([vae.decode(chunk).clamp(0, 1) for chunk in latents.split(vae.decode_batch)])


def diffusers_vae(model, decode_batch: int = 8) -> Vae:
    """Adapter for a diffusers `AutoencoderKL` (the CLI's VAE and the parity tests')."""
    def encode(x: torch.Tensor) -> torch.Tensor:
        return model.encode(x.to(model.device, model.dtype)).latent_dist.mean

    def decode(z: torch.Tensor) -> torch.Tensor:
        return model.decode(z.to(model.device, model.dtype)).sample / 2 + 0.5

    return Vae(encode, decode, decode_batch)
