"""The command-line main job on the tiny stand-in models (FAKE weights made by the fill rule; real
weights cannot exist here): make-tiny-models -> generate -> a playable mp4 with the sound."""
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
from emocast_lib.__main__ import EXAMPLES, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    assert main(["make-tiny-models", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory) -> Path:
    """The shipped example speech cut to 0.7 s (18 frames at 25 fps: two clips of 16, the second padded)."""
    wave, rate = soundfile.read(EXAMPLES / "speech.wav", dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "short.wav"
    soundfile.write(path, wave[: int(0.7 * rate)], rate)
    return path


def test_tiny_tree_is_complete_and_says_it_is_not_a_model(tiny_models: Path):
    assert layout.missing_files(tiny_models) == []
    assert "NOT EmoCAST" in (tiny_models / "TINY_TEST_MODELS_README.txt").read_text()


def test_generate_writes_mp4_with_audio(tiny_models: Path, short_speech: Path, tmp_path: Path):
    import av

    out = tmp_path / "talking.mp4"
    cmd = [sys.executable, "-m", "emocast_lib", "generate", "--models", str(tiny_models), "--audio", str(short_speech),
           "--out", str(out), "--steps", "2", "--emotion", "A calm and friendly portrait."]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NOT EmoCAST" in proc.stderr  # the tiny model announces itself
    with av.open(str(out)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        frames = sum(1 for _ in container.decode(video=0))
        assert frames == math.ceil(0.7 * 25)
        assert video.average_rate == 25 and sound.sample_rate == 16000
    with av.open(str(out)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
    assert abs(samples / 16000 - frames / 25) < 0.1  # the sound lasts as long as the picture
    assert not list(tmp_path.glob("*.part"))


def test_missing_models_listed_in_one_message(tmp_path: Path, capsys):
    assert main(["generate", "--models", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    for f in layout.REQUIRED:
        assert str(f.path(tmp_path / "nowhere")) in err and f.source in err
    assert not (tmp_path / "x.mp4").exists()


def test_missing_input_file(tiny_models: Path, tmp_path: Path, capsys):
    assert main(["generate", "--models", str(tiny_models), "--image", str(tmp_path / "none.png")]) == 2
    assert "input file not found" in capsys.readouterr().err


def test_silent_audio_error(tiny_models: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16000)
    assert main(["generate", "--models", str(tiny_models), "--audio", str(empty), "--out", str(tmp_path / "o.mp4")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()
