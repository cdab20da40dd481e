"""Conversations in the library (emocast_lib.conversation, face.crop_face/pick_face, audio.pick_channel/mix_tracks):
which face a face index picks, the exactness of pasting several speakers, the stereo split and the mix.
The nodes are checked with ComfyUI's own objects in tests/comfy_venv_conversation.py."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from emocast_lib import audio, conversation, face
from emocast_lib.bench.tiny import write_stand_in_landmarker

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ROOT / "example_workflows" / "inputs"
TWO_PEOPLE = INPUTS / "emocast_two_people.jpg"  # the example portrait, left, and its mirror image, right


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def landmarker(tmp_path_factory) -> Path:
    """MediaPipe's real Tasks FaceLandmarker on the stand-in bundle (MediaPipe 0.10.21's own detector and face
    mesh, see emocast_lib/bench/tiny.py): its points lie on the faces, though not where the released model's do."""
    task = tmp_path_factory.mktemp("landmarker") / "face_landmarker_v2_with_blendshapes.task"
    write_stand_in_landmarker(task)
    return task


@pytest.fixture(scope="module")
def two_faces(landmarker: Path) -> list[np.ndarray]:
    with face.LandmarkDetector(landmarker, num_faces=face.MAX_FACES) as detect:
        return detect.faces(_rgb(TWO_PEOPLE))


def test_face_index_counts_from_the_left(landmarker: Path, two_faces: list[np.ndarray]):
    """Face i is the face found in the i-th half of the photo alone, and its crop lies in that half."""
    rgb = _rgb(TWO_PEOPLE)
    half = rgb.shape[1] // 2
    assert len(two_faces) == 2
    with face.LandmarkDetector(landmarker) as detect:
        alone = [detect(np.ascontiguousarray(rgb[:, i * half:(i + 1) * half])) + [i * half, 0] for i in range(2)]
    for index in range(2):
        picked, position = face.pick_face(two_faces, index)
        assert position == index
        distances = [np.abs(picked - a).mean() for a in alone]
        assert np.argmin(distances) == index, distances
        _, crop = face.crop_face(rgb, two_faces, index)
        assert (crop.face_index, crop.faces) == (index, 2)
        centre = crop.x0 + crop.side / 2
        assert index * half <= centre < (index + 1) * half
        assert crop == dataclasses.replace(face.crop_portrait(rgb, picked)[1], face_index=index, faces=2)


def test_auto_face_is_todays_choice(landmarker: Path, two_faces: list[np.ndarray]):
    """face index -1 (the nodes' default) crops exactly what Crop Portrait cropped before face indices existed:
    MediaPipe's one face with num_faces=1, on a photo with one face and on one with two."""
    for path, faces in ((TWO_PEOPLE, two_faces), (INPUTS / "emocast_photo.jpg", None)):
        rgb = _rgb(path)
        with face.LandmarkDetector(landmarker) as detect:
            before = detect(rgb)
        if faces is None:
            with face.LandmarkDetector(landmarker, num_faces=face.MAX_FACES) as detect:
                faces = detect.faces(rgb)
        assert np.array_equal(face.pick_face(faces, -1)[0], before)
        crop, where = face.crop_face(rgb, faces, -1)
        old_crop, old_where = face.crop_portrait(rgb, before)
        assert np.array_equal(crop, old_crop)
        assert (where.x0, where.y0, where.side, where.face_box) == (old_where.x0, old_where.y0, old_where.side,
                                                                   old_where.face_box)
        assert where.faces == len(faces)


@pytest.mark.parametrize("index", [2, 7, -2])
def test_a_face_the_photo_lacks_is_one_line_naming_the_count(two_faces: list[np.ndarray], index: int):
    with pytest.raises(ValueError, match=rf"no face {index}: 2 face\(s\) found in the photo, numbered 0 to 1") as e:
        face.pick_face(two_faces, index)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no face found"):
        face.pick_face([], 0)


def test_duplicate_face_indices_are_named():
    assert conversation.duplicate_faces([0, 1]) == []
    assert conversation.duplicate_faces([1, 0, 1, 2, 2]) == [1, 2]


# --- pasting several speakers ---------------------------------------------------------------------

def _support(crop: face.PortraitCrop, alpha: torch.Tensor, where) -> torch.Tensor:
    """(H, W) bool: the photo pixels under the crop where `where(alpha)` holds."""
    out = torch.zeros(crop.photo_height, crop.photo_width, dtype=torch.bool)
    out[crop.y0:crop.y0 + crop.side, crop.x0:crop.x0 + crop.side] = where(alpha)
    return out


def test_outside_every_crop_the_photo_inside_each_crop_its_speaker_alone():
    """Two speakers whose crops overlap, tracks of different lengths: outside both feathered masks every frame
    is the photo; where one speaker's mask is full and the other's is not there, the frame is that speaker's
    frame pasted alone; where both are, the later one wins; the shorter speaker holds their last frame."""
    gen = torch.Generator().manual_seed(0)
    photo = torch.rand(3, 90, 160, generator=gen)
    feather = 6
    crops = [face.PortraitCrop(10, 20, 64, 90, 160, (0, 0, 0, 0), 0, 2),
             face.PortraitCrop(60, 5, 72, 90, 160, (0, 0, 0, 0), 1, 2)]  # overlapping columns 60..73
    frames = [torch.rand(5, 3, 64, 64, generator=gen), torch.rand(8, 3, 72, 72, generator=gen)]
    video = conversation.compose(photo, list(zip(frames, crops)), feather=feather)
    assert video.shape == (8, 3, 90, 160)

    alphas = [face.feather_mask(c, feather) for c in crops]
    touched = [_support(c, a, lambda m: m > 0) for c, a in zip(crops, alphas)]
    full = [_support(c, a, lambda m: m == 1) for c, a in zip(crops, alphas)]
    outside = ~(touched[0] | touched[1])
    assert torch.equal(video[:, :, outside], photo[:, outside].expand(8, -1, -1))
    held_a = frames[0][[0, 1, 2, 3, 4, 4, 4, 4]]
    alone = [face.paste_back(photo, held_a, crops[0], feather), face.paste_back(photo, frames[1], crops[1], feather)]
    only_a = full[0] & ~touched[1]
    assert only_a.sum() > 100 and torch.equal(video[:, :, only_a], alone[0][:, :, only_a])
    assert full[1].sum() > 100 and torch.equal(video[:, :, full[1]], alone[1][:, :, full[1]])
    assert (full[1] & touched[0]).any(), "the crops overlap where the later speaker wins"
    # a few frames at a time (how the nodes and the CLI compose long videos) gives the same frames
    parts = [conversation.compose(photo, list(zip(frames, crops)), s, min(s + 3, 8), feather) for s in (0, 3, 6)]
    assert torch.equal(torch.cat(parts), video)


def test_pasting_onto_a_video_goes_frame_by_frame():
    gen = torch.Generator().manual_seed(1)
    crop = face.PortraitCrop(4, 4, 16, 32, 40, (0, 0, 0, 0))
    background, frames = torch.rand(3, 3, 32, 40, generator=gen), torch.rand(3, 3, 16, 16, generator=gen)
    out = face.paste_back(background, frames, crop, 2)
    for i in range(3):
        assert torch.equal(out[i], face.paste_back(background[i], frames[i:i + 1], crop, 2)[0])
    # a longer background: its frames go on under the speaker's held last frame
    longer = torch.rand(5, 3, 32, 40, generator=gen)
    video = conversation.compose(longer, [(frames, crop)], feather=2)
    assert len(video) == 5 and torch.equal(video[4], face.paste_back(longer[4], frames[2:], crop, 2)[0])
    with pytest.raises(ValueError, match="background video has 5 frames for 3"):
        face.paste_back(longer, frames, crop, 2)


# --- one track per speaker ------------------------------------------------------------------------

def _stereo(seconds: float = 0.6, rate: int = 16000) -> np.ndarray:
    """Distinct signals per channel: a 220 Hz tone left, noise right."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(3)
    return np.stack([0.4 * np.sin(2 * np.pi * 220 * t), 0.2 * rng.standard_normal(len(t))]).astype(np.float32)


def test_each_channel_reaches_its_speaker(preprocess_dir: Path):
    """left/right pick the channel itself, and the features of a speaker are those of that channel alone."""
    stereo = _stereo()
    assert np.array_equal(audio.pick_channel(stereo, "left"), stereo[:1])
    assert np.array_equal(audio.pick_channel(torch.from_numpy(stereo), "right"), stereo[1:])
    assert np.array_equal(audio.pick_channel(stereo, "mix"), stereo)
    encoder = audio.load_wav2vec2(preprocess_dir / "audio" / "tiny_wav2vec2_hubstyle")
    feats = {ch: audio.encode_audio(audio.to_16k_mono(audio.pick_channel(stereo, ch), 16000), encoder).windowed
             for ch in ("left", "right")}
    for ch, signal in (("left", stereo[0]), ("right", stereo[1])):
        assert torch.equal(feats[ch], audio.encode_audio(signal, encoder).windowed)
    assert not torch.allclose(feats["left"], feats["right"])


@pytest.mark.parametrize("channel,channels,message", [
    ("right", 1, "channel right asked for, but the audio has 1 channel"),
    ("3", 2, "channel 3 asked for, but the audio has 2 channel"),
    ("centre", 2, "unknown channel 'centre'"),
])
def test_a_channel_the_audio_lacks_is_one_line(channel: str, channels: int, message: str):
    with pytest.raises(ValueError, match=message) as e:
        audio.pick_channel(np.zeros((channels, 100), np.float32), channel)
    assert "\n" not in str(e.value)


def test_mix_pads_with_silence_at_the_first_tracks_rate():
    rng = np.random.default_rng(4)
    a, b = 0.1 * rng.standard_normal((1, 800)), 0.1 * rng.standard_normal((2, 1200))
    mix, rate = audio.mix_tracks([(a, 16000), (torch.from_numpy(b), 16000)])
    assert rate == 16000 and mix.shape == (2, 1200) and mix.dtype == np.float32
    expected = b.astype(np.float32).copy()
    expected[:, :800] += a.astype(np.float32)  # the mono track goes to both channels
    np.testing.assert_allclose(mix, expected, rtol=0, atol=1e-7)
    # another rate is resampled to the first track's, and its length follows
    mix, rate = audio.mix_tracks([(a, 16000), (b[:, :600], 8000)])
    assert rate == 16000 and mix.shape == (2, 1200)
    # louder than full scale: scaled as a whole, not clipped
    loud, _ = audio.mix_tracks([(np.full((1, 10), 0.8), 8000), (np.full((1, 5), 0.8), 8000)])
    np.testing.assert_allclose(loud[0], [1.0] * 5 + [0.5] * 5, rtol=1e-6)


def test_the_example_tracks_mix_to_the_example_speech():
    """The template's two tracks are the example speech split at a pause: together they are the speech."""
    speech, rate = soundfile.read(INPUTS / "emocast_speech.wav", dtype="float32", always_2d=True)
    tracks = [soundfile.read(INPUTS / f"emocast_conversation_{side}.wav", dtype="float32", always_2d=True)
              for side in ("left", "right")]
    mix, mix_rate = audio.mix_tracks([(w.T, r) for w, r in tracks])
    assert mix_rate == rate and np.array_equal(mix, speech.T)
    assert all(np.abs(w).max() > 0.1 and (w == 0).mean() > 0.3 for w, _ in tracks), "each speaks, each listens"


def test_a_track_shorter_than_one_frame_is_refused_before_encoding():
    with pytest.raises(ValueError, match=r"shorter than one video frame at 25 fps") as e:
        audio.check_length(np.zeros(600, np.float32), 25)
    assert "\n" not in str(e.value)
    audio.check_length(np.zeros(640, np.float32), 25)
