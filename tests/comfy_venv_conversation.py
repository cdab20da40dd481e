"""A conversation through the nodes with ComfyUI's own objects, on tiny stand-in models (`make-tiny-models`, NOT a
real model): Crop Portrait's face index on a photo with two people, two speakers generated and pasted by two
chained Paste Backs, Audio Encode's channel choice on a stereo recording and Mix Audio. Runs in the ComfyUI venv
with COMFY_DIR set, as tests/comfy_venv_nodes.py (tests/test_comfy_venv.py launches it); skipped otherwise.
"""
from __future__ import annotations

import math
from pathlib import Path

import comfy_venv_nodes
import numpy as np
import pytest
import torch

# Importing comfy_venv_nodes puts ComfyUI on sys.path, or skips this module where it is not importable. Its
# fixtures: comfy_executor runs every node under inference mode as ComfyUI's executor does; `inputs` are what
# the shipped workflow feeds the sampler (model, VAE, emotion... of the tiny models).
comfy_executor, models, inputs = comfy_venv_nodes.comfy_executor, comfy_venv_nodes.models, comfy_venv_nodes.inputs

import comfy.model_management as mm  # noqa: E402
import soundfile  # noqa: E402
from comfy_audio_encoder import core_audio_encoder  # noqa: E402

from emocast_lib import audio as audio_lib  # noqa: E402
from emocast_lib import conversation, layout  # noqa: E402
from emocast_lib import face as face_lib  # noqa: E402
from packimport import pack_module  # noqa: E402

nodes_audio, nodes_face, nodes_sampler = pack_module("audio"), pack_module("face"), pack_module("sampler")
types = pack_module("types")
INPUTS = comfy_venv_nodes.INPUTS
TWO_PEOPLE = INPUTS / "emocast_two_people.jpg"
FACES = "face_analysis/models"
FEATHER = 8


def track(side: str, start: float, seconds: float) -> dict:
    """A stretch of the template's left or right speaker track as ComfyUI's AUDIO."""
    wave, rate = soundfile.read(INPUTS / f"emocast_conversation_{side}.wav", dtype="float32", always_2d=True)
    part = wave.T[:, round(start * rate):round((start + seconds) * rate)]
    return {"waveform": torch.from_numpy(np.ascontiguousarray(part))[None], "sample_rate": rate}


@pytest.fixture(scope="module")
def encoder(models: Path):
    return core_audio_encoder(layout.WAV2VEC.path(models))


def test_face_index_picks_the_faces_from_the_left(models):
    photo = comfy_venv_nodes.load_image(TWO_PEOPLE)
    rgb = (photo[0] * 255).round().to(torch.uint8).numpy()
    faces = nodes_face.detect_faces(nodes_face.face_folder(FACES), rgb)
    half = photo.shape[2] // 2
    for index in (0, 1):
        portrait, crop = nodes_face.CropPortrait.execute(photo, FACES, 64, 2.0, index).args
        assert (crop.face_index, crop.faces) == (index, 2)
        assert index * half <= crop.x0 + crop.side / 2 < (index + 1) * half, "the crop is around face i"
        assert crop == face_lib.crop_face(rgb, faces, index, 2.0)[1]
    # the default is the face Crop Portrait took before face indices existed (one MediaPipe face)
    before = face_lib.crop_portrait(rgb, nodes_face.detect_landmarks(nodes_face.face_folder(FACES), rgb), 2.0)[1]
    default = nodes_face.CropPortrait.execute(photo, FACES, 64, 2.0).args[1]
    assert (default.x0, default.y0, default.side) == (before.x0, before.y0, before.side)
    with pytest.raises(types.EmoCASTInputError,
                       match=r"^face_index: there is no face 2: 2 face\(s\) found in the photo, numbered 0 to 1"):
        nodes_face.CropPortrait.execute(photo, FACES, 64, 2.0, 2)


def speaker(inputs: dict, encoder, photo: torch.Tensor, index: int, sound: dict, seed: int):
    """One speaker of the photo through the nodes: (frames, audio, fps, crop_info)."""
    portrait, crop = nodes_face.CropPortrait.execute(photo, FACES, 64, 2.0, index).args
    face = nodes_face.FaceAnalysis.execute(portrait, FACES, 1.2, True)[0]
    cond = nodes_audio.AudioEncode.execute(sound, encoder, 25, 16)[0]
    frames, audio, fps, _ = nodes_sampler.Sampler.execute(**{**inputs, "face": face, "emocast_audio": cond,
                                                             "seed": seed, "steps": 1}).args
    return frames, audio, fps, crop


def _mask(crop, where) -> torch.Tensor:
    out = torch.zeros(crop.photo_height, crop.photo_width, dtype=torch.bool)
    out[crop.y0:crop.y0 + crop.side, crop.x0:crop.x0 + crop.side] = where(face_lib.feather_mask(crop, FEATHER))
    return out


def test_two_speakers_pasted_by_two_paste_backs(inputs, encoder):
    """Outside every feathered crop the video is the photo; inside speaker i's crop (away from the feather
    and the other crop) it is speaker i's generated frames pasted alone; the shorter speaker holds their last
    frame; Mix Audio gives the mix of the samplers' sounds, at their rate, as long as the video."""
    photo = comfy_venv_nodes.load_image(TWO_PEOPLE)
    left = speaker(inputs, encoder, photo, 0, track("left", 0.0, 0.4), 7)  # 10 frames
    right = speaker(inputs, encoder, photo, 1, track("right", 1.75, 0.2), 8)  # 5 frames
    assert (len(left[0]), len(right[0])) == (10, 5)
    first = nodes_face.PasteBack.execute(left[0], left[3], photo, FEATHER)[0]
    video = nodes_face.PasteBack.execute(right[0], right[3], first, FEATHER)[0]
    assert video.shape == (10, *photo.shape[1:])

    crops = (left[3], right[3])
    touched = [_mask(c, lambda m: m > 0) for c in crops]
    full = [_mask(c, lambda m: m == 1) for c in crops]
    outside = ~(touched[0] | touched[1])
    assert torch.equal(video[:, outside], photo[0][outside].expand(10, -1, -1))
    held = right[0][conversation.held(5, 0, 10)]
    alone = [nodes_face.PasteBack.execute(left[0], left[3], photo, FEATHER)[0],
             nodes_face.PasteBack.execute(held, right[3], photo, FEATHER)[0]]
    for i in (0, 1):
        inside = full[i] & ~touched[1 - i]
        assert inside.sum() > 500 and torch.equal(video[:, inside], alone[i][:, inside]), f"speaker {i}"
    assert not torch.equal(video[4], video[9]), "the left speaker goes on moving"

    mixed = nodes_audio.MixAudio.execute(left[1], right[1])[0]
    rate = left[1]["sample_rate"]
    assert mixed["sample_rate"] == rate == 16000
    assert mixed["waveform"].shape[-1] == math.ceil(len(video) * rate / left[2])
    expected = left[1]["waveform"].clone()
    expected[..., :right[1]["waveform"].shape[-1]] += right[1]["waveform"]
    assert torch.allclose(mixed["waveform"], expected, atol=1e-7)


def test_a_shorter_background_video_holds_its_last_frame(models):
    photo = comfy_venv_nodes.load_image(TWO_PEOPLE)
    crop = nodes_face.CropPortrait.execute(photo, FACES, 64, 2.0, 1).args[1]
    background = torch.rand(3, *photo.shape[1:])
    frames = torch.rand(6, 64, 64, 3)
    out = nodes_face.PasteBack.execute(frames, crop, background, FEATHER)[0]
    assert len(out) == 6
    outside = ~_mask(crop, lambda m: m > 0)
    assert torch.equal(out[5][outside], background[2][outside])


def test_each_channel_of_a_stereo_recording_reaches_its_speaker(encoder):
    left, right = track("left", 0.0, 0.4), track("right", 1.75, 0.4)
    stereo = {"waveform": torch.cat([left["waveform"], right["waveform"]], dim=1), "sample_rate": 16000}
    for channel, alone in (("left", left), ("right", right)):
        cond, sound = nodes_audio.AudioEncode.execute(stereo, encoder, 25, 16, channel).args
        assert torch.equal(cond.windows, nodes_audio.AudioEncode.execute(alone, encoder, 25, 16)[0].windows)
        assert torch.equal(sound["waveform"], alone["waveform"]), "the audio output is that channel"
    mixed = nodes_audio.AudioEncode.execute(stereo, encoder, 25, 16)[0]  # the default: both, averaged
    assert not torch.equal(mixed.windows, nodes_audio.AudioEncode.execute(left, encoder, 25, 16)[0].windows)


def test_bad_tracks_are_one_line_before_the_encoder_loads(encoder, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the audio encoder was loaded for bad input")

    monkeypatch.setattr(mm, "load_model_gpu", no_loading)
    mono = track("left", 0.0, 0.4)
    with pytest.raises(types.EmoCASTInputError, match=r"^channel: channel right asked for, but the audio has 1 "):
        nodes_audio.AudioEncode.execute(mono, encoder, 25, 16, "right")
    short = {"waveform": mono["waveform"][..., :300].repeat(1, 2, 1), "sample_rate": 16000}  # < 640 samples
    with pytest.raises(types.EmoCASTInputError, match=r"^audio: .*shorter than one video frame"):
        nodes_audio.AudioEncode.execute(short, encoder, 25, 16, "left")
    with pytest.raises(types.EmoCASTInputError, match=r"^audio_2: the audio is empty"):
        nodes_audio.MixAudio.execute(mono, {"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000})
    assert audio_lib.CHANNELS[:3] == ("mix", "left", "right")
