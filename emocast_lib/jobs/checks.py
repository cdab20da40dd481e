"""Cheap checks: everything that can be wrong with a job or a models folder, found without loading a
network. `check_job` decodes the photo and the audio and finds the face once, and returns them in the
`CheckedJob` that `run_job` takes; `Inputs` keeps those decodings for the jobs of a run that share a file.
"""
from __future__ import annotations

import importlib.util
import unicodedata
import zipfile
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from instant_clip_tokenizer import Tokenizer
from safetensors import SafetensorError, safe_open

from .. import audio as audio_lib
from .. import face as face_lib
from .. import layout
from .. import photo as photo_lib
from ..checkpoint import (
    CheckpointError,
    check_state_dict,
    checkpoint_config,
    net_shapes,
    read_metadata,
    read_state_dict,
)
from ..companions import vae_format
from ..emotion import emotion_schedule
from ..files import output_problem
from ..photo import MIN_PHOTO_SIDE, QuietLandmarker, reason
from .schema import DEFAULT_EMOTION, DEVICES, MAX_PROMPT_TOKENS, JobError, JobSpec, ModelSettings, Problem, option

# Finite samples beyond this many times full scale are a damaged or mis-scaled export: wav2vec2's
# normalisation of samples around 1e20 overflows float32 into NaN features.
MAX_AMPLITUDE = 1e6


# --- one run's decoded inputs -------------------------------------------------------------------------

def _stamp(path: Path) -> tuple[str, int, int]:
    """A file's cache key: its path, modification time and size (a changed file is decoded again)."""
    try:
        st = Path(path).stat()
    except OSError:
        return str(path), -1, -1
    return str(path), st.st_mtime_ns, st.st_size


class Inputs:
    """The decoded photos and sounds of one run, the faces found in the photos and the MediaPipe
    landmarker, opened once: every job of the run that names the same file gets the same decoding and
    face (least recently used ones are dropped, so memory stays bounded in a batch of many photos).
    Pickled (to a Ray worker) it travels empty."""

    def __init__(self, models: Path, photos: int = 4, sounds: int = 4):
        self.models = Path(models)
        self._photo = lru_cache(maxsize=photos)(self._decode_photo)
        self._sound = lru_cache(maxsize=sounds)(self._decode_sound)
        self._digest = lru_cache(maxsize=256)(self._sha256)
        self._face = lru_cache(maxsize=photos)(self._landmarks)
        self._faces = lru_cache(maxsize=photos)(self._all_faces)

    def photo(self, path: Path) -> np.ndarray:
        """RGB uint8 (H, W, 3), upright; read-only (shared by the jobs of the run)."""
        return self._photo(_stamp(path))

    def sound(self, path: Path) -> tuple[np.ndarray, int]:
        """(float32 [channels, samples], rate); read-only."""
        return self._sound(_stamp(path))

    def digest(self, path: Path) -> str:
        """sha256 of the file's bytes."""
        return self._digest(_stamp(path))

    def face(self, path: Path) -> np.ndarray | None:
        """(478, 2) landmarks of the face in the photo, None without a landmarker; ValueError: no face."""
        return self._face(_stamp(path))

    def faces(self, path: Path) -> tuple[np.ndarray, ...]:
        """Every face in the photo (a conversation's), MediaPipe's clearest first; () without a landmarker."""
        return self._faces(_stamp(path))

    def _landmarks(self, stamp: tuple[str, int, int]) -> np.ndarray | None:
        return None if self.landmarker is None else self.landmarker(self.photo(Path(stamp[0])))

    def _all_faces(self, stamp: tuple[str, int, int]) -> tuple[np.ndarray, ...]:
        return () if self.landmarker is None else tuple(self.landmarker.faces(self.photo(Path(stamp[0]))))

    @staticmethod
    def _decode_photo(stamp: tuple[str, int, int]) -> np.ndarray:
        rgb = photo_lib.load_photo(stamp[0])
        rgb.flags.writeable = False
        return rgb

    @staticmethod
    def _decode_sound(stamp: tuple[str, int, int]) -> tuple[np.ndarray, int]:
        wave, rate = audio_lib.load_audio_file(stamp[0])
        wave.flags.writeable = False
        return wave, rate

    @staticmethod
    def _sha256(stamp: tuple[str, int, int]) -> str:
        return photo_lib.file_digest(Path(stamp[0]))

    @cached_property
    def landmarker(self) -> QuietLandmarker | None:
        """The models folder's landmarker, or None when it is missing or damaged (check_models says so)."""
        task = layout.LANDMARKER.path(self.models)
        return QuietLandmarker(task) if task.is_file() and not _landmarker_problem(task) else None

    def close(self) -> None:
        if self.__dict__.get("landmarker") is not None:
            self.landmarker.close()
        self.__dict__.pop("landmarker", None)

    def __getstate__(self) -> dict:
        return {"models": self.models}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["models"])


@dataclass(frozen=True)
class CheckedJob:
    """A job that passed every cheap check, with what the checks computed: the face's landmarks in the
    upright photo; the photo, the sound and their digests come from the run's `Inputs`."""

    spec: JobSpec
    inputs: Inputs
    landmarks: np.ndarray | None  # (478, 2) pixels; None only without a landmarker (check_models says so)
    faces: tuple[np.ndarray, ...] = ()  # a conversation's: every face of the photo, MediaPipe's clearest first

    @property
    def photo(self) -> np.ndarray:
        return self.inputs.photo(self.spec.image)

    @property
    def sound(self) -> tuple[np.ndarray, int]:
        return self.inputs.sound(self.spec.audio)

    @property
    def image_sha256(self) -> str:
        return self.inputs.digest(self.spec.image)

    @property
    def audio_sha256(self) -> str:
        return self.inputs.digest(self.spec.audio)

    def speaker_sound(self, i: int) -> tuple[np.ndarray, int]:
        """Speaker i's track: (float32 [channels, samples] of their channel, rate)."""
        speaker = self.spec.speakers[i]
        wave, rate = self.inputs.sound(speaker.audio)
        return audio_lib.pick_channel(wave, speaker.channel), rate

    def speaker_sha256(self, i: int) -> str:
        return self.inputs.digest(self.spec.speakers[i].audio)


def check_job(spec: JobSpec, models: str | Path, inputs: Inputs | None = None) -> CheckedJob:
    """Every problem of one job found without loading a network; raises JobError listing them all.

    Decodes the photo and the audio (audio.MAX_SECONDS at most) through `inputs` (without one: a new
    one, whose landmarker is closed again), finds the face with the models folder's landmarker when it
    is there (else check_models reports it), tokenizes the prompts and checks the output path. Writes
    nothing (a probe file in the output folder is created and removed at once)."""
    if inputs is None:
        inputs = Inputs(Path(models))
        try:
            return check_job(spec, models, inputs)
        finally:
            inputs.close()
    problems = _emotion_problems(spec)
    landmarks, photo_problems = _face(spec, inputs)
    problems += photo_problems
    faces: tuple[np.ndarray, ...] = ()
    if spec.speakers:
        faces, speaker_problems = _speakers(spec, inputs, photo_ok=not photo_problems)
        problems += speaker_problems
    else:
        problems += _sound_problems(spec.audio, spec.fps, "audio", inputs)
    if spec.vocal_separation:
        problems += _separation_problems(Path(models))
    if problem := output_problem(Path(spec.out), spec.overwrite):
        problems.append(Problem("out", problem))
    elif Path(spec.out).suffix.lower() != ".mp4":
        problems.append(Problem("out", f"{spec.out} does not end in .mp4; the video is written as mp4"))
    if problems:
        raise JobError(problems)
    return CheckedJob(spec, inputs, landmarks, faces)


# --- prompts ------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _tokenizer() -> Tokenizer:
    return Tokenizer()


def count_tokens(text: str) -> int:
    """CLIP BPE tokens of a prompt (without start and end), from the tokenizer wheel: no model needed."""
    return len(_tokenizer().encode(text))


def prompt_problem(text: str, truncate: bool) -> str | None:
    """Why an emotion prompt cannot be used (not text, empty, control characters, too long), or None."""
    if not isinstance(text, str) or not text.strip():
        return f"{text!r} is empty; describe the emotion, e.g. \"{DEFAULT_EMOTION}\""
    if any(unicodedata.category(c) == "Cs" for c in text):
        return (f"{_short(text)!r} is not valid text (it holds bytes that are not UTF-8, shown as \\udcXX); "
                "type the prompt in UTF-8")
    bad = sorted({c for c in text if unicodedata.category(c) in ("Cc", "Cf") and c not in "\t\n\r\u200d"})
    if bad:
        names = ", ".join(f"U+{ord(c):04X}" for c in bad[:3])
        return f"{_short(text)!r} contains control characters ({names}); remove them"
    tokens = count_tokens(text)
    if tokens > MAX_PROMPT_TOKENS and not truncate:
        return (f"{_short(text)!r} has {tokens} tokens; CLIP takes at most {MAX_PROMPT_TOKENS}: shorten it by "
                f"{tokens - MAX_PROMPT_TOKENS} (about a word each), or drop the end with --truncate-prompt")
    return None


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _emotion_problems(spec: JobSpec) -> list[Problem]:
    texts = ([("speakers", s.emotion or spec.emotion) for s in spec.speakers] or
             [("schedule", s.text) for s in spec.schedule] or [("emotion", spec.emotion)])
    problems = [Problem(name, p) for name, text in texts if (p := prompt_problem(text, spec.truncate_prompt))]
    if spec.schedule:
        try:  # the Emotion Schedule node's own range checks, on placeholder embeddings
            emotion_schedule([(torch.zeros(1), s.start, s.end) for s in spec.schedule], 0.0, fps=1.0, num_frames=1)
        except ValueError as e:
            problems.append(Problem("schedule", f"{e}; fix the START:END times"))
    return problems


# --- photo and sound ----------------------------------------------------------------------------------

def _face(spec: JobSpec, inputs: Inputs) -> tuple[np.ndarray | None, list[Problem]]:
    """The face's landmarks in the photo (None without a landmarker), or the photo's problem."""
    try:
        rgb = inputs.photo(spec.image)
    except (OSError, ValueError) as e:
        return None, [Problem("image", str(e))]
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_PHOTO_SIDE:
        return None, [Problem("image", f"{spec.image} is only {w}x{h} pixels; use a photo at least {MIN_PHOTO_SIDE} "
                                       "px on each side (the face should be 256 px or more)")]
    if spec.crop == "none" and h != w:
        return None, [Problem("image", f"{spec.image} is {w}x{h}, not square, and {option('crop')} none keeps it "
                                       f"whole; use {option('crop')} auto (a square crop around the face)")]
    if spec.speakers:  # a conversation finds every face (`_speakers`)
        return None, []
    try:
        return inputs.face(spec.image), []
    except ValueError as e:
        return None, [Problem("image", f"{spec.image}: {e}")]


def _speakers(spec: JobSpec, inputs: Inputs, photo_ok: bool) -> tuple[tuple[np.ndarray, ...], list[Problem]]:
    """Every face of the photo, and the problems of each speaker: their track, and a face the photo has."""
    problems = [p for s in spec.speakers for p in _sound_problems(s.audio, spec.fps, "speakers", inputs, s.channel)]
    if not photo_ok or inputs.landmarker is None:  # the photo's or check_models' problem is reported instead
        return (), problems
    faces = inputs.faces(spec.image)
    if not faces:
        return faces, problems + [Problem("image", f"{spec.image}: no face found; use a photo with clear, frontal "
                                                   "faces")]
    for speaker in spec.speakers:
        try:
            face_lib.pick_face(list(faces), speaker.face)
        except ValueError as e:
            problems.append(Problem("speakers", f"{spec.image}: {e}"))
    return faces, problems


def _sound_problems(path: Path, fps: int, field: str, inputs: Inputs, channel: str = "mix") -> list[Problem]:
    """A speech file that does not decode, holds damaged samples, lacks the channel or is shorter than a frame."""
    try:
        wave, rate = inputs.sound(path)
    except (OSError, ValueError) as e:
        return [Problem(field, str(e))]
    try:
        wave = audio_lib.pick_channel(wave, channel)
    except ValueError as e:
        return [Problem(field, f"{path}: {e}")]
    if not np.isfinite(wave).all():
        return [Problem(field, f"{path} contains NaN or infinite samples; re-export it")]
    peak = float(np.abs(wave).max())
    if peak > MAX_AMPLITUDE:
        return [Problem(field, f"{path} has samples up to {peak:.3g} times full scale (ordinary audio stays within "
                               "1); the file is damaged or wrongly scaled: re-export it")]
    if wave.shape[1] < rate / fps:
        return [Problem(field, f"{path} lasts {wave.shape[1] / rate * 1000:.0f} ms, shorter than one video frame at "
                               f"{fps} fps; give a longer speech file")]
    return []


def _separation_problems(models_dir: Path) -> list[Problem]:
    folder = layout.SEPARATOR.path(models_dir).parent
    problems = []
    missing = [f for f in audio_lib.SEPARATOR_FILES if not (folder / f).is_file()]
    if missing:
        problems.append(Problem("vocal_separation", f"needs {', '.join(missing)} in {folder}: on a machine with "
                                f"internet run `audio-separator --download_model_only -m {audio_lib.SEPARATOR_MODEL} "
                                "--model_file_dir <folder>` and copy the files there, or leave it off"))
    if importlib.util.find_spec("audio_separator") is None:
        problems.append(Problem("vocal_separation", "needs the optional package audio-separator (README, In "
                                                    "ComfyUI), or leave it off"))
    return problems


# --- models -------------------------------------------------------------------------------------------

def default_checkpoint(models: Path) -> Path:
    """models/emocast/net.pth, else the only .safetensors in models/emocast (else net.pth, reported missing)."""
    net = layout.NET.path(models)
    if net.exists():
        return net
    found = sorted(net.parent.glob("*.safetensors")) if net.parent.is_dir() else []
    return found[0] if len(found) == 1 else net


def check_models(settings: ModelSettings, identity: bool = True) -> list[Problem]:
    """Problems of the models folder, the checkpoint, the device and the precision, found without loading
    any weights: files exist, their headers read (safetensors headers, zip directories, the checkpoint's
    declared config), the kinds match (an SD VAE or TAESD, CLIP-L keys, a wav2vec2 config).
    `identity=False` skips the face-recognition models (jobs with no_identity)."""
    problems = device_problems(settings.device, settings.precision)
    models = Path(settings.models)
    if not models.is_dir():
        what = "is a file, not a folder" if models.exists() else "does not exist"
        return problems + [Problem("models", f"{models} {what}; give the models folder (see README, Model files), "
                                             "or make test models with `python -m emocast_lib make-tiny-models DIR`")]
    needed = [f for f in layout.REQUIRED if f is not layout.NET and (identity or f not in layout.IDENTITY)]
    missing = layout.missing_files(models, needed)
    if missing:
        problems.append(Problem("models", layout.missing_report(models, missing).replace("\n", " ")))
    problems += _checkpoint_file_problems(settings)
    missing_paths = {f.path(models) for f in missing}
    for path, check in ((layout.VAE.path(models), _vae_problem), (layout.CLIP_L.path(models), _clip_problem),
                        (layout.WAV2VEC.path(models), _wav2vec_problem),
                        (layout.LANDMARKER.path(models), _landmarker_problem)):
        if path not in missing_paths and (problem := check(path)):
            problems.append(Problem("models", problem))
    return problems


def _checkpoint_file_problems(settings: ModelSettings) -> list[Problem]:
    checkpoint = Path(settings.checkpoint) if settings.checkpoint else default_checkpoint(Path(settings.models))
    if checkpoint.is_file():
        return _checkpoint_problems(checkpoint)
    if settings.checkpoint:
        return [Problem("checkpoint", f"{checkpoint} not found; give an EmoCAST net.pth or a .safetensors made by "
                                      "`python -m emocast_lib convert`")]
    several = sorted(checkpoint.parent.glob("*.safetensors")) if checkpoint.parent.is_dir() else []
    hint = (f"; {checkpoint.parent} holds several .safetensors ({', '.join(p.name for p in several)}): choose one "
            f"with {option('checkpoint')}") if len(several) > 1 else f"; download it from {layout.NET.source}"
    return [Problem("checkpoint", f"{checkpoint} not found{hint}")]


def device_problems(device: str, precision: str) -> list[Problem]:
    """A device that does not exist here, or a precision it cannot run."""
    if device == "auto":
        return []
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        return [Problem("device", f"{device!r} is not a device ({reason(e)}); use {DEVICES}")]
    checks: dict[str, Callable[[str, torch.device], str | None]] = {"cuda": _cuda_problem, "mps": _mps_problem,
                                                                    "cpu": lambda *_: None}
    problem = checks.get(dev.type, lambda name, _: f"{name!r} is not supported; use {DEVICES}")(device, dev)
    problems = [Problem("device", problem)] if problem else []
    if precision == "fp16" and dev.type == "cpu":
        problems.append(Problem("precision", "fp16 on the CPU is slow and partly unsupported; use fp32 or bf16"))
    return problems


def _cuda_problem(device: str, dev: torch.device) -> str | None:
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
        return (f"{device}: this PyTorch ({torch.__version__}) is {build}; use --device cpu, or install a CUDA "
                "build of torch (scripts/install.sh)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        return f"{device}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})"
    return None


def storage_problems(weight_dtype: str, device: torch.device) -> list[Problem]:
    """fp8 weights on a device that cannot hold them: PyTorch has no fp8 tensors on Apple's MPS."""
    if weight_dtype == "default" or device.type != "mps":
        return []
    return [Problem("weight_dtype", f"{weight_dtype}: PyTorch cannot hold fp8 weights on {device}; use "
                                    "--weight-dtype default there, or --device cpu")]


def _mps_problem(device: str, dev: torch.device) -> str | None:
    if torch.backends.mps.is_available():
        return None
    return f"{device}: Apple's MPS is not available here; use --device cpu"


def _checkpoint_problems(path: Path) -> list[Problem]:
    """The checkpoint's declared config and its keys/shapes against that network, from the safetensors header
    or the memory-mapped pickle: no tensor data is read."""
    try:
        if path.suffix.lower() == ".safetensors":
            metadata = read_metadata(path)
            with safe_open(path, framework="pt") as f:
                shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        else:
            shapes, metadata = read_state_dict(path)  # memory-mapped: only the shapes are looked at
        check_state_dict(shapes, _net_shapes(checkpoint_config(path, metadata)), str(path))
    except CheckpointError as e:
        return [Problem("checkpoint", str(e).splitlines()[0])]
    return []


@lru_cache(maxsize=4)
def _net_shapes(config) -> dict[str, tuple[int, ...]]:
    """checkpoint.net_shapes, kept per config: building the network on the meta device takes a second."""
    return net_shapes(config)


def _safetensors_keys(path: Path) -> tuple[list[str] | None, str | None]:
    if path.is_dir():
        return None, f"{path} is a folder, not a .safetensors file"
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys()), None
    except (SafetensorError, OSError) as e:
        return None, f"{path} is not a readable .safetensors file, it is truncated or damaged ({reason(e)})"


def _companion_problem(path: Path, entry: layout.ModelFile, fits: Callable[[list[str]], bool],
                       not_it: str) -> str | None:
    """A companion .safetensors that does not read, or whose keys are not what `fits` expects (`not_it`
    then says what it is not and what to do)."""
    keys, problem = _safetensors_keys(path)
    if problem:
        return f"{problem}; download it again from {entry.source}"
    return None if fits(keys) else f"{path} {not_it}"


def _vae_problem(path: Path) -> str | None:
    return _companion_problem(path, layout.VAE, lambda keys: vae_format(keys) is not None,
                              f"is not an SD VAE (no sd-vae-ft-mse or TAESD weights); put {layout.VAE.name} there")


def _clip_problem(path: Path) -> str | None:
    return _companion_problem(path, layout.CLIP_L,
                              lambda keys: any(k.startswith("text_model.encoder.layers.11.") for k in keys),
                              "is not a CLIP-L text encoder (no 12-layer text_model.* weights); put "
                              "clip_l.safetensors there")


def _wav2vec_problem(path: Path) -> str | None:
    """wav2vec2-base in one .safetensors (the public checkpoint's keys or the bare Wav2Vec2Model ones)."""
    needed = ("feature_extractor.conv_layers.0.conv.weight", "encoder.layers.11.attention.k_proj.weight")
    return _companion_problem(path, layout.WAV2VEC, lambda keys: all(any(k.endswith(n) for k in keys) for n in needed),
                              "is not a wav2vec2-base (no 12-layer wav2vec2 weights); download it again from "
                              f"{layout.WAV2VEC.source}")


def _landmarker_problem(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        return (f"{path} is not a MediaPipe .task bundle (truncated or another file); download it again from "
                f"{layout.LANDMARKER.source}")
    return None
