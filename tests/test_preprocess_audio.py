"""Audio preprocessing parity with the reference fixtures (fixtures/preprocess/README.md §1) and error paths."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file

from emocast_lib import audio
from emocast_lib.bench.fill import fill_tensor, tensor_sha256


@pytest.fixture(scope="module")
def audio_dir(preprocess_dir: Path) -> Path:
    return preprocess_dir / "audio"


@pytest.fixture(scope="module")
def encoder(audio_dir: Path):
    return audio.load_wav2vec2(audio_dir / "tiny_wav2vec2_hubstyle")


def _speech(audio_dir: Path) -> list[str]:
    names = sorted(p.stem for p in audio_dir.glob("*.wav") if p.with_suffix(".safetensors").is_file())
    assert names, f"no <name>.wav + <name>.safetensors cases in {audio_dir}"
    return names


def test_features_match_reference(audio_dir: Path, encoder):
    for name in _speech(audio_dir):
        _check_features(name, audio_dir, encoder)


def _run_settings(path: Path) -> dict[str, int]:
    """fps and clip length of the reference run, from the file's metadata (README §1.3: 25 and 16 when absent)."""
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    return {"fps": int(meta.get("fps", 25)), "clip_length": int(meta.get("clip_length", 16))}


def _check_features(name: str, audio_dir: Path, encoder) -> None:
    ref = load_file(audio_dir / f"{name}.safetensors")
    wave, rate = audio.load_audio_file(audio_dir / f"{name}.wav")
    wave16k = audio.to_16k_mono(wave, rate)
    np.testing.assert_allclose(wave16k, ref["waveform"], rtol=0, atol=1e-6)
    feats = audio.encode_audio(wave16k, encoder, **_run_settings(audio_dir / f"{name}.safetensors"))
    assert (feats.seq_len, feats.audio_length, feats.num_clips) == (
        int(ref["seq_len"][0]), int(ref["audio_length"][0]), int(ref["num_clips"][0]))
    np.testing.assert_allclose(feats.input_values, ref["input_values"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(feats.encoder_input_values, ref["encoder_input_values"], rtol=0, atol=1e-6)
    for ours, key in [(feats.conv_features, "conv_features"), (feats.interp_features, "interp_features"),
                      (feats.audio_emb, "audio_emb"), (feats.windowed, "audio_emb_windowed")]:
        assert tuple(ours.shape) == ref[key].shape, f"{name}: {key}"
        np.testing.assert_allclose(ours.numpy(), ref[key], rtol=0, atol=1e-4, err_msg=f"{name}: {key}")


def test_comfy_audio_tensor_equals_file_path(audio_dir: Path):
    """ComfyUI's AUDIO waveform [B, C, N] (float tensor) goes through the same path as the file."""
    for name in _speech(audio_dir):
        wave, rate = audio.load_audio_file(audio_dir / f"{name}.wav")
        comfy_audio = {"waveform": torch.from_numpy(wave)[None], "sample_rate": rate}
        from_tensor = audio.to_16k_mono(comfy_audio["waveform"][0], comfy_audio["sample_rate"])
        np.testing.assert_array_equal(from_tensor, audio.to_16k_mono(wave, rate), err_msg=name)


def test_mono_1d_and_channel_mean(audio_dir: Path):
    for name in _speech(audio_dir):
        wave, rate = audio.load_audio_file(audio_dir / f"{name}.wav")
        stereo = np.stack([wave[0], 0.5 * wave[0]])
        np.testing.assert_array_equal(audio.to_16k_mono(stereo, rate), audio.to_16k_mono(0.75 * wave[0], rate),
                                      err_msg=name)


def test_length_fix_matches_ceil(audio_dir: Path):
    for n, rate in [(101982, 44100), (4410, 44100), (48001, 48000), (22050, 22050)]:
        out = audio.to_16k_mono(np.sin(np.arange(n) / 7.0).astype(np.float32), rate)
        assert len(out) == int(np.ceil(n * 16000 / rate))


def test_checkpoint_layouts_load_the_fill(audio_dir: Path):
    """Every tiny wav2vec2 folder the set holds weights for (bare and hub layout) loads exactly the fill of
    w2v_fill_info.json: the rule at its seed on the canonical keys, each tensor checked by its sha256."""
    info = json.loads((audio_dir / "w2v_fill_info.json").read_text())
    model = audio.load_wav2vec2(audio_dir / "tiny_wav2vec2_hubstyle")  # hub layout: the set always has it
    fill = {k: fill_tensor(info["seed"], k, v.shape) for k, v in model.state_dict().items() if k in info["sha256"]}
    assert {k: tensor_sha256(v) for k, v in fill.items()} == info["sha256"]
    for folder in ("tiny_wav2vec2", "tiny_wav2vec2_hubstyle"):
        if not (audio_dir / folder / "model.safetensors").is_file():
            continue  # a trimmed set keeps the weights in one layout only
        loaded = audio.load_wav2vec2(audio_dir / folder).state_dict()
        assert loaded.keys() == model.state_dict().keys(), folder
        for key, value in fill.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=f"{folder}: {key}")


def test_window_clamps_at_the_ends():
    emb = torch.arange(6.0)[:, None]
    win = audio.window_frames(emb)[..., 0]
    assert win[0].tolist() == [0, 0, 0, 1, 2] and win[3].tolist() == [1, 2, 3, 4, 5]
    assert win[5].tolist() == [3, 4, 5, 5, 5]


def test_padding_only_when_needed(encoder):
    wave = np.random.default_rng(0).standard_normal(16 * 640).astype(np.float32)  # exactly 16 frames
    feats = audio.encode_audio(wave, encoder)
    assert (feats.seq_len, feats.audio_length, feats.num_clips) == (16, 16, 1)
    assert len(feats.encoder_input_values) == len(wave)
    feats = audio.encode_audio(wave[:641], encoder, fps=25, clip_length=4)  # 641 samples -> ceil(1.0016) = 2 frames
    assert (feats.seq_len, feats.audio_length, feats.num_clips) == (4, 2, 1)
    assert len(feats.encoder_input_values) == 641 + 2 * 640


def test_separation_path_resampling(audio_dir: Path):
    cases = sorted(audio_dir.glob("*.separation_path_16k.safetensors"))
    assert cases, f"no *.separation_path_16k.safetensors in {audio_dir}"
    for case in cases:
        ref = load_file(case)["waveform"]
        ours = audio.load_separated_16k(audio_dir / case.name.replace(".separation_path_16k.safetensors", ".wav"))
        assert ours.shape == ref.shape, case.name
        # PyAV's libswresample vs the ffmpeg 5.1 CLI build of the fixtures: README §1.5 measured 9e-5.
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-4, err_msg=case.name)


# --- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("wave, message", [
    (np.zeros((2, 0), np.float32), "empty"),
    (np.array([0.1, np.nan, 0.2], np.float32), "NaN or infinite"),
    (np.array([[0.1, np.inf]], np.float32), "NaN or infinite"),
    (np.zeros((1, 2, 3), np.float32), "channels, samples"),
])
def test_to_16k_mono_rejects(wave, message):
    with pytest.raises(ValueError, match=message):
        audio.to_16k_mono(wave, 44100)


def test_bad_rate():
    with pytest.raises(ValueError, match="sample rate"):
        audio.to_16k_mono(np.ones(100, np.float32), 0)


def test_encode_rejects_short_and_bad(encoder):
    with pytest.raises(ValueError, match="shorter than one video frame"):
        audio.encode_audio(np.ones(639, np.float32), encoder, fps=25)
    with pytest.raises(ValueError, match="empty"):
        audio.encode_audio(np.zeros(0, np.float32), encoder)
    with pytest.raises(ValueError, match="NaN"):
        audio.encode_audio(np.full(1000, np.nan, np.float32), encoder)
    with pytest.raises(ValueError, match="to_16k_mono"):
        audio.encode_audio(np.ones((2, 1000), np.float32), encoder)


def test_load_audio_file_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        audio.load_audio_file(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match="cannot decode audio file .*junk.wav"):
        audio.load_audio_file(tmp_path / "junk.wav")
    with pytest.raises(FileNotFoundError):
        audio.load_separated_16k(tmp_path / "nothing.wav")


def test_wav2vec2_folder_errors(tmp_path: Path, audio_dir: Path):
    with pytest.raises(FileNotFoundError, match="config.json, model.safetensors"):
        audio.load_wav2vec2(tmp_path)
    (tmp_path / "config.json").write_text((audio_dir / "tiny_wav2vec2" / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"lacks model.safetensors: .*\(pickled .bin weights are not loaded\)"):
        audio.load_wav2vec2(tmp_path)
    save_file({"unrelated.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a matching wav2vec2 checkpoint: it lacks"):
        audio.load_wav2vec2(tmp_path)


def test_separator_missing_files_named(tmp_path: Path):
    (tmp_path / "Kim_Vocal_2.onnx").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as err:
        audio.separate_vocals(tmp_path / "a.wav", tmp_path, tmp_path / "out")
    msg = str(err.value)
    assert "download_checks.json, mdx_model_data.json, vr_model_data.json" in msg
    assert "Kim_Vocal_2.onnx --model_file_dir" in msg


def test_separator_missing_package_named(tmp_path: Path, monkeypatch):
    for name in audio.SEPARATOR_FILES:
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "audio_separator", None)  # simulate the optional package being absent
    with pytest.raises(ImportError, match=r"pip install -c .*torch==.* \"audio-separator\[cpu\]\""):
        audio.separate_vocals(tmp_path / "a.wav", tmp_path, tmp_path / "out")


def test_separated_file_is_read_as_int16(tmp_path: Path):
    """A 16 kHz separated file is only channel-averaged (no resampling), like librosa on a native-rate file."""
    pcm = (np.random.default_rng(1).standard_normal((1600, 2)) * 3000).astype(np.int16)
    soundfile.write(tmp_path / "v.wav", pcm, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(audio.load_separated_16k(tmp_path / "v.wav"),
                                  (pcm.astype(np.float32) / 32768).mean(axis=1, dtype=np.float32))
