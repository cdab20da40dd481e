"""The command-line main job on the tiny stand-in models (FAKE weights made by the fill rule; real
weights cannot exist here): make-tiny-models -> generate -> a playable mp4 with the input's sound."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from emocast_lib import layout
from emocast_lib.bench.tiny import TINY_STEPS, is_tiny_model, planned_files
from emocast_lib.cli import EXAMPLES, main
from emocast_lib.config import DEFAULT_EMOTION, SamplingConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stereo_speech(tmp_path_factory) -> Path:
    """The shipped example speech as 0.7 s of 44.1 kHz stereo (18 frames at 25 fps: two clips of 16, the
    second padded); the channels differ so that a mono mix would show."""
    import soxr

    wave, rate = soundfile.read(EXAMPLES / "emocast_speech.wav", dtype="float32")
    stereo = soxr.resample(np.stack([wave, -0.5 * wave], axis=1), rate, 44100)[: int(0.7 * 44100)]
    path = tmp_path_factory.mktemp("audio") / "stereo44k.wav"
    soundfile.write(path, stereo, 44100)
    return path


def test_tiny_tree_is_complete_and_says_it_is_not_a_model(tiny_models: Path):
    assert layout.missing_files(tiny_models) == []
    assert "NOT EmoCAST" in (tiny_models / "TINY_TEST_MODELS_README.txt").read_text()
    assert all(is_tiny_model(p) for p in planned_files(tiny_models))  # what --force recognises


def test_help_shows_the_job_defaults(capsys):
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {DEFAULT_EMOTION})" in text and f"else {SamplingConfig.steps})" in text


@pytest.mark.slow
def test_generate_writes_mp4_with_the_input_sound(tiny_models: Path, stereo_speech: Path, tmp_path: Path):
    import av

    out = tmp_path / "talking.mp4"
    cmd = [sys.executable, "-m", "emocast_lib", "generate", "--models", str(tiny_models), "--audio",
           str(stereo_speech), "--out", str(out), "--emotion", "A calm and friendly portrait."]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NOT EmoCAST" in proc.stderr  # the tiny model announces itself
    assert proc.stdout.startswith("EmoCAST generate: checking the inputs")
    assert f"{TINY_STEPS} denoising steps per clip (the step count the checkpoint declares" in proc.stdout
    assert "clip 2/2 step" in proc.stdout and "s left" in proc.stdout
    with av.open(str(out)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        frames = sum(1 for _ in container.decode(video=0))
        assert frames == math.ceil(0.7 * 25)
        assert video.average_rate == 25 and sound.sample_rate == 44100 and sound.channels == 2
    with av.open(str(out)) as container:
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    assert abs(decoded.shape[1] / 44100 - frames / 25) < 0.1  # the sound lasts as long as the picture
    left, right = decoded[:, 4096:-4096]  # AAC's priming edges aside, right = -0.5 x left, as in the input
    assert np.corrcoef(left, right)[0, 1] < -0.95
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talking.mp4"]


def test_missing_models_listed_in_one_message(tmp_path: Path, capsys):
    (tmp_path / "nowhere").mkdir()
    assert main(["generate", "--models", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    for f in layout.REQUIRED:
        assert str(f.path(tmp_path / "nowhere")) in err
    assert not (tmp_path / "x.mp4").exists()


def test_missing_input_file(tiny_models: Path, tmp_path: Path, capsys):
    assert main(["generate", "--models", str(tiny_models), "--image", str(tmp_path / "none.png"),
                 "--out", str(tmp_path / "o.mp4")]) == 2
    assert f"error: --image: {tmp_path / 'none.png'} not found" in capsys.readouterr().err


def test_silent_audio_error(tiny_models: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16000)
    out = tmp_path / "o.mp4"
    assert main(["generate", "--models", str(tiny_models), "--audio", str(empty), "--out", str(out)]) == 2
    assert f"error: --audio: {empty} contains no audio samples" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.wav"]
