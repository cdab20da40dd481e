"""The stages of a clip, timed inside the real `iter_clips`: it is handed stand-ins for the network and the VAE
that pass everything through to the real modules and time each call (projections, face locator, reference
UNet, `prepare`, every denoising-UNet call, VAE encode/decode). Whatever a clip costs outside those calls
(guidance, scheduler, concatenations) is its `other` stage, so the stages add up to the clip's seconds.

The clock is `torch.utils.benchmark.timer`: it waits for the accelerator's queued work, so on CUDA a stage
holds the GPU time of its kernels."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch.utils.benchmark import timer

from ..config import SamplingConfig
from ..models import EmoCASTNet
from ..pipeline import Vae, decode_frames, iter_clips
from .memory import rss_bytes
from .workload import Inputs

CONDITIONING = ("audio_proj", "image_proj", "face_locator", "prepare")
STAGES = ("reference_unet", "denoising_unet", "vae_encode", "vae_decode", *CONDITIONING)


class Stopwatch:
    """Wall and CPU seconds of every call, per stage name."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.calls_cpu: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        w, c = timer(), time.process_time()
        try:
            yield
        finally:
            self.calls[name].append(timer() - w)
            self.calls_cpu[name].append(time.process_time() - c)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args):
            with self(name):
                return fn(*args)
        return timed

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.calls.items()}


class Timed:
    """Stands in for a module passed to the pipeline: attributes pass through to `inner`; calling it
    (stage `name`) or one of `methods` ({attribute: stage}) is timed. `children` replaces attributes
    by other stand-ins. `capture`, when given, keeps each stage's last arguments (for replaying)."""

    def __init__(self, inner: Any, sw: Stopwatch, name: str = "", methods: dict[str, str] | None = None,
                 children: dict[str, "Timed"] | None = None, capture: dict[str, tuple] | None = None):
        self.__dict__.update(_inner=inner, _sw=sw, _name=name, _methods=methods or {}, _children=children or {},
                             _capture=capture)

    def _run(self, stage: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
        if self._capture is not None:
            self._capture[stage] = (fn, args, kwargs)
        with self._sw(stage):
            return fn(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._run(self._name, self._inner, args, kwargs)

    def __getattr__(self, attr: str) -> Any:
        if attr in self._children:
            return self._children[attr]
        value = getattr(self._inner, attr)
        if attr in self._methods:
            return lambda *args, **kwargs: self._run(self._methods[attr], value, args, kwargs)
        return value


def timed_net(net: EmoCASTNet, sw: Stopwatch, capture: dict[str, tuple] | None = None) -> Timed:
    kids = {attr: Timed(getattr(net, attr), sw, stage, capture=capture) for attr, stage in
            (("audioproj", "audio_proj"), ("imageproj", "image_proj"), ("face_locator", "face_locator"),
             ("reference_unet", "reference_unet"))}
    kids["denoising_unet"] = Timed(net.denoising_unet, sw, "denoising_unet", {"prepare": "prepare"}, capture=capture)
    return Timed(net, sw, children=kids)


def timed_vae(vae: Vae, sw: Stopwatch) -> Vae:
    return Vae(sw.wrap("vae_encode", vae.encode), sw.wrap("vae_decode", vae.decode), vae.decode_batch)


def _since(calls: dict[str, list[float]], seen: dict[str, int], total: float) -> dict[str, float]:
    """Seconds per stage of the calls after `seen`, with `conditioning` and the untimed rest `other`."""
    stages = {k: sum(calls[k][seen.get(k, 0):]) for k in STAGES}
    stages["conditioning"] = sum(stages[k] for k in CONDITIONING)
    stages["other"] = total - sum(stages[k] for k in STAGES)
    return stages


def time_clips(net: EmoCASTNet, vae: Vae, inp: Inputs, settings: SamplingConfig) -> list[dict[str, Any]]:
    """The real generator, consumed and dropped clip by clip: per clip seconds (wall, CPU), seconds per
    stage, the denoising-UNet call of every step, and RSS after the clip."""
    sw = Stopwatch()
    clips = []
    seen: dict[str, int] = {}
    wall, cpu = timer(), time.process_time()
    for result in iter_clips(timed_net(net, sw), timed_vae(vae, sw), inp.portrait, inp.audio, inp.emotion, settings):
        frames = int(result.frames.shape[0])
        del result  # a consumer that writes frames out keeps nothing of the clip
        total, total_cpu = timer() - wall, time.process_time() - cpu
        step = seen.get("denoising_unet", 0)
        clips.append({"total": total, "cpu": total_cpu, "stages": _since(sw.calls, seen, total),
                      "stages_cpu": _since(sw.calls_cpu, seen, total_cpu), "frames": frames,
                      "steps": sw.calls["denoising_unet"][step:], "steps_cpu": sw.calls_cpu["denoising_unet"][step:],
                      "rss": rss_bytes()})
        seen = sw.counts()
        wall, cpu = timer(), time.process_time()
    return clips


def clip0_calls(net: EmoCASTNet, vae: Vae, inp: Inputs, settings: SamplingConfig) -> dict[str, Callable[[], Any]]:
    """The network calls clip 0 of the real pipeline made, each replayable with the arguments it used, and
    the VAE decode of one batch of frames."""
    capture: dict[str, tuple] = {}
    clip0 = iter_clips(timed_net(net, Stopwatch(), capture), vae, inp.portrait, inp.audio, inp.emotion, settings)
    next(clip0)
    clip0.close()
    h = inp.portrait.pixels.shape[-1] // 8
    latents = torch.randn(min(settings.frames_per_clip, vae.decode_batch), 4, h, h)

    def replay(stage: str) -> Callable[[], Any]:
        fn, args, kwargs = capture[stage]
        return lambda: fn(*args, **kwargs)

    size = inp.portrait.pixels.shape[-1]
    pixels = torch.rand(1 + settings.motion_frames, 3, size, size) * 2 - 1  # the reference frames of a clip
    return {"denoising_step": replay("denoising_unet"), "reference_unet": replay("reference_unet"),
            "prepare": replay("prepare"), "vae_encode": lambda: vae.encode(pixels),
            "vae_decode": lambda: decode_frames(vae, latents)}
