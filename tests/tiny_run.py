"""The tiny pipeline on random inputs of the preprocessing's shapes, for the model and precision tests."""
from __future__ import annotations

import torch

from emocast_lib.bench.tiny import TINY_NET
from emocast_lib.config import REGIONS, SamplingConfig
from emocast_lib.models import EmoCASTNet
from emocast_lib.pipeline import AudioWindows, Emotion, Portrait, Vae, iter_clips


def tiny_inputs(size: int, frames: int, clips: int, seed: int = 0,
                per_frame_emotion: bool = False) -> tuple[Portrait, AudioWindows, Emotion]:
    """One emotion prompt, or (`per_frame_emotion`) a different one for every frame (an emotion schedule)."""
    g = torch.Generator().manual_seed(seed)
    unet, audio = TINY_NET.unet, TINY_NET.audio_proj
    sides = [size // 8 >> level for level in range(len(unet.block_out_channels))]
    portrait = Portrait(pixels=torch.rand(3, size, size, generator=g) * 2 - 1,
                        identity=torch.randn(TINY_NET.image_proj.embedding_dim, generator=g),
                        face_region=torch.rand(3, size, size, generator=g),
                        masks={r: [torch.rand(s * s, generator=g) for s in sides] for r in REGIONS})
    windows = torch.randn(frames * clips, audio.window, audio.layers, audio.channels, generator=g)
    d = unet.cross_attention_dim
    emotion = Emotion(torch.randn(frames * clips if per_frame_emotion else 1, 77, d, generator=g),
                      torch.randn(1, 77, d, generator=g))
    return portrait, AudioWindows(windows, frames * clips), emotion


def run_tiny(net: EmoCASTNet, vae: Vae, clips: int = 2, steps: int = 2, size: int = 64,
             per_frame_emotion: bool = False, **compute) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (1, 4, n, h, w) and frames (n, 3, H, W) of `clips` 4-frame clips with 2 motion frames. At
    64 px the deepest latent grid is 1x1, so every fast path of the network runs."""
    settings = SamplingConfig(steps=steps, frames_per_clip=4, motion_frames=2)
    portrait, audio, emotion = tiny_inputs(size, settings.frames_per_clip, clips, per_frame_emotion=per_frame_emotion)
    done = list(iter_clips(net, vae, portrait, audio, emotion, settings, **compute))
    return torch.cat([c.latents for c in done], dim=2), torch.cat([c.frames for c in done])
