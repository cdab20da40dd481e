"""End to end: prepared inputs -> video frames, clip by clip (used by the CLI and the sampler node).

The VAE is injected as two callables so that ComfyUI's VAE object and a diffusers AutoencoderKL both
fit: `encode(pixels (N, 3, H, W) in [-1, 1]) -> unscaled latent mean (N, 4, h, w)` and
`decode(unscaled latents (N, 4, h, w)) -> pixels (N, 3, H, W) in [0, 1]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .config import REGIONS, SamplingConfig
from .models import ClipConditioning, EmoCASTNet
from .sampling import OnStep, ShouldStop, denoise_clip


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
        return cond.expand(frames, -1, -1)
    if cond.shape[0] < frames:  # a schedule covering the real frames: hold its last row over the padding
        cond = torch.cat([cond, cond[-1:].expand(frames - cond.shape[0], -1, -1)])
    return cond[:frames]


@torch.no_grad()
def iter_clips(net: EmoCASTNet, vae: Vae, portrait: Portrait, audio: AudioWindows, emotion: Emotion,
               settings: SamplingConfig = SamplingConfig(), on_step: OnStep | None = None,
               should_stop: ShouldStop | None = None, noise: Callable[[int], torch.Tensor] | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Iterator[ClipResult]:
    """Generate the video clip by clip; memory does not grow with the audio length.

    `noise(clip)` may supply each clip's initial latents; by default one CPU generator seeded with
    `settings.seed` draws them in turn, as the released script does with its global generator.
    The network computes on `device` in `dtype`, by default those of its weights (casting layers,
    e.g. ComfyUI's, may keep their weights elsewhere and in another dtype)."""
    p = next(net.parameters())
    device, dtype = torch.device(device or p.device), dtype or p.dtype
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

    prev: torch.Tensor | None = None
    for clip in range(total // f):
        frames = slice(clip * f, (clip + 1) * f)
        tokens = net.audioproj(audio.windows[frames][None].to(device, dtype))  # (1, f, T, Da)
        clip_emo = emo[frames]
        text = torch.cat([uncond_text.expand(f, -1, -1), clip_emo])  # (2f, 77, D)
        context = torch.cat([text, image_tokens.repeat_interleave(f, 0)], dim=1)  # (2f, 81, D)
        # The reference pass sees one emotion per clip: the clip's middle frame.
        ref_context = context[f // 2 :: f]  # rows f // 2 and f + f // 2
        ref_frames = torch.stack([src] * (1 + m)) if prev is None else torch.cat([src[None], prev[-m:]])
        ref_latents = vae.encode(ref_frames) * scale
        bank = net.reference_unet(ref_latents.to(device, dtype).repeat(2, 1, 1, 1), ref_context)
        cond = ClipConditioning(context=_collapse(context, f), face_features=face,
                                audio=torch.cat([torch.zeros_like(tokens), tokens]),
                                emotion=torch.cat([clip_emo, clip_emo]), masks=masks,
                                motion_scale=settings.motion_scale)
        ctx = net.denoising_unet.prepare(cond, bank)
        latents = draw(clip).to(device, dtype)
        latents = denoise_clip(net.denoising_unet, ctx, latents, settings.steps, settings.cfg_scale, clip,
                               on_step, should_stop)
        video = decode_frames(vae, latents[0].transpose(0, 1) / scale)  # (f, 3, H, W) in [0, 1]
        prev = video.to(device, dtype) * 2 - 1
        keep = min(f, audio.length - clip * f)
        yield ClipResult(clip, video[:keep].float().cpu(), latents[:, :, :keep].float().cpu())


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
