"""EmoCAST Emotion Encode and EmoCAST Emotion Schedule."""
from __future__ import annotations

import math

import torch
from comfy_api.latest import io, ui

from emocast_lib.emotion import emotion_embeddings, emotion_schedule, strength_problem
from emocast_lib.jobs.schema import Segment, limits, widget

from .convert import ComfyTextEncoder
from .sockets import EmoCASTEmotion
from .types import EmoCASTInputError, EmotionCond

SLOTS = 4


class EmotionEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EmoCASTEmotionEncode",
            display_name="EmoCAST Emotion Encode",
            category="EmoCAST",
            description="Free-text emotion -> EmoCAST emotion conditioning, computed as the original code does "
                        "(the text taken literally, CLIP's padding attention mask on, all 77 tokens) with the "
                        "empty prompt for guidance.",
            inputs=[
                io.Clip.Input("clip", tooltip="CLIP-L text encoder: core Load CLIP with clip_l.safetensors and "
                                              "type stable_diffusion (or the CLIP of an SD1.5 checkpoint)."),
                io.String.Input("text", multiline=True, **widget("emotion"),
                                tooltip="What the portrait feels, in plain words (at most 75 CLIP tokens). Taken "
                                        "literally: (word:1.2) weighting and embeddings are not applied."),
            ],
            outputs=[EmoCASTEmotion.Output("emotion", display_name="emotion",
                                           tooltip="Emotion conditioning for EmoCAST Sampler or EmoCAST "
                                                   "Emotion Schedule.")],
        )

    @classmethod
    def execute(cls, clip, text: str) -> io.NodeOutput:
        encoder = ComfyTextEncoder(clip)
        try:
            encoder.tokenize("")
        except ValueError as e:
            raise EmoCASTInputError(f"clip: {e}") from e
        try:
            cond, uncond = emotion_embeddings(encoder, text)
        except ValueError as e:
            raise EmoCASTInputError(f"text: {e}") from e
        if cond.hidden.shape[-1] != 768:
            raise EmoCASTInputError(f"clip: gives {cond.hidden.shape[-1]}-wide tokens; EmoCAST needs CLIP-L (768): "
                                    "load clip_l.safetensors with Load CLIP, type stable_diffusion")
        return io.NodeOutput(EmotionCond([(cond.hidden[0], 0.0, math.inf)], uncond.hidden, [cond.prompt]))


def _seconds(name: str) -> dict[str, float]:
    low, high = limits(name, Segment)  # the range the CLI and batch accept for a schedule segment
    return {"min": low, "max": high}


def _slot(i: int, start: float) -> list:
    optional = i > 2
    return [
        EmoCASTEmotion.Input(f"emotion_{i}", optional=optional,
                      tooltip=f"Emotion {i} (from EmoCAST Emotion Encode)" + (", optional." if optional else ".")),
        io.Float.Input(f"start_{i}", default=start, **_seconds("start"), step=0.1, round=0.01,
                       tooltip=f"When emotion {i} starts, in seconds of the video."),
        io.Float.Input(f"end_{i}", default=start + 1.5, **_seconds("end"), step=0.1, round=0.01,
                       tooltip=f"When emotion {i} ends, in seconds. The last emotion is held to the end."),
    ]


class EmotionSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EmoCASTEmotionSchedule",
            display_name="EmoCAST Emotion Schedule",
            category="EmoCAST",
            description="Several emotions over time: each emotion holds over its time range, and the change "
                        "between two consecutive emotions is a linear crossfade centred between them. Frames "
                        "before the first range take the first emotion, frames after the last keep the last.",
            inputs=[inp for i in range(1, SLOTS + 1) for inp in _slot(i, 1.5 * (i - 1))] + [
                io.Float.Input("crossfade", **widget("crossfade"), step=0.05, round=0.01,
                               tooltip="Length in seconds of each crossfade between two emotions (0: hard cut)."),
                # after the other widgets, so that workflows saved before them keep their values
                *(io.Float.Input(f"strength_{i}", **widget("strength", Segment), step=0.05, round=0.01, optional=True,
                                 tooltip=f"How strongly emotion {i} shows: a multiple of the sampler's emotion_cfg "
                                         "over its time range, crossfaded like the emotions. 1: as emotion_cfg "
                                         "(all 1: the released guidance); any other value costs a third "
                                         "half-batch per step in the clips it reaches.")
                  for i in range(1, SLOTS + 1)),
            ],
            outputs=[EmoCASTEmotion.Output("emotion", display_name="emotion",
                                           tooltip="Per-frame emotion conditioning for EmoCAST Sampler.")],
        )

    @classmethod
    def validate_inputs(cls, strength_1: float = 1.0, strength_2: float = 1.0, strength_3: float = 1.0,
                        strength_4: float = 1.0) -> bool | str:
        return strengths_problem(dict(strength_1=strength_1, strength_2=strength_2, strength_3=strength_3,
                                      strength_4=strength_4)) or True

    @classmethod
    def execute(cls, crossfade: float, **slots) -> io.NodeOutput:
        problem = strengths_problem(slots)  # also here: a linked value is not seen by validate_inputs
        if problem:
            raise EmoCASTInputError(problem)
        segments, prompts, uncond, strengths = [], [], None, []
        for i in range(1, SLOTS + 1):
            emotion: EmotionCond | None = slots.get(f"emotion_{i}")
            if emotion is None:
                continue
            if len(emotion.segments) != 1:
                raise EmoCASTInputError(f"emotion_{i}: is already a schedule; connect an EmoCAST Emotion Encode")
            if uncond is None:
                uncond = emotion.uncond
            elif not torch.equal(uncond, emotion.uncond):
                raise EmoCASTInputError(f"emotion_{i}: was encoded with another CLIP than emotion 1; use one "
                                        "Load CLIP for every emotion")
            start, end = slots[f"start_{i}"], slots[f"end_{i}"]
            segments.append((emotion.segments[0][0], float(start), float(end)))
            prompts.append(emotion.prompts[0])
            strengths.append(float(slots.get(f"strength_{i}", 1.0)))
        try:  # check the ranges here, so that the error points at this node (the sampler resolves frames)
            emotion_schedule(segments, crossfade, fps=1.0, num_frames=1)
        except ValueError as e:
            raise EmoCASTInputError(f"start/end: {e}") from e
        schedule = EmotionCond(segments, uncond, prompts, crossfade, tuple(strengths))
        return io.NodeOutput(schedule, ui=ui.PreviewText(schedule.describe()))


def strengths_problem(values: dict) -> str | None:
    """The first bad `strength_i` among `values` (one line naming it), or None."""
    return next((problem for i in range(1, SLOTS + 1)
                 if (problem := strength_problem(values.get(f"strength_{i}", 1.0), f"strength_{i}"))), None)
