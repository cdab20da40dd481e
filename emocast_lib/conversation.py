"""Conversations: several people in one photo, each speaking their own track.

Each speaker's face is cut out of the photo (`face.crop_face`, faces counted from the left), animated
alone with their own track (the silence where the other one speaks is what makes them listen), and
pasted back in order (`face.paste_back`): where two crops overlap, the later speaker wins inside their
feathered mask. The video lasts as long as the longest speaker's; a speaker whose track ends earlier
holds their last frame. The sound is the mix of the tracks (`audio.mix_tracks`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .face import PortraitCrop, paste_back

__all__ = ["Layer", "held", "compose", "duplicate_faces"]

Layer = tuple[torch.Tensor, PortraitCrop]  # one speaker's frames (n, 3, S, S) in [0, 1] and where they go


def held(length: int, start: int, stop: int) -> torch.Tensor:
    """Frame indices start..stop-1 into a sequence of `length` frames that holds its last frame after its end."""
    if length < 1:
        raise ValueError("a frame sequence to paste has no frames")
    return torch.arange(start, stop).clamp(max=length - 1)


def compose(background: torch.Tensor, layers: Sequence[Layer], start: int = 0, stop: int | None = None,
            feather: int = 16) -> torch.Tensor:
    """Frames start..stop-1 (default: to the end of the longest sequence) of the photo (3, H, W) or background
    video (m, 3, H, W) with each layer pasted in order, every sequence holding its last frame -> (n, 3, H, W).
    Compose a long video a few frames at a time to keep memory small."""
    if not layers:
        raise ValueError("nothing to paste: give at least one speaker's frames")
    lengths = [len(frames) for frames, _ in layers] + ([len(background)] if background.ndim == 4 else [])
    stop = max(lengths) if stop is None else stop
    out = background if background.ndim == 3 else background[held(len(background), start, stop)]
    for frames, crop in layers:
        out = paste_back(out, frames[held(len(frames), start, stop)], crop, feather)
    return out


def duplicate_faces(indices: Sequence[int]) -> list[int]:
    """The face indices given to more than one speaker (each face speaks one track)."""
    return sorted({i for i in indices if list(indices).count(i) > 1})
