"""The bad-input matrix: every kind of input a user can get wrong, on the CLI, the library and the node glue
that runs without ComfyUI, on the tiny stand-in models (FAKE fill-rule weights, NOT EmoCAST).

Each case gets one clear error line that names the input (exit code 2, no traceback), or works as
documented. Cheap checks run before any model loads: the `no_model_load` fixture makes every model load
fail the test, so a case that passes under it was decided without loading anything. Nothing is left
behind (`untouched` compares folders before and after), and a killed run leaves no half file.
"""
from __future__ import annotations

import math
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from emocast_lib import audio as audio_lib
from emocast_lib import layout
from emocast_lib import photo as photo_lib
from emocast_lib.bench.tiny import NOT_A_MODEL, check_tiny_target, make_tiny_models
from emocast_lib.checkpoint import CONFIG_KEY, NOTE_KEY, STEPS_KEY, read_metadata
from emocast_lib.cli import EXAMPLES, main
from emocast_lib.files import OutputError
from emocast_lib.jobs import (
    CheckedJob,
    JobError,
    JobSpec,
    ModelSettings,
    Segment,
    Session,
    check_job,
    default_checkpoint,
    run_job,
    sampling_config,
)
from emocast_lib.video import Mp4Writer
from packimport import pack_module

ROOT = Path(__file__).resolve().parents[1]
PORTRAIT = EXAMPLES / "emocast_portrait.png"
SPEECH = EXAMPLES / "emocast_speech.wav"
LONG_PROMPT = " ".join(["a very worried and slightly surprised portrait"] * 12)


# --- helpers and shared inputs --------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` (hidden ones too) with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def untouched(tiny_models: Path, tmp_path: Path):
    """The models folder and the test's own folder are the same after the test (no partial or temp files)."""
    before, inputs = snapshot(tiny_models), snapshot(tmp_path)
    yield
    assert snapshot(tiny_models) == before, "the models folder changed"
    assert snapshot(tmp_path) == inputs, "files were left behind"


@pytest.fixture()
def no_model_load(monkeypatch):
    """Any model load fails the test: what runs under this fixture was decided by the cheap checks alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the cheap checks stopped the run")

    monkeypatch.setattr(Session, "_load", refuse)
    monkeypatch.setattr("emocast_lib.checkpoint.load_net", refuse)


def cli_error(capsys, *args: str) -> str:
    """Run `generate` in-process; it must stop with exit code 2 and only `error: ...` lines, no traceback."""
    code = main(["generate", *args])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.strip().splitlines() if NOT_A_MODEL not in line]  # the tiny net's note
    assert lines and all(line.startswith("error: ") for line in lines), captured.err
    return captured.err


def write_audio(path: Path, wave: np.ndarray, rate: int, codec: str, layout_name: str | None = None,
                fmt: str | None = None) -> Path:
    """(channels, samples) float in [-1, 1] -> an audio file through PyAV (any codec FFmpeg encodes)."""
    channels = wave.shape[0]
    layout_name = layout_name or {1: "mono", 2: "stereo", 6: "5.1"}[channels]
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout_name)
        size = stream.codec_context.frame_size or 1024
        for start in range(0, wave.shape[1], size):
            chunk = np.ascontiguousarray(wave[:, start:start + size], np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout_name)
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def speech(seconds: float, rate: int = 16000, channels: int = 1) -> np.ndarray:
    wave, source = soundfile.read(SPEECH, dtype="float32")
    import soxr

    out = (soxr.resample(wave, source, rate) if rate != source else wave)[: round(seconds * rate)]
    return np.stack([out * (1 - 0.1 * c) for c in range(channels)])


def png_with_size(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header claims width x height (a decompression bomb costs nothing to make)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """The photos and sounds of the matrix, made once."""
    d = tmp_path_factory.mktemp("media")
    p: dict[str, Path] = {}

    def at(name: str, filename: str) -> Path:
        p[name] = d / filename
        return p[name]

    portrait = Image.open(PORTRAIT).convert("RGB")
    # a photo wider than tall with the face off-centre: the portrait on a larger grey canvas
    wide = Image.new("RGB", (portrait.width * 7 // 5, portrait.height * 6 // 5), (128, 128, 128))
    wide.paste(portrait, (portrait.width // 3, portrait.height // 10))
    p["wide"] = d / "wide.png"
    wide.save(p["wide"])
    at("empty_png", "empty.png").write_bytes(b"")
    at("corrupt_png", "corrupt.png").write_bytes(bytes(range(256)) * 8)
    at("text_png", "notes.png").write_text("this is a text file named .png\n")
    full = PORTRAIT.read_bytes()
    at("truncated_png", "truncated.png").write_bytes(full[: len(full) // 2])
    p["bomb"] = png_with_size(d / "bomb.png", 20000, 20000)
    portrait.resize((16, 16)).save(at("tiny_png", "tiny16.png"))
    portrait.convert("L").save(at("grey", "grey.png"))
    grey16 = np.asarray(portrait.convert("L"), np.uint16) * 257
    Image.fromarray(grey16).save(at("grey16", "grey16.png"))
    rgba = portrait.convert("RGBA")
    rgba.save(at("rgba", "rgba.png"))
    portrait.convert("CMYK").save(at("cmyk", "cmyk.jpg"), quality=95)
    sideways = wide.transpose(Image.Transpose.ROTATE_90)  # as a phone stores a portrait shot
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise to view
    sideways.save(at("exif", "exif_rotated.png"), exif=exif.tobytes())
    Image.fromarray(np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))).convert("RGB").save(
        at("no_face", "gradient.png"))
    two = Image.new("RGB", (640, 320))
    two.paste(portrait, (0, 0))
    two.paste(portrait, (320, 0))
    two.save(at("two_faces", "two_faces.png"))
    portrait.resize((8000, 8000), Image.BILINEAR).save(at("huge", "huge.jpg"), quality=85)

    sr = 16000
    at("empty_wav", "empty_file.wav").write_bytes(b"")
    soundfile.write(at("zero_wav", "zero.wav"), np.zeros(0, np.float32), sr)
    soundfile.write(at("short_wav", "short.wav"), speech(0.1)[0], sr)
    soundfile.write(at("silence", "silence.wav"), np.zeros(sr // 2, np.float32), sr)
    soundfile.write(at("8k", "speech8k.wav"), speech(0.3, 8000)[0], 8000)
    soundfile.write(at("stereo", "stereo.wav"), speech(0.5, 44100, 2).T, 44100)
    write_audio(at("surround", "surround.m4a"), speech(0.3, 48000, 6) * 0.5, 48000, "aac")
    nan = speech(0.5)[0].copy()
    nan[100] = np.nan
    soundfile.write(at("nan_wav", "nan.wav"), nan, sr, subtype="FLOAT")
    soundfile.write(at("loud", "loud.wav"), speech(0.5)[0] * 1e4, sr, subtype="FLOAT")
    soundfile.write(at("absurd", "absurd.wav"), speech(0.5)[0] * 1e20, sr, subtype="FLOAT")  # finite, not sound
    soundfile.write(at("clipped", "clipped.wav"), np.clip(speech(0.5)[0] * 50, -1, 1), sr)
    at("corrupt_wav", "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(200))
    soundfile.write(at("hour", "hour.wav"), np.zeros(3600 * 8000, np.float32), 8000, subtype="PCM_U8")
    soundfile.write(at("flac", "speech.flac"), speech(0.5)[0], sr)
    write_audio(at("m4a", "speech.m4a"), speech(0.5, 44100), 44100, "aac")
    write_audio(at("mp3", "speech.mp3"), speech(0.5, 44100, 2), 44100, "libmp3lame")
    write_audio(at("opus", "speech.ogg"), speech(0.5, 48000), 48000, "libopus")
    with av.open(str(at("movie", "clip.mp4")), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        sound = container.add_stream("aac", rate=16000, layout="mono")
        for i in range(10):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 20, np.uint8), "rgb24")))
        container.mux(video.encode(None))
        wave = speech(0.4)
        for start in range(0, wave.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start:start + 1024]), "fltp", "mono")
            frame.sample_rate, frame.pts = 16000, start
            container.mux(sound.encode(frame))
        container.mux(sound.encode(None))
    with av.open(str(at("silent_movie", "no_sound.mp4")), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        for _ in range(5):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), "rgb24")))
        container.mux(video.encode(None))
    return p


@pytest.fixture(scope="module")
def session(tiny_models: Path):
    with Session(ModelSettings(models=tiny_models)) as s:
        yield s


@pytest.fixture(scope="module")
def short(tmp_path_factory) -> Path:
    """0.3 s of the example speech: 8 frames, one clip."""
    path = tmp_path_factory.mktemp("speech") / "short.wav"
    soundfile.write(path, speech(0.3)[0], 16000)
    return path


def spec(audio: Path, out: Path, **kw) -> JobSpec:
    """A quick job: the example portrait, one step."""
    return JobSpec(**{"image": PORTRAIT, "audio": audio, "out": out, "steps": 1, **kw})


def streams(path: Path) -> tuple[tuple[int, int], int, int, int]:
    """(width, height), frame count, sample rate and channels of an mp4."""
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        return (v.width, v.height), sum(1 for _ in c.decode(video=0)), a.sample_rate, a.channels


# --- images ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("missing", "not found; check the path"),
    ("empty_png", "is empty (0 bytes)"),
    ("corrupt_png", "is not an image PIL can read"),
    ("text_png", "is not an image PIL can read"),
    ("truncated_png", "is damaged or truncated"),
    ("bomb", "is too large to decode safely (DecompressionBombError: "),
    ("tiny_png", "is only 16x16 pixels"),
    ("no_face", "no face found; use a photo with one clear, frontal face"),
])
def test_bad_photo(name, message, media, tiny_models, tmp_path, capsys, no_model_load, untouched):
    image = media.get(name, tmp_path / "missing.png")
    err = cli_error(capsys, "--models", str(tiny_models), "--image", str(image), "--out", str(tmp_path / "o.mp4"))
    assert f"error: --image: {image}" in err and message in err


def test_square_only_when_asked(media, tiny_models, tmp_path, capsys, no_model_load, untouched):
    err = cli_error(capsys, "--models", str(tiny_models), "--image", str(media["wide"]), "--crop", "none",
                    "--out", str(tmp_path / "o.mp4"))
    w, h = Image.open(media["wide"]).size
    assert f"--image: {media['wide']} is {w}x{h}, not square, and --crop none keeps it whole; use --crop auto" in err


@pytest.mark.parametrize("name", ["grey", "grey16", "rgba", "cmyk", "two_faces", "huge", "exif", "wide"])
def test_photos_that_work(name, media, tiny_models, tmp_path, no_model_load, untouched):
    assert isinstance(check_job(JobSpec(media[name], SPEECH, tmp_path / "o.mp4"), tiny_models), CheckedJob)
    rgb = photo_lib.load_photo(media[name])
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


def test_photo_conversions(media):
    grey = np.asarray(Image.open(media["grey"]))
    grey16 = photo_lib.load_photo(media["grey16"])
    assert np.array_equal(grey16, np.repeat(grey[..., None], 3, axis=2))  # not clipped white
    assert np.array_equal(photo_lib.load_photo(media["rgba"]), np.asarray(Image.open(PORTRAIT).convert("RGB")))
    upright = np.asarray(Image.open(media["wide"]).convert("RGB"))
    assert np.array_equal(photo_lib.load_photo(media["exif"]), upright)  # EXIF orientation applied


@pytest.mark.slow
def test_exif_rotated_and_two_faces_are_analysed_upright(session, media, short, tmp_path):
    rotated = session.portrait(session.check(spec(short, tmp_path / "o.mp4", image=media["exif"])))
    w, h = Image.open(media["wide"]).size  # the exif photo viewed upright
    assert "cropped" in rotated.note and f"{w}x{h} photo" in rotated.note
    assert session.portrait(session.check(spec(short, tmp_path / "o.mp4", image=media["wide"]))).crop == rotated.crop
    two = session.portrait(session.check(spec(short, tmp_path / "o.mp4", image=media["two_faces"])))
    assert "640x320 photo" in two.note and two.crop.side <= 320  # one of the two faces, cropped square


# --- audio ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("missing", "audio file not found"),
    ("empty_wav", "cannot decode audio file"),
    ("zero_wav", "contains no audio samples (0 s)"),
    ("nan_wav", "contains NaN or infinite samples"),
    ("corrupt_wav", "cannot decode audio file"),
    ("hour", "is 60.0 minutes; the limit is 10 minutes (600 s)"),
    ("silent_movie", "has no audio track (FFmpeg finds: video)"),
    ("absurd", "times full scale (ordinary audio stays within 1); the file is damaged or wrongly scaled"),
])
def test_bad_audio(name, message, media, tiny_models, tmp_path, capsys, no_model_load, untouched):
    sound = media.get(name, tmp_path / "missing.wav")
    err = cli_error(capsys, "--models", str(tiny_models), "--audio", str(sound), "--out", str(tmp_path / "o.mp4"))
    assert "error: --audio: " in err and str(sound) in err and message in err


def test_an_hour_is_refused_before_it_is_decoded(media, monkeypatch):
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ValueError, match="60.0 minutes"):
        audio_lib.load_audio_file(media["hour"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6  # the hour (28.8 M samples, 115 MB as float32) was never decoded
    # A container that does not give its duration: the decode stops as it passes the limit.
    monkeypatch.setattr(audio_lib, "probe_audio", lambda path: audio_lib.AudioInfo("pcm_s16le", 16000, 1, None))
    with pytest.raises(ValueError, match="longer than that; the limit is"):
        audio_lib.load_audio_file(SPEECH, max_seconds=1.0)


@pytest.mark.parametrize("name", ["short_wav", "silence", "8k", "stereo", "surround", "loud", "clipped", "flac",
                                  "m4a", "mp3", "opus", "movie"])
def test_audio_that_works(name, media, tiny_models, tmp_path, no_model_load, untouched):
    assert isinstance(check_job(JobSpec(PORTRAIT, media[name], tmp_path / "o.mp4"), tiny_models), CheckedJob)
    wave, rate = audio_lib.load_audio_file(media[name])
    assert np.isfinite(wave).all() and rate in (8000, 16000, 44100, 48000)


@pytest.mark.slow
@pytest.mark.parametrize("name, rate, channels", [("8k", 8000, 1), ("surround", 48000, 6), ("short_wav", 16000, 1)])
def test_output_sound_is_the_input_sound(name, rate, channels, session, media, tmp_path):
    out = run_job(session, spec(media[name], tmp_path / "o.mp4"))
    _, frames, out_rate, out_channels = streams(out)
    wave, _ = audio_lib.load_audio_file(media[name])
    assert (out_rate, out_channels) == (rate, channels) and wave.shape[0] == channels
    assert frames == math.ceil(wave.shape[1] / rate * 25)


# --- prompts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("", "'' is empty; describe the emotion"),
    ("   \t ", "is empty; describe the emotion"),
    (LONG_PROMPT, "tokens; CLIP takes at most 75: shorten it by"),
    ("calm\x07 and happy", "contains control characters (U+0007); remove them"),
    (b"calm \xff happy".decode(errors="surrogateescape"), "is not valid text (it holds bytes that are not UTF-8"),
])
def test_bad_prompt(text, message, tiny_models, tmp_path, capsys, no_model_load, untouched):
    err = cli_error(capsys, "--models", str(tiny_models), "--emotion", text, "--out", str(tmp_path / "o.mp4"))
    assert "error: --emotion: " in err and message in err
    if text == LONG_PROMPT:
        assert "--truncate-prompt" in err


@pytest.mark.parametrize("text", ["A joyful portrait 😀🎉 laughing", "صورة سعيدة جدا", "שמח מאוד"])
def test_prompts_that_work(text, tiny_models, tmp_path, no_model_load, untouched):
    assert isinstance(check_job(JobSpec(PORTRAIT, SPEECH, tmp_path / "o.mp4", emotion=text), tiny_models), CheckedJob)


@pytest.mark.slow
def test_truncate_prompt_drops_the_end(session, short, tmp_path):
    said = []
    run_job(session, spec(short, tmp_path / "o.mp4", emotion=LONG_PROMPT, truncate_prompt=True),
            on_progress=said.append)
    assert any("prompt cut to CLIP's 77 tokens; dropped: " in p.text for p in said)


@pytest.mark.slow
def test_schedule_works(session, short, tmp_path):
    schedule = (Segment("A happy portrait.", 0.0, 0.1), Segment("A frightened portrait.", 0.2, 0.3))
    out = run_job(session, spec(short, tmp_path / "o.mp4", schedule=schedule, crossfade=0.1))
    assert streams(out)[1] == 8


def test_bad_schedule(tiny_models, tmp_path, capsys, no_model_load, untouched):
    err = cli_error(capsys, "--models", str(tiny_models), "--segment", "0:2:happy", "--segment", "1:3:sad",
                    "--out", str(tmp_path / "o.mp4"))
    assert "error: --segment: emotion segments overlap" in err


# --- model files ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broken(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Damaged copies of the tiny models, each to be used in place of one file."""
    d = tmp_path_factory.mktemp("broken")
    net = layout.NET.path(tiny_models)
    b: dict[str, Path] = {"net_truncated": d / "truncated.pth", "net_nan": d / "nan.pth", "malicious": d / "evil.pth"}
    b["net_truncated"].write_bytes(net.read_bytes()[: net.stat().st_size // 2])
    b["wrong_arch"] = layout.VAE.path(tiny_models)
    checkpoint = torch.load(net, weights_only=True)
    key = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], float("nan"))
    torch.save(checkpoint, b["net_nan"])

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))

    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Payload()}, b["malicious"])
    b["pwned"] = d / "PWNED"
    return b


def models_copy(tiny_models: Path, target: Path, replace_file: layout.ModelFile, data: bytes | None = None,
                sub: str | None = None) -> Path:
    """A models tree of links to the tiny files, with one file replaced by `data`."""
    for src in tiny_models.rglob("*"):
        if src.is_file():
            dst = target / src.relative_to(tiny_models)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    path = replace_file.path(target) / sub if sub else replace_file.path(target)
    path.unlink()
    path.write_bytes(data)
    return target


@pytest.mark.parametrize("case, message", [
    ("missing", "not found; give an EmoCAST net.pth or a .safetensors made by `python -m emocast_lib convert`"),
    ("net_truncated", "not a readable PyTorch checkpoint, it is truncated or corrupt"),
    ("wrong_arch", "does not match the EmoCAST network"),
    ("malicious", "refused, the file contains code or objects other than tensors, which were not run"),
])
def test_bad_checkpoint(case, message, broken, tiny_models, tmp_path, capsys, no_model_load):
    path = broken.get(case, tmp_path / "none.pth")
    err = cli_error(capsys, "--models", str(tiny_models), "--checkpoint", str(path), "--out", str(tmp_path / "o.mp4"))
    assert f"error: --checkpoint: {path}" in err and message in err
    assert not broken["pwned"].exists(), "the pickle's payload ran"


@pytest.mark.parametrize("which, sub, data, message", [
    (layout.VAE, None, "half", "is not a readable .safetensors file, it is truncated or damaged"),
    (layout.CLIP_L, None, "half", "is not a readable .safetensors file, it is truncated or damaged"),
    (layout.WAV2VEC, None, "half", "is not a readable .safetensors file, it is truncated or damaged"),
    (layout.WAV2VEC, None, "clip_l", "is not a wav2vec2-base (no 12-layer wav2vec2 weights)"),
    (layout.LANDMARKER, None, b"not a bundle", "is not a MediaPipe .task bundle"),
])
def test_damaged_model_file(which, sub, data, message, tiny_models, tmp_path, capsys, no_model_load):
    original = (which.path(tiny_models) / sub if sub else which.path(tiny_models)).read_bytes()
    if data == "half":
        data = original[: len(original) // 2]
    elif data == "clip_l":  # a whole, readable file of another kind
        data = layout.CLIP_L.path(tiny_models).read_bytes()
    models = models_copy(tiny_models, tmp_path / "models", which, data, sub)
    err = cli_error(capsys, "--models", str(models), "--out", str(tmp_path / "o.mp4"))
    assert "error: --models: " in err and str(which.path(models)) in err and message in err


@pytest.mark.slow
def test_damage_only_found_by_loading_is_one_line_too(broken, tiny_models, tmp_path, capsys):
    """Files whose headers are fine but whose contents are not: NaN weights, a wav2vec2 weight of the wrong
    shape. They pass the cheap checks, so the load reports them, still as one line."""
    err = cli_error(capsys, "--models", str(tiny_models), "--checkpoint", str(broken["net_nan"]), "--no-identity",
                    "--out", str(tmp_path / "o.mp4"))
    assert f"error: --checkpoint: {broken['net_nan']}: the weight" in err and "holds NaN or infinite values" in err
    from safetensors.torch import load_file, save_file

    wav2vec = load_file(layout.WAV2VEC.path(tiny_models))
    key = next(k for k in wav2vec if k.endswith("encoder.layers.11.attention.k_proj.weight"))
    wav2vec[key] = wav2vec[key][:10]
    save_file(wav2vec, tmp_path / "wav2vec2.safetensors")
    models = models_copy(tiny_models, tmp_path / "models", layout.WAV2VEC,
                         (tmp_path / "wav2vec2.safetensors").read_bytes())
    err = cli_error(capsys, "--models", str(models), "--no-identity", "--out", str(tmp_path / "o.mp4"))
    assert "cannot be loaded as the wav2vec2-base-960h speech encoder" in err
    assert not (tmp_path / "o.mp4").exists()


def test_bad_photo_stops_before_a_broken_model_folder_is_loaded(broken, tiny_models, media, tmp_path, capsys,
                                                                 no_model_load):
    """The same folder fails at load with a good photo (above); with a bad photo no model loads at all."""
    err = cli_error(capsys, "--models", str(tiny_models), "--checkpoint", str(broken["net_nan"]),
                    "--image", str(media["no_face"]), "--out", str(tmp_path / "o.mp4"))
    assert err.count("error: ") == 1 and "--image: " in err and "NaN" not in err


def test_make_tiny_models_never_replaces_a_real_file(tmp_path, capsys):
    vae = layout.VAE.path(tmp_path)
    vae.parent.mkdir(parents=True)
    vae.write_bytes(b"the user's real VAE")
    before = snapshot(tmp_path)
    for extra in ([], ["--force"]):
        assert main(["make-tiny-models", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert str(vae.relative_to(tmp_path)) in err and "Nothing was written" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_force_replaces_tiny_models_only(tiny_models, tmp_path):
    check_tiny_target(tiny_models, force=True)  # a tree of tiny models may be replaced with --force
    with pytest.raises(ValueError, match="already holds 8 of the files"):
        check_tiny_target(tiny_models)
    models = models_copy(tiny_models, tmp_path / "models", layout.CLIP_L, b"not a tiny model")
    with pytest.raises(ValueError, match="holds files that are not tiny test models: text_encoders/clip_l.safetensors"):
        make_tiny_models(models, force=True)
    assert layout.CLIP_L.path(models).read_bytes() == b"not a tiny model"
    faces = layout.face_dir(tmp_path / "real")
    faces.mkdir(parents=True)
    (faces / "scrfd_10g_bnkps.onnx").write_bytes(b"real detector")
    with pytest.raises(ValueError, match="scrfd_10g_bnkps.onnx"):  # tiny detectors would mix with real ones
        make_tiny_models(tmp_path / "real")
    assert sorted(p.name for p in faces.iterdir()) == ["scrfd_10g_bnkps.onnx"]


def test_checkpoint_option_takes_a_converted_safetensors(tiny_models, tmp_path, capsys):
    converted = tmp_path / "emocast" / "emocast_fp32.safetensors"
    assert main(["convert", str(layout.NET.path(tiny_models)), str(converted), "--dtype", "fp32", "--no-check"]) == 0
    assert read_metadata(converted)[STEPS_KEY] == "4" and NOT_A_MODEL == read_metadata(converted)[NOTE_KEY]
    assert CONFIG_KEY in read_metadata(converted)
    assert main(["convert", str(layout.NET.path(tiny_models)), str(converted), "--no-check"]) == 2
    assert f"{converted} already exists; choose another name, or allow replacing it (--overwrite)" in \
        capsys.readouterr().err
    # the default checkpoint: net.pth, else the only .safetensors of models/emocast
    assert default_checkpoint(tmp_path) == converted


# --- parameters -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, option, message", [
    (["--steps", "0"], "--steps", "0 is out of range; use a value from 1 to 200"),
    (["--cfg", "nan"], "--cfg", "nan is not a finite number"),
    (["--cfg", "inf"], "--cfg", "inf is not a finite number"),
    (["--cfg", "-1"], "--cfg", "-1.0 is out of range"),
    (["--pose-weight", "nan"], "--pose-weight", "nan is not a finite number"),
    (["--lip-weight", "1e9"], "--lip-weight", "out of range"),
    (["--fps", "0"], "--fps", "0 is out of range; use a value from 1 to 60"),
    (["--seed", "-1"], "--seed", "-1 is out of range"),
    (["--seed", str(2**64)], "--seed", f"{2**64} is out of range; use a value from 0 to {2**64 - 1}"),
    (["--expand-ratio", "nan"], "--expand-ratio", "nan is not a finite number"),
    (["--clip-length", "2"], "--clip-length", "2 is out of range"),
    (["--crossfade", "-1"], "--crossfade", "out of range"),
    (["--device", "bogus"], "--device", "'bogus' is not a device"),
    (["--device", "cuda:7"], "--device", "cuda:7"),
    (["--precision", "fp16", "--device", "cpu"], "--precision", "fp16 on the CPU is slow and partly unsupported"),
])
def test_bad_parameter(args, option, message, tiny_models, tmp_path, capsys, no_model_load, untouched):
    err = cli_error(capsys, "--models", str(tiny_models), *args, "--out", str(tmp_path / "o.mp4"))
    assert f"error: {option}: " in err and message in err


def test_cuda_on_a_cpu_only_torch(tiny_models, tmp_path, capsys, no_model_load):
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    err = cli_error(capsys, "--models", str(tiny_models), "--device", "cuda", "--out", str(tmp_path / "o.mp4"))
    assert f"error: --device: cuda: this PyTorch ({torch.__version__}) is a CPU-only build; use --device cpu" in err


def test_usage_errors_are_one_line(capsys):
    assert main(["generate", "--steps", "x"]) == 2
    assert capsys.readouterr().err == ("error: argument --steps: 'x' is not a whole number; see `python -m emocast_lib "
                                       "generate --help`\n")


def test_seed_above_2_63_works(tiny_models, tmp_path):
    assert isinstance(check_job(JobSpec(PORTRAIT, SPEECH, tmp_path / "o.mp4", seed=2**63 + 5), tiny_models),
                      CheckedJob)
    with pytest.raises(JobError, match=r"cfg: nan is not a finite number"):  # the library's own entry point
        sampling_config(4, float("nan"), 1, (1.0, 1.0, 1.0), 25, 16)


# --- output ---------------------------------------------------------------------------------------

def unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if Path("/sys/kernel").is_dir():  # root writes anywhere a mode allows; sysfs refuses new files
        return Path("/sys/kernel")
    pytest.skip("no folder here that this user cannot write")


@pytest.mark.parametrize("case, message", [
    ("exists", "already exists; choose another name, or allow replacing it (--overwrite)"),
    ("folder", "is a folder; give a file name"),
    ("parent_file", "is a file, not a folder"),
    ("unwritable", "cannot write in"),
    ("not_mp4", "does not end in .mp4"),
])
def test_bad_output(case, message, tiny_models, tmp_path, capsys, no_model_load):
    (tmp_path / "exists.mp4").write_bytes(b"an earlier video")
    (tmp_path / "a_file").write_bytes(b"")
    out = {"exists": tmp_path / "exists.mp4", "folder": tmp_path, "parent_file": tmp_path / "a_file" / "o.mp4",
           "unwritable": unwritable_folder(tmp_path) / "o.mp4", "not_mp4": tmp_path / "video.avi"}[case]
    before = snapshot(tmp_path)
    err = cli_error(capsys, "--models", str(tiny_models), "--out", str(out))
    assert "error: --out: " in err and str(out) in err and message in err
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_overwrite_replaces_an_earlier_video(session, short, tmp_path):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"an earlier video")
    with pytest.raises(JobError, match="already exists"):
        run_job(session, spec(short, out))
    run_job(session, spec(short, out, overwrite=True))
    assert streams(out)[1] == 8 and sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4"]


@pytest.mark.slow
def test_paste_back_keeps_the_photo_framing(session, media, short, tmp_path):
    out = run_job(session, spec(short, tmp_path / "o.mp4", image=media["wide"], paste_back=True))
    assert streams(out)[0] == (448, 384)


@pytest.mark.slow
def test_cancelled_run_leaves_the_previous_file(session, short, tmp_path):
    from emocast_lib.sampling import GenerationCancelled

    out = tmp_path / "o.mp4"
    out.write_bytes(b"an earlier video")
    with pytest.raises(GenerationCancelled):
        run_job(session, spec(short, out, overwrite=True), should_stop=lambda: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4"] and out.read_bytes() == b"an earlier video"


def test_writer_refuses_an_existing_file_and_cleans_up(tmp_path):
    out = tmp_path / "node_output.mp4"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        Mp4Writer(out, 25)
    with pytest.raises(RuntimeError, match="stop"):
        with Mp4Writer(tmp_path / "new.mp4", 25, np.zeros(16000, np.float32), 16000) as writer:
            writer.write(torch.rand(4, 3, 16, 16))
            raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node_output.mp4"] and out.read_bytes() == b"keep me"


# --- node glue (no ComfyUI needed; the in-ComfyUI node cases are in test_nodes_comfy.py) ----------

convert = pack_module("convert")
types = pack_module("types")


@pytest.mark.parametrize("call, message", [
    (lambda: convert.single_image(torch.rand(2, 8, 8, 3), "portrait"), "portrait: got a batch of 2 images"),
    (lambda: convert.single_image(torch.rand(8, 8), "portrait"), "portrait: expected a ComfyUI IMAGE"),
    (lambda: convert.audio_mono({"waveform": torch.zeros(2, 1, 100), "sample_rate": 16000}), "audio: got a batch of 2"),
    (lambda: convert.audio_mono({"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000}), "audio: the audio is empty"),
    (lambda: convert.audio_mono({"samples": []}), "audio: not a ComfyUI AUDIO"),
])
def test_node_input_errors(call, message):
    with pytest.raises(types.EmoCASTInputError, match=message):
        call()


# --- interrupted runs -----------------------------------------------------------------------------

@pytest.mark.slow
def test_killed_run_leaves_no_half_file_and_the_next_run_matches_a_fresh_process(session, tiny_models, short,
                                                                                  tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["generate", "--models", str(tiny_models), "--steps", "1", "--audio", str(short)]
    fresh = tmp_path / "fresh.mp4"
    subprocess.run([sys.executable, "-m", "emocast_lib", *base, "--out", str(fresh)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)

    out = tmp_path / "killed.mp4"
    child = subprocess.Popen([sys.executable, "-m", "emocast_lib", "generate", "--models", str(tiny_models),
                              "--steps", "20", "--out", str(out)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / f".killed.mp4.{child.pid}.partial"
    try:
        deadline = time.monotonic() + 300
        while not partial.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # into the first clip
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [partial.name, "fresh.mp4"], left  # a hidden temporary file, never the final name

    first = run_job(session, spec(short, out))  # same name as the killed run
    again = run_job(session, spec(short, tmp_path / "again.mp4"))  # every cache warm
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.mp4", "fresh.mp4", "killed.mp4"]  # stale temp gone
    assert first.read_bytes() == fresh.read_bytes() == again.read_bytes()
