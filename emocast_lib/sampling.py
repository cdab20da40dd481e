"""The released sampler: DDIM (v-prediction, zero-terminal-SNR, trailing timesteps) with
classifier-free guidance, one 16-frame clip at a time; and the experimental speed levers.

Levers (off by default, each changes the result, judge them on real weights; README "Speed and memory"):
* `scheduler`: DPM-Solver++ 2M or UniPC (diffusers) with the released noise schedule, so that fewer
  steps approach the 40-step DDIM result. Both take zero-terminal-SNR betas (the last alpha_cumprod is
  clamped to 2**-24 so the first sigma is finite), trailing timesteps (the first step starts at t=999
  like DDIM) and end on sigma 0 (`final_sigmas_type="zero"`, the last step returns the predicted clean
  latents like DDIM's `set_alpha_to_one`), with a first-order final step.
* `cfg_end`: guidance for the first fraction of the steps only; later steps run the conditional half
  alone (a batch of f frames instead of 2f).
* `cache_interval`: DeepCache-style reuse (models/unet.py `DeepFeatures`): a full UNet pass every
  `cache_interval` steps; the steps between run the first level only, on the deep features of the last
  full pass.

Emotion guidance (`emotion_cfg`, README "Emotion strength"): the conditional half is split by a third,
the neutral half `n`: the conditional half with the empty prompt wherever the emotion prompt enters
(cross-attention text tokens, emotive audio attention, the reference pass it reads), identity, face and
audio unchanged. `noise = u + cfg * (n - u) + emotion_cfg * (c - n)`, `emotion_cfg` per frame. Where every
frame's emotion_cfg is cfg this is the released `u + cfg * (c - u)`, and the neutral half is not computed.
The halves run as the released [u, c] batch, then n alone (2 + 1): the released call stays the same call,
and the peak activation memory stays that of the released batch. Guidance stops with `cfg_end` for the
emotion too (the conditional half alone after it); with `cache_interval` the neutral half keeps its own
deep features, refreshed on the same steps.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from .config import SCHEDULER_CONFIG, SCHEDULERS, SamplingConfig
from .emotion import emotion_cfg_problem
from .models import ClipContext, DeepFeatures, DenoisingUNet

OnStep = Callable[[int, int, torch.Tensor], None]
ShouldStop = Callable[[], bool]
# The released noise schedule and timestep placement, shared by every scheduler.
_SCHEDULE = {k: SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                              "steps_offset", "prediction_type", "rescale_betas_zero_snr",
                                              "timestep_spacing")}


class GenerationCancelled(RuntimeError):
    """Raised between denoising steps when `should_stop()` answers True."""


def check_settings(settings: SamplingConfig) -> None:
    """Reject unknown lever values before any work (one line: which setting, what is wrong, what to do)."""
    if settings.scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler: {settings.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    if not 0.0 <= settings.cfg_end <= 1.0:
        raise ValueError(f"cfg_end: {settings.cfg_end} is not a fraction of the steps; give a value from 0 to 1 "
                         "(1 = guidance on every step, as released)")
    if settings.cache_interval < 1:
        raise ValueError(f"cache_interval: {settings.cache_interval} is below 1; give 1 (a full pass every step, "
                         "as released) or more")
    problem = None if settings.emotion_cfg is None else emotion_cfg_problem(settings.emotion_cfg)
    if problem:
        raise ValueError(problem)


def make_scheduler(steps: int, name: str = "ddim"):
    if name == "ddim":
        scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    elif name == "dpmpp_2m":
        scheduler = DPMSolverMultistepScheduler(**_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                                final_sigmas_type="zero")
    elif name == "uni_pc":
        scheduler = UniPCMultistepScheduler(**_SCHEDULE, solver_order=2, predict_x0=True, solver_type="bh2",
                                            final_sigmas_type="zero")
    else:
        raise ValueError(f"scheduler: {name!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    scheduler.set_timesteps(steps)
    return scheduler


def guided_steps(steps: int, cfg_end: float) -> int:
    """How many of the first steps run with guidance (`cfg_end` is a fraction of the steps, 0 to 1)."""
    return math.ceil(round(cfg_end * steps, 6))


def guide(out: torch.Tensor, scale: float) -> torch.Tensor:
    """out (2, ...) = [unconditional, conditional] -> guided prediction (1, ...)."""
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond)


@dataclass
class EmotionHalf:
    """The neutral half of one clip: its conditional-only context (the conditional half with the empty
    emotion prompt) and each frame's emotion guidance scale."""

    ctx: ClipContext
    scales: torch.Tensor  # (f,)


def guide_emotion(out: torch.Tensor, neutral: torch.Tensor, scale: float, emotion_scales: torch.Tensor) -> torch.Tensor:
    """out (2, C, f, ...) = [unconditional, conditional], neutral (1, C, f, ...) -> u + scale * (n - u) +
    emotion_scales[frame] * (c - n), (1, C, f, ...)."""
    uncond, cond = out.chunk(2)
    per_frame = emotion_scales.to(out).view(1, 1, -1, *([1] * (out.dim() - 3)))
    return uncond + scale * (neutral - uncond) + per_frame * (cond - neutral)


@torch.no_grad()
def denoise_clip(unet: DenoisingUNet, ctx: ClipContext, latents: torch.Tensor, settings: SamplingConfig,
                 clip: int = 0, on_step: OnStep | None = None, should_stop: ShouldStop | None = None,
                 emotion: EmotionHalf | None = None) -> torch.Tensor:
    """Run every step on one clip. latents (1, 4, f, h, w) is the initial noise (the initial sigma of
    every scheduler here is 1); `on_step(clip, step, latents)` follows every step. `emotion`: the neutral
    half for emotion guidance (None: the released guidance)."""
    scheduler = make_scheduler(settings.steps, settings.scheduler)
    guided = guided_steps(settings.steps, settings.cfg_end)
    cond_ctx = ctx.conditional() if guided < settings.steps else None
    # One cache per batch that runs: the released one, and the neutral half's.
    deep, deep_neutral = (DeepFeatures(), DeepFeatures()) if settings.cache_interval > 1 else (None, None)
    for i, t in enumerate(scheduler.timesteps):
        if should_stop is not None and should_stop():
            raise GenerationCancelled(f"cancelled at clip {clip}, step {i}")
        if deep is not None and i % settings.cache_interval == 0:
            deep.features = deep_neutral.features = None  # a full pass, which keeps the deep features for later
        if i >= guided:
            pred = unet(latents, t, cond_ctx, deep)
        elif emotion is None:
            pred = guide(unet(torch.cat([latents, latents]), t, ctx, deep), settings.cfg_scale)
        else:
            out = unet(torch.cat([latents, latents]), t, ctx, deep)
            pred = guide_emotion(out, unet(latents, t, emotion.ctx, deep_neutral), settings.cfg_scale, emotion.scales)
        latents = scheduler.step(pred, t, latents).prev_sample
        if on_step is not None:
            on_step(clip, i, latents)
    return latents
