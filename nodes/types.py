"""What travels on the pack's EMOCAST_* sockets. Plain dataclasses, no ComfyUI import, so the
conversions can be tested without a ComfyUI tree. EMOCAST_CROP_INFO carries the library's own
`emocast_lib.face.PortraitCrop`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from emocast_lib.emotion import emotion_schedule, strength_schedule


class EmoCASTInputError(ValueError):
    """Bad input to a node; the message names the input and says what to do."""


@dataclass
class AudioCond:
    """EMOCAST_AUDIO: wav2vec2 windows for the whole utterance, and the sound trimmed/padded to the video."""

    windows: torch.Tensor  # (frames padded to whole clips, 5, layers, C)
    length: int  # real video frames = ceil(seconds * fps)
    fps: int
    clip_length: int
    audio: dict  # ComfyUI AUDIO lasting exactly length / fps seconds


@dataclass
class EmotionCond:
    """EMOCAST_EMOTION: one or more timed emotion prompts; resolved per frame by the sampler, which
    is the first node that knows the frame rate and the video length."""

    segments: list[tuple[torch.Tensor, float, float]]  # ((77, D) hidden states, start s, end s)
    uncond: torch.Tensor  # (1, 77, D) empty prompt, for guidance
    prompts: list[str]
    crossfade: float = 0.0
    strengths: tuple[float, ...] = ()  # one per segment, multiples of the sampler's emotion_cfg; () = all 1

    @property
    def width(self) -> int:
        return self.uncond.shape[-1]

    def per_frame(self, fps: float, frames: int) -> torch.Tensor:
        """(1, 77, D) for a single emotion, else (frames, 77, D)."""
        if len(self.segments) == 1:
            return self.segments[0][0][None]
        return emotion_schedule(self.segments, self.crossfade, fps, frames)

    def per_frame_strength(self, fps: float, frames: int) -> torch.Tensor | None:
        """(frames,) strengths crossfaded like the prompts, or None when every segment's is 1."""
        if all(s == 1.0 for s in self.strengths):
            return None
        timed = [(s, start, end) for s, (_, start, end) in zip(self.strengths, self.segments, strict=True)]
        return strength_schedule(timed, self.crossfade, fps, frames)

    def describe(self) -> str:
        if len(self.segments) == 1:
            return f'"{self.prompts[0]}" for the whole video'
        strengths = self.strengths or (1.0,) * len(self.segments)
        lines = [f'{start:g}-{end:g} s: "{p}"' + (f" @{s:g}" if s != 1.0 else "")
                 for (_, start, end), p, s in zip(self.segments, self.prompts, strengths)]
        return "\n".join(lines + [f"crossfade {self.crossfade:g} s"])


@dataclass
class FaceInfo:
    """EMOCAST_FACE: the analysed portrait and everything the sampler needs from it, so the portrait is
    wired once (into Face Analysis)."""

    image: torch.Tensor  # (H, W, 3) 0..1, the analysed portrait
    landmarks: np.ndarray  # (478, 2) pixels
    identity: np.ndarray  # (512,) raw ArcFace embedding; zeros = no identity
    expand_ratio: float
    note: str = ""
