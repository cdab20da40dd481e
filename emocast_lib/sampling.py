"""The released sampler: DDIM (v-prediction, zero-terminal-SNR, trailing timesteps) with
classifier-free guidance, one 16-frame clip at a time."""
from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler

from .config import SCHEDULER_CONFIG
from .models import ClipContext, DenoisingUNet

OnStep = Callable[[int, int, torch.Tensor], None]
ShouldStop = Callable[[], bool]


class GenerationCancelled(RuntimeError):
    """Raised between denoising steps when `should_stop()` answers True."""


def make_scheduler(steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    return scheduler


def guide(out: torch.Tensor, scale: float) -> torch.Tensor:
    """out (2, ...) = [unconditional, conditional] -> guided prediction (1, ...)."""
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def denoise_clip(unet: DenoisingUNet, ctx: ClipContext, latents: torch.Tensor, steps: int, cfg_scale: float,
                 clip: int = 0, on_step: OnStep | None = None, should_stop: ShouldStop | None = None) -> torch.Tensor:
    """Run every DDIM step on one clip. latents (1, 4, f, h, w) is the initial noise (DDIM's
    initial sigma is 1); `on_step(clip, step, latents)` follows every step."""
    scheduler = make_scheduler(steps)
    for i, t in enumerate(scheduler.timesteps):
        if should_stop is not None and should_stop():
            raise GenerationCancelled(f"cancelled at clip {clip}, step {i}")
        pred = guide(unet(torch.cat([latents, latents]), t, ctx), cfg_scale)
        latents = scheduler.step(pred, t, latents, eta=0.0).prev_sample
        if on_step is not None:
            on_step(clip, i, latents)
    return latents
