"""Running a checked job: the session's models and caches in, an mp4 written atomically out."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .. import audio as audio_lib
from ..config import SamplingConfig
from ..conversation import compose, held
from ..emotion import emotion_schedule, strength_schedule
from ..face import PortraitCrop, paste_back
from ..files import OutputError
from ..pipeline import AudioWindows, ClipResult, Emotion, iter_clips, num_clips
from ..video import Mp4Writer
from .checks import CheckedJob
from .schema import PASTE_MAX_SIDE, JobError, JobSpec, OnProgress, Problem, Progress, sampling_config
from .session import PreparedPortrait, Session

PASTE_CHUNK = 4  # frames pasted back at a time: bounds the full-size frames held at once


def run_job(session: Session, job: CheckedJob | JobSpec, on_progress: OnProgress | None = None,
            should_stop: Callable[[], bool] | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Make the video of `job` with the session's models; returns the mp4 path (see the package docstring).

    A JobSpec is checked first (`session.check`); a CheckedJob is used as checked. Then: load the models
    not loaded yet -> analyse the portrait, encode audio and emotion (cached) -> clips, each written to the
    mp4 as it is decoded. `on_progress` gets Progress events (default: the session's); `should_stop()` is
    asked before every denoising step and ends the job with sampling.GenerationCancelled. `metadata` goes
    into the mp4's container tags (the batch records the job's settings there)."""
    say = on_progress or session.on_progress or (lambda p: None)
    if isinstance(job, JobSpec):
        sounds = [str(s.audio) for s in job.speakers] or [str(job.audio)]
        say(Progress("check", f"checking {job.image}, {', '.join(sounds)}"))
        job = session.check(job)
    if job.spec.speakers:
        return _run_conversation(session, job, say, should_stop, metadata)
    previous, session.on_progress = session.on_progress, say
    try:
        settings, prepared, windows, emotion = _prepare(session, job, say)
    finally:
        session.on_progress = previous
    return _write(session, job, settings, prepared, windows, emotion, say, should_stop, metadata)


def _prepare(session: Session, job: CheckedJob, say: OnProgress, speaker: int | None = None):
    """The sampler settings and the network inputs of a job (or of one speaker of a conversation), loading the
    models they need."""
    spec = job.spec
    steps = spec.steps or session.declared_steps or SamplingConfig.steps
    if spec.steps is None:
        source = "the step count the checkpoint declares" if session.declared_steps else "the released default"
        say(Progress("prepare", f"{steps} denoising steps per clip ({source}; --steps changes it)"))
    settings = sampling_config(steps, spec.cfg, spec.seed, (spec.pose_weight, spec.face_weight, spec.lip_weight),
                               spec.fps, spec.clip_length, spec.scheduler, spec.cfg_end, spec.cache_interval,
                               spec.emotion_cfg)
    prepared = session.portrait(job, speaker)
    say(Progress("prepare", f"portrait: {prepared.note}"))
    feats = session.features(job, speaker)
    text = None if speaker is None else spec.speakers[speaker].emotion or spec.emotion
    emotion = _emotion(session, spec, feats.audio_length, say, text)
    session.vae  # noqa: B018 - load before the first step, so the ETA measures sampling only
    return settings, prepared, AudioWindows(feats.windowed, feats.audio_length), emotion


def _write(session: Session, job: CheckedJob, settings: SamplingConfig, prepared: PreparedPortrait,
           windows: AudioWindows, emotion: Emotion, say: OnProgress, should_stop: Callable[[], bool] | None,
           metadata: dict[str, str] | None) -> Path:
    spec = job.spec
    photo, crop = _paste_target(job.photo, prepared.crop) if spec.paste_back else (None, None)
    wave, rate = job.sound
    clips = num_clips(windows, settings)
    total, start = clips * settings.steps, time.perf_counter()

    def on_step(clip: int, step: int, _latents) -> None:
        done = clip * settings.steps + step + 1
        eta = (time.perf_counter() - start) / done * (total - done)
        say(Progress("sample", f"clip {clip + 1}/{clips} step {step + 1}/{settings.steps}", clip + 1, clips, done,
                     total, eta))

    try:
        writer = Mp4Writer(spec.out, spec.fps, wave, rate, overwrite=spec.overwrite, metadata=metadata)
    except OutputError as e:  # the output changed since the checks (another process wrote it)
        raise JobError([Problem("out", str(e))]) from e
    with writer:
        for clip in iter_clips(session.net, session.vae, prepared.portrait, windows, emotion, settings,
                               on_step=on_step, should_stop=should_stop):
            _refuse_nonfinite(clip, session)
            frames = clip.frames
            if photo is not None:
                frames = torch.cat([paste_back(photo, part, crop) for part in frames.split(PASTE_CHUNK)])
            writer.write(frames)
    say(Progress("done", f"wrote {spec.out} ({writer.frames} frames, {time.perf_counter() - start:.1f} s sampling)"))
    return Path(spec.out)


def _refuse_nonfinite(clip: ClipResult, session: Session) -> None:
    if not bool(torch.isfinite(clip.latents).all()):
        raise JobError([Problem("checkpoint", f"clip {clip.index + 1} came out with NaN or infinite values: a model "
                                f"file under {session.models} or {session.checkpoint} is damaged, or {session.dtype} "
                                "overflowed; try --precision fp32, or download the models again")])


def _emotion(session: Session, spec: JobSpec, frames: int, say: OnProgress, text: str | None = None) -> Emotion:
    """One prompt (`text`, a conversation speaker's, else the job's), or the schedule resolved per frame (with
    each frame's emotion strength where a segment has one)."""
    texts = [text] if text else [s.text for s in spec.schedule] or [spec.emotion]
    encoded = [session.emotion(t, spec.truncate_prompt) for t in texts]
    for e in encoded:
        if e.dropped:
            say(Progress("prepare", f"prompt cut to CLIP's 77 tokens; dropped: {e.dropped!r}"))
    uncond = session.emotion("", False).hidden
    if text or not spec.schedule:
        return Emotion(encoded[0].hidden, uncond)
    segments = [(e.hidden[0], s.start, s.end) for e, s in zip(encoded, spec.schedule, strict=True)]
    strength = None
    if any(s.strength != 1.0 for s in spec.schedule):
        strength = strength_schedule([(s.strength, s.start, s.end) for s in spec.schedule], spec.crossfade, spec.fps,
                                     frames)
    return Emotion(emotion_schedule(segments, spec.crossfade, spec.fps, frames), uncond, strength)


def _paste_target(rgb: np.ndarray, crop: PortraitCrop) -> tuple[torch.Tensor, PortraitCrop]:
    """The photo (3, H, W) in [0, 1], scaled to at most PASTE_MAX_SIDE with even sides, and the crop in it."""
    h, w = rgb.shape[:2]
    scale = min(1.0, PASTE_MAX_SIDE / max(h, w))
    nw, nh = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
    if (nw, nh) != (w, h):
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.LANCZOS))
    sx, sy = nw / w, nh / h
    side = max(1, min(round(crop.side * sx), nw, nh))
    x0, y0 = min(round(crop.x0 * sx), nw - side), min(round(crop.y0 * sy), nh - side)
    scaled = PortraitCrop(x0, y0, side, nh, nw, crop.face_box)
    return torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1).contiguous(), scaled


# --- conversations: several speakers of one photo ------------------------------------------------------------

def _run_conversation(session: Session, job: CheckedJob, say: OnProgress, should_stop: Callable[[], bool] | None,
                      metadata: dict[str, str] | None) -> Path:
    """Each speaker generated in turn with the one set of models, their frames kept in a temporary file (not in
    memory) until the last speaker is done; then the photo with every speaker pasted in order (the later wins
    where crops overlap, a speaker whose track ends earlier holds their last frame), with the mix of the tracks."""
    previous, session.on_progress = session.on_progress, say
    try:
        parts = [_prepare(session, job, say, i) for i in range(len(job.spec.speakers))]
    finally:
        session.on_progress = previous
    # ignore_cleanup_errors: on Windows a file still mapped by a failing speaker's traceback cannot be removed yet
    with tempfile.TemporaryDirectory(prefix="emocast-speakers-", ignore_cleanup_errors=True) as tmp:
        frames = _generate_speakers(session, parts, Path(tmp), say, should_stop)
        try:
            return _write_conversation(job, [prepared.crop for _, prepared, _, _ in parts], frames, say, metadata)
        finally:
            del frames  # closes the memory-mapped files before their folder is removed (Windows needs that)


def _generate_speakers(session: Session, parts: list, folder: Path, say: OnProgress,
                       should_stop: Callable[[], bool] | None) -> list[np.ndarray]:
    """Every speaker's frames (n, 3, S, S) uint8, as memory-mapped files in `folder`."""
    steps = parts[0][0].steps
    counts = [num_clips(windows, settings) for settings, _, windows, _ in parts]
    total, start, stores = sum(counts) * steps, time.perf_counter(), []
    for i, (settings, prepared, windows, emotion) in enumerate(parts):
        side = prepared.portrait.pixels.shape[-1]
        store = np.lib.format.open_memmap(folder / f"speaker{i}.npy", mode="w+", dtype=np.uint8,
                                          shape=(windows.length, 3, side, side))
        before = sum(counts[:i]) * steps

        def on_step(clip: int, step: int, _latents, i: int = i, before: int = before) -> None:
            done = before + clip * steps + step + 1
            eta = (time.perf_counter() - start) / done * (total - done)
            say(Progress("sample", f"speaker {i + 1}/{len(parts)} clip {clip + 1}/{counts[i]} step {step + 1}/"
                                   f"{steps}", clip + 1, counts[i], done, total, eta))

        n = 0
        for clip in iter_clips(session.net, session.vae, prepared.portrait, windows, emotion, settings,
                               on_step=on_step, should_stop=should_stop):
            _refuse_nonfinite(clip, session)
            store[n:n + len(clip.frames)] = (clip.frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            n += len(clip.frames)
        stores.append(store)
    return stores


def _write_conversation(job: CheckedJob, crops: list[PortraitCrop], frames: list[np.ndarray], say: OnProgress,
                        metadata: dict[str, str] | None) -> Path:
    spec = job.spec
    targets = [_paste_target(job.photo, crop) for crop in crops]
    photo = targets[0][0]
    wave, rate = audio_lib.mix_tracks([job.speaker_sound(i) for i in range(len(crops))])
    total = max(len(f) for f in frames)
    try:
        writer = Mp4Writer(spec.out, spec.fps, wave, rate, overwrite=spec.overwrite, metadata=metadata)
    except OutputError as e:  # the output changed since the checks (another process wrote it)
        raise JobError([Problem("out", str(e))]) from e
    with writer:
        for first in range(0, total, PASTE_CHUNK):
            last = min(first + PASTE_CHUNK, total)
            layers = [(torch.from_numpy(f[held(len(f), first, last).numpy()]).float() / 255, crop)
                      for f, (_, crop) in zip(frames, targets, strict=True)]
            writer.write(compose(photo, layers))
    say(Progress("done", f"wrote {spec.out} ({writer.frames} frames, {len(crops)} speakers)"))
    return Path(spec.out)
