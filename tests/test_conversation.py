"""Conversations in the library (emocast_lib.conversation, face.crop_face/pick_face, audio.pick_channel/mix_tracks):
which face a face index picks, the exactness of pasting several speakers, the stereo split and the mix.
The nodes are checked with ComfyUI's own objects in tests/comfy_venv_conversation.py."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import soxr
import torch
from PIL import Image

from emocast_lib import audio, cli, conversation, face, layout, photo
from emocast_lib.batch import read_jobs, read_record
from emocast_lib.bench.tiny import write_stand_in_landmarker
from emocast_lib.cli import main
from emocast_lib.jobs.schema import parse_speaker

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


# --- the command line and the batch file ----------------------------------------------------------

def test_speaker_syntax():
    """FACE:AUDIO[@CHANNEL][:EMOTION]: the emotion may hold colons, a Windows drive letter is part of AUDIO."""
    cases = {"0:alice.wav:A cheerful host.": (0, "alice.wav", "A cheerful host.", "mix"),
             "1:talk.wav@right:Nervous: very.": (1, "talk.wav", "Nervous: very.", "right"),
             "1:C:\\talks\\b.wav:Calm": (1, "C:\\talks\\b.wav", "Calm", "mix"),
             "2:b.wav": (2, "b.wav", None, "mix")}
    for text, (face_index, path, emotion, channel) in cases.items():
        speaker = parse_speaker(text)
        assert (speaker.face, speaker.audio, speaker.emotion, speaker.channel) == (face_index, Path(path), emotion,
                                                                                  channel)
    for text, message in (("x:b.wav", "FACE 'x' is not a face number"), ("0:", "is not FACE:AUDIO"),
                          ("0:b.wav@up", "channel 'up' is not one of mix, left, right"),
                          ("9:b.wav", "face 9 is out of range; use a value from 0 to 7")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_speaker(text)


@pytest.fixture(scope="module")
def tracks(tmp_path_factory) -> dict[str, Path]:
    """A stereo recording at 44.1 kHz with one speaker per channel (the template's left track's first 0.4 s
    left, 0.4 s of its right track right), one of them alone in a mono file, its first half, and a track of
    300 samples."""
    folder = tmp_path_factory.mktemp("tracks")
    left, rate = soundfile.read(INPUTS / "emocast_conversation_left.wav", dtype="float32")
    right, _ = soundfile.read(INPUTS / "emocast_conversation_right.wav", dtype="float32")
    n = int(0.4 * rate)
    stereo = soxr.resample(np.stack([left[:n], right[int(1.75 * rate):int(1.75 * rate) + n]], axis=1), rate, 44100)
    soundfile.write(folder / "talk.wav", stereo, 44100, subtype="FLOAT")
    soundfile.write(folder / "left.wav", left[:n], rate)
    soundfile.write(folder / "half.wav", left[:n // 2], rate)
    soundfile.write(folder / "short.wav", left[:300], rate)
    return {"talk": folder / "talk.wav", "left": folder / "left.wav", "half": folder / "half.wav",
            "short": folder / "short.wav"}


BAD = {  # --speaker arguments -> the one error line, {name} standing for the tracks' paths
    "with --audio": (["0:{left}", "1:{left}", "--audio", "{left}"],
                     "--speaker: does not go with --audio: each speaker's track comes with their --speaker; leave "
                     "--audio out"),
    "duplicate face": (["0:{left}", "0:{talk}@right"],
                       "--speaker: face 0 is given to 2 speakers; give each face one speaker (one track)"),
    "face the photo lacks": (["0:{left}", "3:{left}"],
                             f"--speaker: {TWO_PEOPLE}: there is no face 3: 2 face(s) found in the photo, "
                             "numbered 0 to 1 from left to right"),
    "shorter than a frame": (["0:{short}", "1:{left}"],
                             "--speaker: {short} lasts 19 ms, shorter than one video frame at 25 fps; give a longer "
                             "speech file"),
    "channel it lacks": (["0:{left}@right"],
                         "--speaker: {left}: channel right asked for, but the audio has 1 channel(s): choose mix, or "
                         "give a recording with one speaker per channel"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_conversation_is_one_line_before_any_model_loads(case, tracks, tiny_models, tmp_path, capsys,
                                                               monkeypatch):
    def no_session(*args, **kwargs):
        raise AssertionError("models were loaded for a job that cannot run")

    monkeypatch.setattr(cli, "Session", no_session)
    speakers, line = BAD[case]
    args = []
    for item in speakers:
        args += [item] if item.startswith("--") or item == "{left}" else ["--speaker", item]
    args = [a.format(**tracks) for a in args]
    out = tmp_path / "o.mp4"
    code = main(["generate", "--models", str(tiny_models), "--image", str(TWO_PEOPLE), "--out", str(out), *args])
    assert code == 2 and capsys.readouterr().err.splitlines() == [f"error: {line.format(**tracks)}"]
    assert not out.exists()


def _decode(path: Path) -> tuple[list[np.ndarray], np.ndarray, int]:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        rate = container.streams.audio[0].sample_rate
        sound = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    return frames, sound, rate


@pytest.mark.slow
def test_cli_conversation_from_one_stereo_recording(tracks, tiny_models, tmp_path, capsys):
    """Each channel to its face, the faces the library picks, the photo's size, the longest track's length, and
    the mix of the channels at the recording's rate as the sound."""
    out = tmp_path / "talk.mp4"
    assert main(["generate", "--models", str(tiny_models), "--image", str(TWO_PEOPLE), "--steps", "1",
                 "--speaker", f"0:{tracks['talk']}@left:A cheerful host.",
                 "--speaker", f"1:{tracks['talk']}@right:A nervous guest.", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(printed.count(f"loading {f.what} from") == 1 for f in (layout.NET, layout.WAV2VEC, layout.VAE)), \
        "the models load once for both speakers"
    rgb = _rgb(TWO_PEOPLE)
    with face.LandmarkDetector(layout.LANDMARKER.path(tiny_models), num_faces=face.MAX_FACES) as detect:
        faces = detect.faces(rgb)
    crops = [face.crop_face(rgb, faces, i)[1] for i in range(2)]
    for i, c in enumerate(crops):
        assert (f"portrait: face {i} of 2 (from the left), cropped {c.side}x{c.side} at ({c.x0}, {c.y0}) of the "
                f"640x320 photo") in printed
    frames, sound, rate = _decode(out)
    assert len(frames) == 10 and frames[0].shape == rgb.shape  # 0.4 s at 25 fps, the photo's size
    between = slice(crops[0].x0 + crops[0].side + 16, crops[1].x0 - 16)  # no crop there: the photo (H.264 aside)
    assert np.abs(np.stack(frames)[:, :, between].astype(float) - rgb[:, between]).mean() < 3
    stereo, _ = soundfile.read(tracks["talk"], dtype="float32")
    mix = stereo.sum(axis=1)
    assert rate == 44100 and sound.shape[0] == 1
    assert abs(sound.shape[1] - len(mix)) < 2048  # AAC frames: the sound lasts as long as the 10 frames
    middle = slice(4096, len(mix) - 4096)  # AAC's priming edges aside
    fit = {name: np.corrcoef(sound[0, middle], ref[middle])[0, 1] for name, ref in
           (("mix", mix), ("left", stereo[:, 0]), ("right", stereo[:, 1]))}
    assert fit["mix"] > 0.9 and fit["mix"] > max(fit["left"], fit["right"]) + 0.15, fit  # both voices are in it


def test_batch_speakers_field(tracks, tmp_path):
    """The speakers field: a list of objects or of --speaker texts (JSONL), or --speaker texts joined by | in a
    CSV cell; audio paths resolve against the jobs file; a line with speakers and audio is one error."""
    entry = {"face": 1, "audio": "talk.wav", "channel": "right", "emotion": "A nervous guest."}
    lines = [{"image": "two.jpg", "out": "a.mp4", "speakers": [entry, "0:left.wav:A cheerful host."]},
             {"image": "two.jpg", "out": "b.mp4", "speakers": [entry], "audio": "left.wav", "emotion": "calm"},
             {"image": "two.jpg", "out": "c.mp4", "speakers": []},
             {"image": "two.jpg", "out": "d.mp4", "speakers": [{"face": 1, "audio": "x.wav", "mood": "happy"}]}]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    parsed = read_jobs(jobs)
    speakers = parsed[0].values["speakers"]
    assert [(s.face, s.audio, s.channel, s.emotion) for s in speakers] == [
        (1, tmp_path / "talk.wav", "right", "A nervous guest."), (0, tmp_path / "left.wav", "mix", "A cheerful host.")]
    assert parsed[0].values["audio"] is None and not parsed[0].error
    assert parsed[1].error == ("speakers: does not go with --audio: each speaker's track comes with their --speaker; "
                               "leave --audio out")
    assert parsed[2].error.startswith("speakers: the list is empty")
    assert parsed[3].error.startswith("speakers: entry 1: mood")
    table = tmp_path / "jobs.csv"
    table.write_text('image,speakers,out\ntwo.jpg,"0:left.wav:A cheerful host. | 1:talk.wav@right",e.mp4\n')
    (line,) = read_jobs(table)
    assert [(s.face, s.audio.name, s.channel, s.emotion) for s in line.values["speakers"]] == [
        (0, "left.wav", "mix", "A cheerful host."), (1, "talk.wav", "right", None)]


@pytest.mark.slow
def test_batch_conversation_runs_and_a_rerun_skips_it(tracks, tiny_models, tmp_path, capsys):
    """Tracks of different lengths (0.4 s and 0.2 s) are padded, not refused: the video lasts 0.4 s."""
    folder = tracks["talk"].parent
    jobs = tmp_path / "jobs.jsonl"
    line = {"image": str(TWO_PEOPLE), "out": str(tmp_path / "talk.mp4"), "steps": 1,
            "speakers": [f"0:{folder / 'talk.wav'}@left:A cheerful host.", f"1:{folder / 'half.wav'}"]}
    jobs.write_text(json.dumps(line) + "\n")
    assert main(["batch", str(jobs), "--models", str(tiny_models), "--threads", "1"]) == 0
    record = read_record(tmp_path / "talk.mp4")
    digests = [photo.file_digest(folder / name) for name in ("talk.wav", "half.wav")]
    assert [s["audio_sha256"] for s in record["speakers"]] == digests and "audio_sha256" not in record
    assert [s["channel"] for s in record["speakers"]] == ["left", "mix"]
    frames, _, _ = _decode(tmp_path / "talk.mp4")
    assert len(frames) == 10 and frames[0].shape == (320, 640, 3)
    capsys.readouterr()
    assert main(["batch", str(jobs), "--models", str(tiny_models)]) == 0
    assert "loading the models" not in capsys.readouterr().err
    assert json.loads((tmp_path / "jobs.report.json").read_text())["jobs"][0]["status"] == "skipped"
