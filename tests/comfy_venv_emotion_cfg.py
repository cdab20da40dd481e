"""emotion_cfg and the Emotion Schedule's strengths in the nodes, with ComfyUI's own objects on the tiny
stand-in models (NOT a real model). Needs ComfyUI importable (tests/test_comfy_venv.py runs it under
the ComfyUI venv); skipped otherwise, with comfy_venv_nodes.py whose set-up and fixtures it shares."""
from __future__ import annotations

import math

import comfy_venv_nodes as base
import pytest
import torch
from comfy_venv_nodes import load_clip, mm, nodes_emotion, nodes_sampler, types

# base's fixtures: the tiny models, what the shipped workflow feeds the sampler, ComfyUI's inference mode
models, inputs, comfy_executor = base.models, base.inputs, base.comfy_executor


def _input(node, name: str):
    return next(i for i in node.define_schema().inputs if i.id == name)


def test_emotion_cfg_is_the_last_sampler_input_and_unset_is_the_released_guidance(inputs):
    """Both samplers take emotion_cfg last (saved widget values stay aligned), optional, -1 = same as cfg;
    -1, cfg itself and leaving it out give the same frames, another value other frames."""
    for node in (nodes_sampler.Sampler, nodes_sampler.SamplerToVideo):
        names = [i.id for i in node.define_schema().inputs]
        assert names[-2:] == ["cache_interval", "emotion_cfg"]
        widget = _input(node, "emotion_cfg")
        assert widget.optional and widget.default == widget.min == -1 and "-1: the same as cfg" in widget.tooltip
    released = nodes_sampler.Sampler.execute(**inputs)[0]
    for same in (-1.0, inputs["cfg"]):
        assert torch.equal(released, nodes_sampler.Sampler.execute(**inputs, emotion_cfg=same)[0]), same
    assert not torch.equal(released, nodes_sampler.Sampler.execute(**inputs, emotion_cfg=6.0)[0])


@pytest.mark.parametrize("value,message", [(math.nan, "emotion_cfg: nan is not a finite number"),
                                           (-0.5, "emotion_cfg: -0.5 is negative"),
                                           (25.0, "emotion_cfg: 25 is above 20")])
def test_bad_emotion_cfg_is_named_before_any_model_loads(inputs, monkeypatch, value, message):
    """ComfyUI's validation (before any node runs) gets one line naming the input; a linked value, which
    validation does not see, stops the sampler before it loads the model."""
    for node in (nodes_sampler.Sampler, nodes_sampler.SamplerToVideo):
        problem = node.validate_inputs(emotion_cfg=value)
        assert problem.startswith(message) and "or -1 for the same as cfg" in problem and "\n" not in problem
        assert node.validate_inputs(emotion_cfg=-1.0) is True and node.validate_inputs(emotion_cfg=0.0) is True
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(types.EmoCASTInputError, match=message):
        nodes_sampler.Sampler.execute(**inputs, emotion_cfg=value)


def test_schedule_strengths_are_last_crossfaded_and_reach_the_sampler(models, inputs):
    clip = load_clip(models)
    calm = nodes_emotion.EmotionEncode.execute(clip, "calm")[0]
    scared = nodes_emotion.EmotionEncode.execute(clip, "scared")[0]
    names = [i.id for i in nodes_emotion.EmotionSchedule.define_schema().inputs]
    assert names[-5:] == ["crossfade", "strength_1", "strength_2", "strength_3", "strength_4"]
    assert all(_input(nodes_emotion.EmotionSchedule, f"strength_{i}").optional for i in range(1, 5))
    ranges = dict(start_1=0.0, end_1=0.1, start_2=0.2, end_2=0.4, start_3=0.0, end_3=1.0, start_4=0.0, end_4=1.0)
    plain = nodes_emotion.EmotionSchedule.execute(0.1, emotion_1=calm, emotion_2=scared, **ranges)[0]
    out = nodes_emotion.EmotionSchedule.execute(0.1, emotion_1=calm, emotion_2=scared, strength_2=1.6, **ranges)
    strong = out[0]
    assert '0.2-0.4 s: "scared" @1.6' in out.ui.as_dict()["text"][0]
    fps, frames = inputs["emocast_audio"].fps, inputs["emocast_audio"].length
    a, b = calm.segments[0][0], scared.segments[0][0]
    mix = ((strong.per_frame(fps, frames) - a) * (b - a)).sum((1, 2)) / (b - a).pow(2).sum()  # weight of "scared"
    assert mix.min() == 0 and mix.max() > 0.999  # the crossfade lies inside the video
    torch.testing.assert_close(strong.per_frame_strength(fps, frames), 1 + 0.6 * mix, rtol=0, atol=1e-5)
    assert plain.per_frame_strength(fps, frames) is None
    released = nodes_sampler.Sampler.execute(**{**inputs, "emotion": plain})[0]
    assert not torch.equal(released, nodes_sampler.Sampler.execute(**{**inputs, "emotion": strong})[0])
    assert nodes_emotion.EmotionSchedule.validate_inputs(strength_3=-2.0).startswith("strength_3: -2 is negative")
    assert nodes_emotion.EmotionSchedule.validate_inputs(strength_1=0.0, strength_4=4.0) is True
    with pytest.raises(types.EmoCASTInputError, match="strength_2: nan is not a finite number"):
        nodes_emotion.EmotionSchedule.execute(0.1, emotion_1=calm, emotion_2=scared, strength_2=math.nan, **ranges)
