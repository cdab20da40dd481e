"""Speech -> wav2vec2 features exactly as the EmoCAST/Hallo reference computes them.

Upstream: Hallo's hallo/datasets/audio_processor.py (AudioProcessor.preprocess) and
hallo/models/wav2vec.py (Wav2VecModel), which EmoCAST reuses; the fixture spec is
tests/fixtures/preprocess/README.md. Stages (spec §1.3): 16 kHz mono waveform -> zero-mean/unit-variance
normalisation -> frame count `ceil(seconds * fps)` and zero padding to whole clips -> wav2vec2 conv
features linearly interpolated (align_corners=True) to one step per video frame -> the 12 transformer
layer outputs -> 5-frame windows. Optional vocal separation follows §1.5.
"""
from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import soundfile
import soxr
import torch
import torch.nn.functional as F

__all__ = [
    "SEPARATOR_FILES",
    "WAV2VEC2_BASE",
    "AudioFeatures",
    "AudioInfo",
    "CHANNELS",
    "MAX_SECONDS",
    "TransformersWav2Vec2",
    "Wav2Vec2Stages",
    "encode_audio",
    "load_audio_file",
    "load_separated_16k",
    "load_wav2vec2",
    "mix_tracks",
    "normalize",
    "pick_channel",
    "probe_audio",
    "separate_vocals",
    "to_16k_mono",
    "check_length",
    "window_frames",
]

SAMPLE_RATE = 16000
WINDOW = 2  # frames each side: the audio projector sees frames i-2 .. i+2


def _check_wave(wave: np.ndarray, what: str) -> None:
    if wave.size == 0 or wave.shape[-1] == 0:
        raise ValueError(f"{what} is empty (0 samples): connect or load audio that contains speech")
    if not np.isfinite(wave).all():
        raise ValueError(f"{what} contains NaN or infinite samples: re-export or re-decode the audio file")


def to_16k_mono(waveform: torch.Tensor | np.ndarray, sample_rate: int) -> np.ndarray:
    """[channels, samples] or [samples] float audio at any rate -> float32 16 kHz mono (samples,).

    As librosa.load(sr=16000) in the reference: float32 channel mean, soxr "HQ" resampling, then
    zero-padded or cut to ceil(n * 16000 / sample_rate) samples. Native 16 kHz input is not resampled.
    For ComfyUI's AUDIO pass `audio["waveform"][0]`.
    """
    if isinstance(waveform, torch.Tensor):
        wave = waveform.detach().cpu().float().numpy()
    else:
        wave = np.asarray(waveform, np.float32)
    if wave.ndim not in (1, 2):
        raise ValueError(f"audio waveform must be [channels, samples] or [samples], got shape {tuple(wave.shape)}")
    if int(sample_rate) <= 0:
        raise ValueError(f"audio sample rate must be a positive integer, got {sample_rate}")
    _check_wave(wave, "audio waveform")
    mono = wave.mean(axis=0, dtype=np.float32) if wave.ndim == 2 else wave
    if sample_rate == SAMPLE_RATE:
        return np.ascontiguousarray(mono, dtype=np.float32)
    n_out = int(np.ceil(mono.shape[-1] * (float(SAMPLE_RATE) / sample_rate)))
    out = soxr.resample(mono, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    return np.pad(out, (0, max(0, n_out - len(out))))[:n_out]


# Which channel of a recording is one speaker's track: all of them averaged ("mix", as the reference reads
# speech), or one channel, for a recording with one speaker per channel ("left" = 1, "right" = 2).
CHANNELS = ("mix", "left", "right", *(str(n) for n in range(3, 9)))


def pick_channel(waveform: torch.Tensor | np.ndarray, channel: str) -> np.ndarray:
    """[channels, samples] -> float32 [channels, samples] for "mix" (all of them, unchanged), else [1, samples]:
    the one channel named in CHANNELS ("left" is channel 1, "right" channel 2). ValueError when it lacks it."""
    wave = waveform.detach().cpu().float().numpy() if isinstance(waveform, torch.Tensor) else np.asarray(
        waveform, np.float32)
    if wave.ndim != 2:
        raise ValueError(f"audio waveform must be [channels, samples], got shape {tuple(wave.shape)}")
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}: choose one of {', '.join(CHANNELS)}")
    if channel == "mix":
        return wave
    number = {"left": 1, "right": 2}.get(channel) or int(channel)
    if number > wave.shape[0]:
        raise ValueError(f"channel {channel} asked for, but the audio has {wave.shape[0]} channel(s): choose mix"
                         f"{'' if wave.shape[0] == 1 else ' or a channel it has'}, or give a recording with one "
                         "speaker per channel")
    return wave[number - 1:number]


def mix_tracks(tracks: Sequence[tuple[torch.Tensor | np.ndarray, int]]) -> tuple[np.ndarray, int]:
    """Several speakers' tracks ([channels, samples], rate) -> (float32 [channels, samples], rate): the sum of
    the tracks at the first track's rate (the others resampled as `to_16k_mono` does), each padded with
    silence to the longest. Channels: the most any track has; a track with fewer is averaged and copied to
    each. A mix louder than full scale is scaled down as a whole (as core's Merge Audio does), not clipped."""
    if not tracks:
        raise ValueError("no audio tracks to mix")
    rate = int(tracks[0][1])
    waves = []
    for i, (wave, track_rate) in enumerate(tracks):
        wave = pick_channel(wave, "mix")
        _check_wave(wave, f"audio track {i + 1}")
        if int(track_rate) != rate:
            wave = soxr.resample(wave.T, int(track_rate), rate, quality="HQ").T
        waves.append(wave)
    channels, length = max(w.shape[0] for w in waves), max(w.shape[1] for w in waves)
    mix = np.zeros((channels, length), np.float32)
    for wave in waves:
        spread = wave if wave.shape[0] == channels else wave.mean(axis=0, keepdims=True)
        mix[:, :wave.shape[1]] += spread
    peak = float(np.abs(mix).max())
    return (mix / peak if peak > 1.0 else mix), rate


# The longest speech the CLI takes: the wav2vec2 pass encodes the whole utterance at once, and its
# features (frames x 5 x 12 x 768 floats, ~270 MB a minute) are held until the last clip.
MAX_SECONDS = 600.0


@dataclass(frozen=True)
class AudioInfo:
    """What an audio file's header says (`probe_audio`)."""

    codec: str
    sample_rate: int
    channels: int
    seconds: float | None  # None when the container does not say


def _first_audio_stream(container, path: Path):
    if not container.streams.audio:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
        raise ValueError(f"{path} has no audio track (FFmpeg finds: {kinds}); give a file with speech")
    return container.streams.audio[0]


def _open(path: Path):
    import av

    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}" if not path.exists() else
                                f"audio {path} is not a file; give an audio file")
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"cannot decode audio file {path}: FFmpeg does not read it as audio ({_av_reason(e)}); "
                         "convert it to WAV, FLAC, MP3 or M4A") from e


def _av_reason(e: Exception) -> str:
    return str(getattr(e, "strerror", None) or e).split("\n")[0][:160]


def probe_audio(path: str | Path) -> AudioInfo:
    """Codec, rate, channels and duration from the header, without decoding (cheap)."""
    path = Path(path)
    with _open(path) as container:
        stream = _first_audio_stream(container, path)
        seconds = None
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / 1_000_000
        return AudioInfo(stream.codec_context.name, int(stream.rate or 0), int(stream.channels or 0), seconds)


def _frame_float(frame) -> np.ndarray:
    """One decoded PyAV frame -> float32 (channels, samples) at full scale 1.0."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128) / 128
    if data.dtype.kind == "i":
        return data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    return data.astype(np.float32, copy=False)


def load_audio_file(path: str | Path, max_seconds: float | None = MAX_SECONDS) -> tuple[np.ndarray, int]:
    """Decode the first audio track of any file FFmpeg reads (wav, flac, mp3, m4a/aac, ogg/opus, a video's
    sound) -> (float32 [channels, samples], rate). 16-bit PCM becomes value/32768, as soundfile reads it.

    Longer than `max_seconds`: ValueError before decoding when the header gives the duration, else as
    soon as the decoded part passes it, so memory stays bounded whatever the file.
    """
    import av

    path = Path(path)
    with _open(path) as container:
        stream = _first_audio_stream(container, path)
        rate = int(stream.rate or 0)
        if rate <= 0:
            raise ValueError(f"{path}: the audio track has no sample rate; re-export the file")
        info_seconds = probe_audio(path).seconds
        if max_seconds is not None and info_seconds is not None and info_seconds > max_seconds:
            raise ValueError(_too_long(path, info_seconds, max_seconds))
        chunks, total = [], 0
        try:
            for frame in container.decode(stream):
                chunk = _frame_float(frame)
                chunks.append(chunk)
                total += chunk.shape[1]
                if max_seconds is not None and total > max_seconds * rate:
                    raise ValueError(_too_long(path, None, max_seconds))
        except av.FFmpegError as e:
            raise ValueError(f"{path}: the audio data is damaged and cannot be decoded ({_av_reason(e)}); "
                             "re-export or download the file again") from e
    if not chunks or total == 0:
        raise ValueError(f"{path} contains no audio samples (0 s); give a file with speech")
    if len({c.shape[0] for c in chunks}) > 1:
        raise ValueError(f"{path}: the channel count changes inside the file; re-export it with a fixed layout")
    return np.ascontiguousarray(np.concatenate(chunks, axis=1)), rate


def _too_long(path: Path, seconds: float | None, limit: float) -> str:
    length = f"{seconds / 60:.1f} minutes" if seconds is not None else "longer than that"
    return (f"{path} is {length}; the limit is {limit / 60:g} minutes ({limit:g} s), because the whole "
            "utterance is encoded at once: split it into shorter parts")


def normalize(wave16k: np.ndarray) -> np.ndarray:
    """Wav2Vec2FeatureExtractor's zero-mean/unit-variance step (population variance, eps 1e-7), float32."""
    x = np.asarray(wave16k, np.float32)
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


# wav2vec2-base-960h's encoder architecture, spelled out rather than taken from transformers' defaults: the
# one-file layout (ComfyUI's models/audio_encoders) has no config.json.
WAV2VEC2_BASE: dict[str, object] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "feat_extract_norm": "group", "feat_extract_activation": "gelu",
    "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_bias": False, "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16,
    "do_stable_layer_norm": False, "vocab_size": 32,
}


def load_wav2vec2(path: str | Path):
    """transformers Wav2Vec2Model, eval mode, fp32, from a folder or a single file.

    A folder holds config.json + model.safetensors (any size, e.g. the test fixtures). A single
    `.safetensors` file (ComfyUI's models/audio_encoders layout, as downloaded from
    facebook/wav2vec2-base-960h) must be wav2vec2-base: its configuration is `WAV2VEC2_BASE`. Both accept
    the bare `Wav2Vec2Model` keys and the public checkpoint's (`wav2vec2.` prefix, `weight_g`/`weight_v`,
    unused `lm_head`). Only safetensors weights are read (no pickle).
    """
    from transformers import Wav2Vec2Config

    path = Path(path)
    if path.is_dir():
        missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"wav2vec2 folder {path} lacks {', '.join(missing)}: it must hold the wav2vec2-base-960h "
                "checkpoint's config.json and model.safetensors (pickled .bin weights are not loaded)")
        config, weights = Wav2Vec2Config.from_pretrained(path, local_files_only=True), path / "model.safetensors"
    elif path.is_file() and path.suffix == ".safetensors":
        config, weights = Wav2Vec2Config(**WAV2VEC2_BASE), path
    else:
        raise FileNotFoundError(f"wav2vec2 not found: {path} is neither a .safetensors file nor a folder; download "
                                "model.safetensors of facebook/wav2vec2-base-960h")
    if config.do_stable_layer_norm:
        raise ValueError(f"{path} is a stable-layer-norm (large) wav2vec2; EmoCAST uses wav2vec2-base-960h")
    return _wav2vec2_from_file(weights, config, single_file=weights == path)


def _wav2vec2_from_file(weights: Path, config, single_file: bool):
    from safetensors.torch import load_file
    from transformers import Wav2Vec2Model

    with torch.device("meta"):  # key names and shapes only; the file's tensors fill it below
        model = Wav2Vec2Model(config)
    expected = model.state_dict()
    # Canonical keys ourselves: transformers versions disagree on reporting weight_g/weight_v as missing.
    found = {_canonical_key(k): v for k, v in load_file(weights).items()}
    lacking = sorted(expected.keys() - found.keys())
    if lacking:
        raise ValueError(f"{weights} is not a matching wav2vec2 checkpoint: it lacks {len(lacking)} weights, "
                         f"e.g. {lacking[:3]}")
    wrong = [k for k in expected if found[k].shape != expected[k].shape]
    if wrong:
        width = found["encoder.layer_norm.bias"].shape[0]
        hint = (f"a single file must be wav2vec2-base-960h (hidden size 768, this one has {width}); other sizes "
                "need a folder with their config.json") if single_file else "its config.json does not match it"
        raise ValueError(f"{weights}: {len(wrong)} weights have other shapes than the model, e.g. {wrong[0]} "
                         f"{tuple(found[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)}; {hint}")
    model.load_state_dict({k: found[k].float() for k in expected}, assign=True)
    return model.eval()


def _canonical_key(key: str) -> str:
    """Public-checkpoint key -> bare Wav2Vec2Model key (prefix dropped, weight norm in parametrised naming)."""
    key = key.removeprefix("wav2vec2.")
    return key.replace("conv.weight_g", "conv.parametrizations.weight.original0").replace(
        "conv.weight_v", "conv.parametrizations.weight.original1")


@dataclass
class AudioFeatures:
    """Audio conditioning for one utterance; `windowed[16t:16t+16]` feeds clip t (clip_length 16)."""

    waveform: np.ndarray              # (n,) float32 16 kHz mono, as given
    input_values: np.ndarray          # (n,) normalised
    encoder_input_values: np.ndarray  # (n + pad_frames * 16000 // fps,) zero-padded to whole clips
    conv_features: torch.Tensor       # (T_conv, C) conv feature encoder output
    interp_features: torch.Tensor     # (seq_len, C) interpolated to one step per video frame
    audio_emb: torch.Tensor           # (seq_len, layers, C) transformer layer outputs
    windowed: torch.Tensor            # (seq_len, 5, layers, C) frames i-2..i+2, clamped at the ends
    seq_len: int                      # frames after padding (multiple of clip_length)
    audio_length: int                 # real frames: trim the generated video to this
    num_clips: int


def window_frames(emb: torch.Tensor, radius: int = WINDOW) -> torch.Tensor:
    """(T, ...) -> (T, 2*radius+1, ...): frame i with its neighbours, indices clamped into [0, T-1]."""
    idx = (torch.arange(emb.shape[0])[:, None] + torch.arange(-radius, radius + 1)).clamp(0, emb.shape[0] - 1)
    return emb[idx]


@runtime_checkable
class Wav2Vec2Stages(Protocol):
    """A wav2vec2-base as the three stages the reference runs separately (spec §1.3 step 5;
    Wav2VecModel.forward), so that any implementation (transformers here, ComfyUI core's in the nodes)
    computes the same features."""

    device: torch.device  # where the waveform is put
    dtype: torch.dtype  # the dtype it is put in, which the stages compute in

    def conv_features(self, wave: torch.Tensor) -> torch.Tensor:
        """(1, samples) -> (1, channels, T_conv): the convolutional feature encoder."""

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(1, T, channels) -> (1, T, hidden): the feature projection (LayerNorm, Linear)."""

    def layer_outputs(self, hidden: torch.Tensor) -> Sequence[torch.Tensor]:
        """(1, T, hidden) -> the output of each transformer layer, (1, T, hidden) each; the positional
        convolution is added and the encoder LayerNorm applied first (post-LN wav2vec2-base)."""


class TransformersWav2Vec2:
    """Wav2Vec2Stages of a transformers `Wav2Vec2Model` (what `load_wav2vec2` returns), computing in its dtype."""

    def __init__(self, model):
        if model.config.do_stable_layer_norm:
            raise ValueError("a stable-layer-norm (large) wav2vec2 cannot give EmoCAST's features; use wav2vec2-base")
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def conv_features(self, wave: torch.Tensor) -> torch.Tensor:
        return self.model.feature_extractor(wave)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.feature_projection(features)[0]  # (projected, normalised input)

    def layer_outputs(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        enc = self.model.encoder
        hidden = enc.layer_norm(hidden + enc.pos_conv_embed(hidden))
        outputs = []
        for layer in enc.layers:
            out = layer(hidden, attention_mask=None)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple, 5.x a tensor
            outputs.append(hidden)
        return outputs


def check_length(wave16k: np.ndarray, fps: int) -> None:
    """ValueError unless the 16 kHz speech is finite and lasts at least one video frame (cheap: run it before
    loading the encoder)."""
    _check_wave(wave16k, "audio waveform")
    if len(wave16k) < SAMPLE_RATE / fps:
        raise ValueError(f"audio is {len(wave16k)} samples at 16 kHz ({len(wave16k) / SAMPLE_RATE * 1000:.1f} ms), "
                         f"shorter than one video frame at {fps} fps: use at least {SAMPLE_RATE // fps} samples")


@torch.inference_mode()
def encode_audio(wave16k: np.ndarray, encoder: Wav2Vec2Stages | torch.nn.Module, fps: int = 25,
                 clip_length: int = 16) -> AudioFeatures:
    """16 kHz mono waveform + wav2vec2 (its stages, or a transformers Wav2Vec2Model) -> AudioFeatures
    (spec §1.3 steps 2-7; AudioProcessor.preprocess)."""
    stages = encoder if isinstance(encoder, Wav2Vec2Stages) else TransformersWav2Vec2(encoder)
    wave = np.asarray(wave16k, np.float32)
    if wave.ndim != 1:
        raise ValueError(f"encode_audio expects 16 kHz mono (samples,), got shape {tuple(wave.shape)}; use to_16k_mono")
    check_length(wave, fps)
    values = normalize(wave)
    audio_length = seq_len = math.ceil(len(values) / SAMPLE_RATE * fps)
    pad_frames = -seq_len % clip_length
    # The reference appends pad_frames * 640 samples to the unpadded count (not seq_len * 640).
    padded = np.pad(values, (0, pad_frames * (SAMPLE_RATE // fps)))
    seq_len += pad_frames

    x = torch.from_numpy(padded).to(stages.device, stages.dtype)[None]
    conv = stages.conv_features(x)  # (1, C, T_conv)
    interp = F.interpolate(conv, size=seq_len, mode="linear", align_corners=True).transpose(1, 2)
    layers = stages.layer_outputs(stages.project(interp))
    audio_emb = torch.stack([h[0] for h in layers], dim=1).float().cpu()
    return AudioFeatures(
        waveform=wave, input_values=values, encoder_input_values=padded,
        conv_features=conv[0].T.float().cpu(), interp_features=interp[0].float().cpu(), audio_emb=audio_emb,
        windowed=window_frames(audio_emb), seq_len=seq_len, audio_length=audio_length,
        num_clips=seq_len // clip_length,
    )


# --- optional vocal separation (spec §1.5) ---------------------------------------------------------

SEPARATOR_MODEL = "Kim_Vocal_2.onnx"
SEPARATOR_FILES = (SEPARATOR_MODEL, "download_checks.json", "mdx_model_data.json", "vr_model_data.json")


def separate_vocals(audio_path: str | Path, model_dir: str | Path, output_dir: str | Path) -> Path:
    """Vocals of `audio_path` with audio-separator + Kim_Vocal_2.onnx, fully offline -> 44.1 kHz WAV path.

    `model_dir` must hold the model and audio-separator's three JSON files (without them the package
    tries to download them). Load the result with `load_separated_16k`, as the reference does.
    """
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    missing = [f for f in SEPARATOR_FILES if not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"vocal separation needs {', '.join(missing)} in {model_dir}. On a machine with internet run "
            f"`audio-separator --download_model_only -m {SEPARATOR_MODEL} --model_file_dir <folder>` and copy "
            f"all four files ({', '.join(SEPARATOR_FILES)}) there, or disable vocal separation")
    try:
        from audio_separator.separator import Separator
    except ImportError as e:
        raise ImportError(
            "vocal separation needs the optional package audio-separator: "
            "`pip install -c <(python -c \"import torch; print('torch==' + torch.__version__.split('+')[0])\") "
            "\"audio-separator[cpu]\"` (or `[gpu]`; the constraint keeps your torch), or disable vocal separation"
        ) from e
    if shutil.which("ffmpeg") is None:
        raise FileNotFoundError("vocal separation needs the ffmpeg program on PATH (audio-separator refuses to start "
                                "without it): install ffmpeg (https://ffmpeg.org/download.html), or disable vocal "
                                "separation")
    output_dir.mkdir(parents=True, exist_ok=True)
    separator = Separator(output_dir=str(output_dir), output_single_stem="vocals",
                          model_file_dir=str(model_dir), output_format="WAV")
    separator.load_model(model_filename=SEPARATOR_MODEL)
    outputs = separator.separate(str(audio_path))
    if not outputs:
        raise RuntimeError(f"audio-separator produced no vocals file for {audio_path}")
    return output_dir / Path(outputs[0]).name


def load_separated_16k(path: str | Path) -> np.ndarray:
    """Load a separated-vocals WAV as the reference does -> float32 16 kHz mono.

    The reference resamples that file with the ffmpeg CLI (`-ar 16000`: libswresample defaults, 16-bit
    PCM, channels kept) before librosa averages the channels; PyAV's resampler is the same library.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"separated vocals file not found: {path}")
    pcm, rate = soundfile.read(path, dtype="int16", always_2d=True)
    _check_wave(pcm.T, f"separated vocals {path.name}")
    if rate != SAMPLE_RATE:
        layout = {1: "mono", 2: "stereo"}.get(pcm.shape[1])
        if layout is None:
            raise ValueError(f"{path} has {pcm.shape[1]} channels; vocal files are mono or stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = rate
        resampler = av.AudioResampler(format="s16", layout=layout, rate=SAMPLE_RATE)
        frames = resampler.resample(frame) + resampler.resample(None)  # None flushes the filter tail
        pcm = np.concatenate([f.to_ndarray() for f in frames], axis=1).reshape(-1, pcm.shape[1])
    return (pcm.astype(np.float32) / 32768).mean(axis=1, dtype=np.float32)
