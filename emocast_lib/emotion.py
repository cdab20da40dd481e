"""Emotion prompt -> CLIP-L text hidden states as EmoCAST computes them, and per-frame emotion schedules.

The reference tokenises to 77 ids (start token, text, end token, padded with the end token, never
truncated) and runs the text encoder WITH the padding attention mask; it uses `last_hidden_state`
(all 77 positions) for the prompt and for the empty prompt (guidance). Any `TextEncoder` fits: here a
transformers `CLIPTokenizer` + `CLIPTextModel` (`HFTextEncoder`); the ComfyUI nodes adapt ComfyUI's
CLIP object to the same protocol (`nodes/convert.py`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

__all__ = ["MAX_TOKENS", "EncodedText", "TextEncoder", "HFTextEncoder", "load_clip_tokenizer", "pad_ids",
           "encode_prompt", "emotion_embeddings", "emotion_schedule", "EMOTION_CFG_RANGE", "STRENGTH_RANGE",
           "emotion_cfg_problem", "strength_problem", "strength_schedule", "split_strength"]

MAX_TOKENS = 77
# Emotion guidance (sampling.py): emotion_cfg is a guidance scale with cfg's range; a schedule segment's
# strength multiplies it (1 leaves it as it is).
EMOTION_CFG_RANGE = (0.0, 20.0)
STRENGTH_RANGE = (0.0, 4.0)


class TextEncoder(Protocol):
    def tokenize(self, prompt: str) -> list[int]:
        """Prompt -> ids with start and end token, unpadded, of any length."""

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(1, 77) ids and padding mask -> (1, 77, D) last hidden state."""


@dataclass
class EncodedText:
    prompt: str            # the prompt as encoded (after truncation, if any)
    input_ids: torch.Tensor       # (1, 77) int64
    attention_mask: torch.Tensor  # (1, 77) int64, 1 up to and including the first end token
    hidden: torch.Tensor          # (1, 77, D) float32
    dropped: str = ""      # words removed by truncate=True


def pad_ids(ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids with start/end token -> ((1, 77) ids padded with the end token, (1, 77) mask)."""
    if len(ids) > MAX_TOKENS:
        raise ValueError(f"{len(ids)} tokens do not fit the {MAX_TOKENS}-token CLIP window")
    end = int(ids[-1])
    padded = list(ids) + [end] * (MAX_TOKENS - len(ids))
    mask = [1] * len(ids) + [0] * (MAX_TOKENS - len(ids))
    return torch.tensor([padded], dtype=torch.int64), torch.tensor([mask], dtype=torch.int64)


def encode_prompt(encoder: TextEncoder, prompt: str, truncate: bool = False) -> EncodedText:
    """Prompt -> EncodedText. Longer than 77 tokens: ValueError, or with `truncate` whole trailing words
    are removed until it fits and listed in `dropped`."""
    ids, words, dropped = encoder.tokenize(prompt), prompt.split(), []
    if len(ids) > MAX_TOKENS and not truncate:
        raise ValueError(f"the emotion prompt has {len(ids) - 2} tokens; CLIP takes at most {MAX_TOKENS - 2}: "
                         f"shorten it by {len(ids) - MAX_TOKENS} tokens (about a word each) or enable truncation")
    while len(ids) > MAX_TOKENS:
        dropped.insert(0, words.pop())
        prompt = " ".join(words)
        ids = encoder.tokenize(prompt)
    input_ids, mask = pad_ids(ids)
    hidden = encoder.encode(input_ids, mask).float()
    return EncodedText(prompt, input_ids, mask, hidden, " ".join(dropped))


def emotion_embeddings(encoder: TextEncoder, prompt: str, truncate: bool = False) -> tuple[EncodedText, EncodedText]:
    """(prompt, empty prompt) encodings: the conditional and the guidance (unconditional) text tokens."""
    return encode_prompt(encoder, prompt, truncate), encode_prompt(encoder, "")


class HFTextEncoder:
    """transformers `CLIPTokenizer` + `CLIPTextModel` (fp32, eval), as the reference calls them."""

    def __init__(self, tokenizer, text_model):
        self.tokenizer, self.text_model = tokenizer, text_model.eval()

    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, truncation=False)["input_ids"])

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = next(self.text_model.parameters()).device
        out = self.text_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        return out.last_hidden_state.cpu()


def load_clip_tokenizer(folder: str | Path):
    """CLIP BPE tokenizer from a local folder with vocab.json and merges.txt (an SD1.5 `tokenizer/`
    folder, or ComfyUI's `comfy/sd1_tokenizer`)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    missing = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"CLIP tokenizer folder {folder} lacks {', '.join(missing)}: use the tokenizer/ "
                                "folder of stable-diffusion-v1-5 or ComfyUI's comfy/sd1_tokenizer")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def emotion_schedule(segments: Sequence[tuple[torch.Tensor, float, float]], crossfade_s: float, fps: float,
                     num_frames: int) -> torch.Tensor:
    """Per-frame emotion tokens (num_frames, 77, D) from [(embedding (77, D), start_s, end_s), ...].

    Frame i is at t = i / fps. Segments must not overlap; between two consecutive segments the
    boundary is the middle of the gap (the start of the later one when they touch), so a gap is split
    evenly, frames before the first segment take the first emotion and frames after the last one keep
    the last. Across each boundary b the weight of the later emotion rises linearly from 0 at
    b - crossfade_s/2 to 1 at b + crossfade_s/2 (crossfade_s = 0: hard switch at b).
    """
    if not segments:
        raise ValueError("the emotion schedule needs at least one (embedding, start, end) segment")
    if fps <= 0 or num_frames <= 0 or crossfade_s < 0:
        raise ValueError(f"need fps > 0, frames > 0 and crossfade >= 0 (got {fps}, {num_frames}, {crossfade_s})")
    segs = sorted(segments, key=lambda s: s[1])
    shape = segs[0][0].shape
    for emb, start, end in segs:
        if emb.shape != shape:
            raise ValueError(f"all emotion embeddings must have one shape, got {tuple(emb.shape)} and {tuple(shape)}")
        if end <= start:
            raise ValueError(f"emotion segment ends ({end} s) before it starts ({start} s)")
    t = torch.arange(num_frames, dtype=torch.float64) / fps
    out = segs[0][0].to(torch.float32).expand(num_frames, *shape).clone()
    for (_, _, prev_end), (emb, start, _) in zip(segs, segs[1:]):
        if start < prev_end:
            raise ValueError(f"emotion segments overlap: one ends at {prev_end} s, the next starts at {start} s")
        boundary = (prev_end + start) / 2
        w = ((t - boundary) / crossfade_s + 0.5).clamp(0, 1) if crossfade_s > 0 else (t >= boundary).double()
        w = w.to(torch.float32).view(-1, *([1] * len(shape)))
        out = out * (1 - w) + emb.to(torch.float32) * w
    return out


def strength_schedule(segments: Sequence[tuple[float, float, float]], crossfade_s: float, fps: float,
                      num_frames: int) -> torch.Tensor:
    """Per-frame emotion strengths (num_frames,) from [(strength, start_s, end_s), ...], crossfaded
    exactly as `emotion_schedule` crossfades the prompts of the same segments."""
    return emotion_schedule([(torch.tensor(float(s)), start, end) for s, start, end in segments], crossfade_s, fps,
                            num_frames)



# A schedule segment's text may end in "@<strength>": "4-9 s: terrified @1.6" (a number after the @; other
# text after an @, "@home", stays part of the prompt).
_STRENGTH_SUFFIX = re.compile(r"\s@\s*([-+]?(?:\d|\.\d|nan|inf)\S*)\s*$", re.IGNORECASE)


def split_strength(text: str) -> tuple[str, float]:
    """Segment text -> (emotion text, strength): a trailing "@1.6" is the strength (1 without one). Raises
    ValueError (one line) for a suffix that is not a usable strength."""
    match = _STRENGTH_SUFFIX.search(" " + text)
    if match is None:
        return text.strip(), 1.0
    try:
        strength = float(match.group(1))
    except ValueError:
        raise ValueError(f"strength: {match.group(1)!r} after '@' is not a number; end the segment with "
                         "@ and a multiple of emotion_cfg, e.g. @1.6") from None
    problem = strength_problem(strength)
    if problem:
        raise ValueError(problem)
    return text[: max(match.start() - 1, 0)].strip(), strength


def emotion_cfg_problem(value: object, unset: str = "leave it unset") -> str | None:
    """One line saying what is wrong with an emotion_cfg value, or None when it is a usable scale;
    `unset` says how the caller asks for cfg's scale."""
    low, high = EMOTION_CFG_RANGE
    return _range_problem("emotion_cfg", value, EMOTION_CFG_RANGE,
                          f"give a guidance scale from {low:g} to {high:g}, or {unset} for the same as cfg")


def strength_problem(value: object, name: str = "strength") -> str | None:
    """One line saying what is wrong with a segment strength called `name`, or None when it is usable."""
    low, high = STRENGTH_RANGE
    return _range_problem(name, value, STRENGTH_RANGE, f"give a multiple of emotion_cfg from {low:g} to {high:g} "
                                                       "(1: emotion_cfg as it is)")


def _range_problem(name: str, value: object, limits: tuple[float, float], fix: str) -> str | None:
    low, high = limits
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name}: {value!r} is not a number; {fix}"
    if not math.isfinite(value):
        return f"{name}: {value} is not a finite number; {fix}"
    if not low <= value <= high:
        return f"{name}: {value:g} is {'negative' if value < low else f'above {high:g}'}; {fix}"
    return None
