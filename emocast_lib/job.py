"""Jobs: one talking-portrait mp4 from a photo, a speech file and an emotion, for the CLI and batch runners.

The API a runner builds on (the CLI is one such runner, `python -m emocast_lib generate`):

    settings = ModelSettings(models=Path("models"))          # where the models are, device, precision
    problems = check_models(settings) + check_job(spec, settings.models)   # cheap, no model loaded
    with Session(settings, on_progress=print) as session:   # loads each model once, on first use
        for spec in specs:                                   # JobSpec: files + user values
            path = run_job(session, spec, on_progress, should_stop)

* `check_models` and `check_job` return a list of `Problem`s (empty: go ahead). They open no network
  weights: files exist, decode (photo, audio container and samples, safetensors headers, zip
  directories), the photo has a face (MediaPipe's landmarker, ~50 ms: counted as cheap, because a run
  that would stop at "no face" must stop before the 40 s model load), prompt length (CLIP's tokenizer),
  every number in range and finite, the device exists, the output can be written.
* `Session` holds the models and caches keyed by input content: portrait analyses (photo bytes +
  crop/identity settings), emotion encodings (text), audio features (audio bytes + fps/clip length).
  A runner that reuses one session for many jobs pays each model load and each analysis once.
* `run_job` checks the job again (cheap), then writes the mp4 atomically: a hidden temporary file in
  the output folder, renamed when complete. SIGKILL leaves at most that hidden `.NAME.PID.partial`
  file, which the next write of the same output removes; never a half file under the final name.
  Failures raise `JobError` (its `problems` name the input and the fix), `GenerationCancelled` when
  `should_stop()` said so, or propagate KeyboardInterrupt; in every case the output is left as it was.
"""
from __future__ import annotations

import hashlib
import math
import struct
import time
import unicodedata
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

import numpy as np

from . import layout
from .config import DEFAULT_EMOTION, SCHEDULERS, SamplingConfig

# Accepted values of the user settings: (low, high), inclusive. The nodes' widgets use the same ranges.
LIMITS: dict[str, tuple[float, float]] = {
    "steps": (1, 200), "cfg": (0.0, 20.0), "seed": (0, 2**64 - 1), "pose_weight": (0.0, 3.0),
    "face_weight": (0.0, 3.0), "lip_weight": (0.0, 3.0), "fps": (1, 60), "clip_length": (4, 32),
    "expand_ratio": (1.0, 2.0), "crop_scale": (1.2, 4.0), "crossfade": (0.0, 10.0),
    "cfg_end": (0.0, 1.0), "cache_interval": (1, 10),
}
INTEGERS = ("steps", "seed", "fps", "clip_length", "cache_interval")
CROP_MODES = ("auto", "face", "none")
DEVICES = "auto, cpu, cuda, cuda:N or mps"
MIN_PHOTO_SIDE = 64
MAX_PHOTO_PIXELS = 90_000_000  # PIL's decompression-bomb threshold, about 9500 x 9500
PASTE_MAX_SIDE = 1920  # --paste-back videos are scaled to at most this long side (x264 at sane sizes)
MAX_PROMPT_TOKENS = 75  # CLIP's 77 minus the start and end tokens


@dataclass(frozen=True)
class Segment:
    """One emotion of a schedule: `text` from `start` to `end` seconds of the video (Emotion Schedule node)."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class JobSpec:
    """One video to make. Paths are used as given (relative to the working folder)."""

    image: Path  # any photo PIL reads; EXIF orientation applied
    audio: Path  # any audio (or video) file FFmpeg reads, at most audio.MAX_SECONDS long
    out: Path  # the mp4 to write
    emotion: str = DEFAULT_EMOTION  # used when `schedule` is empty
    schedule: tuple[Segment, ...] = ()  # several emotions over time instead of `emotion`
    crossfade: float = 0.4  # seconds of each crossfade between schedule segments
    seed: int = SamplingConfig.seed
    steps: int | None = None  # None: the step count the checkpoint declares, else SamplingConfig's 40
    cfg: float = SamplingConfig.cfg_scale
    pose_weight: float = SamplingConfig.motion_scale[0]
    face_weight: float = SamplingConfig.motion_scale[1]
    lip_weight: float = SamplingConfig.motion_scale[2]
    fps: int = SamplingConfig.fps
    clip_length: int = SamplingConfig.frames_per_clip
    expand_ratio: float = 1.2  # face box expansion for the masks
    crop: str = "auto"  # auto: crop around the face when the photo is not square; face: always; none: never
    crop_scale: float = 2.0  # crop side / face size (Crop Portrait's scale)
    paste_back: bool = False  # the video at the photo's framing (at most PASTE_MAX_SIDE px) instead of the crop
    no_identity: bool = False  # zero identity embedding instead of face recognition
    truncate_prompt: bool = False  # drop trailing words of a prompt over 75 tokens instead of refusing it
    vocal_separation: bool = False  # separate the voice first (audio-separator); the mp4 keeps the input sound
    overwrite: bool = False  # replace an existing `out`
    # Experimental speed levers (README "Speed and memory"); the defaults are the released sampler.
    scheduler: str = SamplingConfig.scheduler  # one of config.SCHEDULERS
    cfg_end: float = SamplingConfig.cfg_end  # guidance for this fraction of the steps only
    cache_interval: int = SamplingConfig.cache_interval  # a full UNet pass every N steps (DeepCache between)


@dataclass(frozen=True)
class ModelSettings:
    """Where the models are and how to run them (one per Session)."""

    models: Path = Path("models")  # ComfyUI-style models folder (layout.py)
    checkpoint: Path | None = None  # EmoCAST network (.pth or .safetensors); None: `default_checkpoint`
    device: str = "auto"
    precision: str = "auto"  # auto, fp32, fp16 or bf16


@dataclass(frozen=True)
class Problem:
    """One reason a job cannot run: `field` is the JobSpec/ModelSettings field, `message` one line that
    names the input value and says what to do."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class JobError(ValueError):
    """A job that cannot run or failed on its inputs; `problems` has one entry per cause."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))


@dataclass(frozen=True)
class Progress:
    """What a job is doing, for `on_progress`: `stage` is "check", "load", "prepare", "sample" or "done";
    during "sample", `done`/`total` count denoising steps over the whole video and `eta_s` estimates the
    seconds left."""

    stage: str
    text: str
    clip: int = 0
    clips: int = 0
    done: int = 0
    total: int = 0
    eta_s: float | None = None


OnProgress = Callable[[Progress], None]


# --- user values ----------------------------------------------------------------------------------

def value_problems(**values: Any) -> list[Problem]:
    """Range, type and finiteness problems of named settings (names of LIMITS)."""
    problems = []
    for name, value in values.items():
        low, high = LIMITS[name]
        integer = name in INTEGERS
        if isinstance(value, bool) or not isinstance(value, (int, float) if not integer else int):
            kind = "a whole number" if integer else "a number"
            problems.append(Problem(name, f"{value!r} is not {kind}; use {kind} from {low} to {high}"))
        elif not math.isfinite(value):
            problems.append(Problem(name, f"{value} is not a finite number; use a value from {low} to {high}"))
        elif not low <= value <= high:
            problems.append(Problem(name, f"{value} is out of range; use a value from {low} to {high}"))
    return problems


def sampling_config(steps: int, cfg: float, seed: int, weights: tuple[float, float, float], fps: int,
                    clip_length: int, scheduler: str = SamplingConfig.scheduler,
                    cfg_end: float = SamplingConfig.cfg_end,
                    cache_interval: int = SamplingConfig.cache_interval) -> SamplingConfig:
    """The one place user values become a SamplingConfig (CLI, batch and the sampler node); raises
    JobError naming each bad value."""
    problems = value_problems(steps=steps, cfg=cfg, seed=seed, pose_weight=weights[0], face_weight=weights[1],
                              lip_weight=weights[2], fps=fps, clip_length=clip_length, cfg_end=cfg_end,
                              cache_interval=cache_interval) + scheduler_problems(scheduler)
    if problems:
        raise JobError(problems)
    return SamplingConfig(steps=int(steps), cfg_scale=float(cfg), frames_per_clip=int(clip_length), fps=int(fps),
                          motion_scale=tuple(float(w) for w in weights), seed=int(seed), scheduler=scheduler,
                          cfg_end=float(cfg_end), cache_interval=int(cache_interval))


def scheduler_problems(scheduler: str) -> list[Problem]:
    if scheduler in SCHEDULERS:
        return []
    return [Problem("scheduler", f"{scheduler!r} is not a scheduler; use {', '.join(SCHEDULERS)}")]


def prompt_problem(text: str, tokens: int | None, truncate: bool) -> str | None:
    """Why an emotion prompt cannot be used (empty, control characters, too long), or None."""
    if not isinstance(text, str) or not text.strip():
        return f"{text!r} is empty; describe the emotion, e.g. \"{DEFAULT_EMOTION}\""
    bad = sorted({c for c in text if unicodedata.category(c) in ("Cc", "Cf") and c not in "\t\n\r\u200d"})
    if bad:
        names = ", ".join(f"U+{ord(c):04X}" for c in bad[:3])
        return f"{_short(text)!r} contains control characters ({names}); remove them"
    if tokens is not None and tokens > MAX_PROMPT_TOKENS and not truncate:
        return (f"{_short(text)!r} has {tokens} tokens; CLIP takes at most {MAX_PROMPT_TOKENS}: shorten it by "
                f"{tokens - MAX_PROMPT_TOKENS} (about a word each), or drop the end with --truncate-prompt")
    return None


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def count_tokens(text: str) -> int:
    """CLIP BPE tokens of a prompt (without start and end), from the tokenizer wheel: no model needed."""
    from instant_clip_tokenizer import Tokenizer

    return len(Tokenizer().encode(text))


# --- files ----------------------------------------------------------------------------------------

def load_photo(path: str | Path) -> np.ndarray:
    """Any photo PIL reads -> RGB uint8 (H, W, 3), upright (EXIF orientation applied). Greyscale, 16-bit,
    CMYK and palette images are converted; transparency is composited over white. ValueError names the
    file and the fix (missing, empty, not an image, damaged, too large)."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; check the path")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a photo file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); give a photo file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PHOTO_PIXELS:
                    raise Image.DecompressionBombError(f"{w}x{h} pixels")
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im, path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"{path} is too large to decode safely ({_reason(e)}); the limit is "
                             f"{MAX_PHOTO_PIXELS / 1e6:.0f} megapixels: scale it down") from e
        except UnidentifiedImageError as e:
            raise ValueError(f"{path} is not an image PIL can read ({_reason(e)}); give a PNG, JPEG or WebP "
                             "photo") from e
        except (OSError, SyntaxError, EOFError, struct.error) as e:
            raise ValueError(f"{path} is damaged or truncated ({_reason(e)}); export or download it again") from e


def _to_rgb(im, path: Path) -> np.ndarray:
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit or float greyscale
        grey = np.asarray(im, np.float64)
        if grey.max(initial=0) > 255:
            grey = grey / 257
        grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")).copy()
    try:
        return np.asarray(im.convert("RGB")).copy()
    except ValueError as e:
        raise ValueError(f"{path} uses the colour mode {im.mode}, which cannot be converted to RGB; save it as an "
                         "RGB PNG or JPEG") from e


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: the cache key of an input."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_checkpoint(models: Path) -> Path:
    """models/emocast/net.pth, else the only .safetensors in models/emocast (else net.pth, reported missing)."""
    net = layout.NET.path(models)
    if net.exists():
        return net
    found = sorted(net.parent.glob("*.safetensors")) if net.parent.is_dir() else []
    return found[0] if len(found) == 1 else net


# --- cheap checks ---------------------------------------------------------------------------------

def check_models(settings: ModelSettings, identity: bool = True) -> list[Problem]:
    """Problems of the models folder, the checkpoint, the device and the precision, found without loading
    any weights: files exist, their headers read (safetensors headers, zip directories, the checkpoint's
    declared config), the kinds match (an SD VAE or TAESD, CLIP-L keys, a wav2vec2 config).
    `identity=False` skips the face-recognition models (jobs with no_identity)."""
    problems = _device_problems(settings.device, settings.precision)
    models = Path(settings.models)
    if not models.is_dir():
        what = "is a file, not a folder" if models.exists() else "does not exist"
        return problems + [Problem("models", f"{models} {what}; give the models folder (see README, Model files), "
                                             "or make test models with `python -m emocast_lib make-tiny-models DIR`")]
    checkpoint = Path(settings.checkpoint) if settings.checkpoint else default_checkpoint(models)
    needed = [f for f in layout.REQUIRED if f is not layout.NET and (identity or f not in layout.IDENTITY)]
    missing = layout.missing_files(models, needed)
    if missing:
        problems.append(Problem("models", layout.missing_report(models, missing).replace("\n", " ")))
    if not checkpoint.is_file():
        if settings.checkpoint:
            problems.append(Problem("checkpoint", f"{checkpoint} not found; give an EmoCAST net.pth or a "
                                                  ".safetensors made by `python -m emocast_lib convert`"))
        else:
            several = sorted(checkpoint.parent.glob("*.safetensors")) if checkpoint.parent.is_dir() else []
            hint = (f"; {checkpoint.parent} holds several .safetensors ({', '.join(p.name for p in several)}): "
                    "choose one with --checkpoint") if len(several) > 1 else f"; download it from {layout.NET.source}"
            problems.append(Problem("checkpoint", f"{checkpoint} not found{hint}"))
    else:
        problems += _checkpoint_problems(checkpoint)
    missing_paths = {f.path(models) for f in missing}
    for path, check in ((layout.VAE.path(models), _vae_problem), (layout.CLIP_L.path(models), _clip_problem),
                        (layout.WAV2VEC.path(models), _wav2vec_problem),
                        (layout.LANDMARKER.path(models), _landmarker_problem)):
        if path not in missing_paths and (problem := check(path)):
            problems.append(Problem("models", problem))
    return problems


def _device_problems(device: str, precision: str) -> list[Problem]:
    import torch

    problems = []
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        problems.append(Problem("precision", f"{precision!r} is not a precision; use auto, fp32, fp16 or bf16"))
    if device == "auto":
        return problems
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        return problems + [Problem("device", f"{device!r} is not a device ({_reason(e)}); use {DEVICES}")]
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
            problems.append(Problem("device", f"{device}: this PyTorch ({torch.__version__}) is {build}; use "
                                              "--device cpu, or install a CUDA build of torch (scripts/install.sh)"))
        elif dev.index is not None and dev.index >= torch.cuda.device_count():
            problems.append(Problem("device", f"{device}: only {torch.cuda.device_count()} CUDA device(s) here "
                                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"))
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            problems.append(Problem("device", f"{device}: Apple's MPS is not available here; use --device cpu"))
    elif dev.type != "cpu":
        problems.append(Problem("device", f"{device!r} is not supported; use {DEVICES}"))
    if precision == "fp16" and dev.type == "cpu":
        problems.append(Problem("precision", "fp16 on the CPU is slow and partly unsupported; use fp32 or bf16"))
    return problems


def _checkpoint_problems(path: Path) -> list[Problem]:
    """The checkpoint's declared config and its keys/shapes against that network, from the safetensors header
    or the memory-mapped pickle: no tensor data is read."""
    import torch

    from .checkpoint import CheckpointError, check_state_dict, checkpoint_config, read_metadata, read_state_dict

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

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
    from .checkpoint import net_shapes

    return net_shapes(config)


def _safetensors_keys(path: Path) -> tuple[list[str] | None, str | None]:
    from safetensors import SafetensorError, safe_open

    if path.is_dir():
        return None, f"{path} is a folder, not a .safetensors file"
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys()), None
    except (SafetensorError, OSError) as e:
        return None, f"{path} is not a readable .safetensors file, it is truncated or damaged ({_reason(e)})"


def _companion_problem(path: Path, entry: layout.ModelFile, fits: Callable[[list[str]], bool],
                       not_it: str) -> str | None:
    """A companion .safetensors that does not read, or whose keys are not what `fits` expects (`not_it`
    then says what it is not and what to do)."""
    keys, problem = _safetensors_keys(path)
    if problem:
        return f"{problem}; download it again from {entry.source}"
    return None if fits(keys) else f"{path} {not_it}"


def _vae_problem(path: Path) -> str | None:
    from .companions import vae_format

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
    import zipfile

    if not zipfile.is_zipfile(path):
        return (f"{path} is not a MediaPipe .task bundle (truncated or another file); download it again from "
                f"{layout.LANDMARKER.source}")
    return None


def check_job(spec: JobSpec, models_dir: str | Path) -> list[Problem]:
    """Every problem of one job found without loading a network (see the module docstring); [] = runnable.

    Decodes the photo and the audio (audio.MAX_SECONDS at most), looks for a face with the landmarker of
    `models_dir` when it is there (else that is reported by `check_models`), tokenizes the prompts and
    checks every value and the output path. Never writes anything (a probe file in the output folder
    is created and removed at once)."""
    from . import audio as audio_lib
    from .files import output_problem

    problems = value_problems(**{k: getattr(spec, k) for k in LIMITS if k != "steps"})
    if spec.steps is not None:
        problems += value_problems(steps=spec.steps)
    if spec.crop not in CROP_MODES:
        problems.append(Problem("crop", f"{spec.crop!r} is not a crop mode; use {', '.join(CROP_MODES)}"))
    problems += scheduler_problems(spec.scheduler)
    problems += _emotion_problems(spec)
    problems += _photo_problems(spec, Path(models_dir))
    try:
        wave, rate = audio_lib.load_audio_file(spec.audio)
        problems += _wave_problems(spec, wave, rate)
    except (OSError, ValueError) as e:
        problems.append(Problem("audio", str(e)))
    if spec.vocal_separation:
        problems += _separation_problems(Path(models_dir))
    if problem := output_problem(Path(spec.out), spec.overwrite):
        problems.append(Problem("out", problem))
    elif Path(spec.out).suffix.lower() != ".mp4":
        problems.append(Problem("out", f"{spec.out} does not end in .mp4; the video is written as mp4"))
    return problems


def _emotion_problems(spec: JobSpec) -> list[Problem]:
    from .emotion import emotion_schedule

    problems = []
    texts = [("schedule", s.text) for s in spec.schedule] or [("emotion", spec.emotion)]
    for name, text in texts:
        ok = isinstance(text, str) and text.strip()
        if problem := prompt_problem(text, count_tokens(text) if ok else None, spec.truncate_prompt):
            problems.append(Problem(name, problem))
    if spec.schedule:
        bad = [s for s in spec.schedule if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                                                    for v in (s.start, s.end))]
        if bad:
            problems.append(Problem("schedule", f"{bad[0].start}-{bad[0].end} s: times must be finite seconds >= 0"))
        else:
            import torch

            try:  # the node's own range checks, on placeholder embeddings
                emotion_schedule([(torch.zeros(1), s.start, s.end) for s in spec.schedule], 0.0, fps=1.0, num_frames=1)
            except ValueError as e:
                problems.append(Problem("schedule", f"{e}; fix the START:END times"))
    return problems


def _photo_problems(spec: JobSpec, models_dir: Path) -> list[Problem]:
    try:
        rgb = load_photo(spec.image)
    except (OSError, ValueError) as e:
        return [Problem("image", str(e))]
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_PHOTO_SIDE:
        return [Problem("image", f"{spec.image} is only {w}x{h} pixels; use a photo at least {MIN_PHOTO_SIDE} px on "
                                 "each side (the face should be 256 px or more)")]
    if spec.crop == "none" and h != w:
        return [Problem("image", f"{spec.image} is {w}x{h}, not square, and --crop none keeps it whole; use "
                                 "--crop auto (a square crop around the face)")]
    task = layout.LANDMARKER.path(models_dir)
    if not task.is_file() or _landmarker_problem(task):
        return []  # reported by check_models
    try:
        detect_face(task, rgb)
    except ValueError as e:
        return [Problem("image", f"{spec.image}: {e}")]
    return []


def detect_face(task: Path, rgb: np.ndarray) -> np.ndarray:
    """(478, 2) landmarks of the face MediaPipe finds first; ValueError when there is none."""
    from .face import LandmarkDetector

    with native_stderr_quiet(), LandmarkDetector(task) as detect:
        try:
            return detect(rgb)
        except ValueError:
            raise ValueError("no face found; use a photo with one clear, frontal face") from None


@contextmanager
def native_stderr_quiet() -> Iterator[None]:
    """Hold back what native libraries print on file descriptor 2 (MediaPipe's TFLite and absl notes on
    every landmarker start); it is printed after all if the block fails other than with a ValueError
    (an input problem, reported on its own)."""
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except ValueError:
            raise
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _wave_problems(spec: JobSpec, wave: np.ndarray, rate: int) -> list[Problem]:
    if not np.isfinite(wave).all():
        return [Problem("audio", f"{spec.audio} contains NaN or infinite samples; re-export it")]
    fps = spec.fps if not value_problems(fps=spec.fps) else 25
    if wave.shape[1] < rate / fps:
        return [Problem("audio", f"{spec.audio} lasts {wave.shape[1] / rate * 1000:.0f} ms, shorter than one video "
                                 f"frame at {spec.fps} fps; give a longer speech file")]
    return []


def _separation_problems(models_dir: Path) -> list[Problem]:
    import importlib.util

    from .audio import SEPARATOR_FILES, SEPARATOR_MODEL

    folder = layout.SEPARATOR.path(models_dir).parent
    problems = []
    missing = [f for f in SEPARATOR_FILES if not (folder / f).is_file()]
    if missing:
        problems.append(Problem("vocal_separation", f"needs {', '.join(missing)} in {folder}: on a machine with "
                                f"internet run `audio-separator --download_model_only -m {SEPARATOR_MODEL} "
                                "--model_file_dir <folder>` and copy the files there, or leave it off"))
    if importlib.util.find_spec("audio_separator") is None:
        problems.append(Problem("vocal_separation", "needs the optional package audio-separator (README, In "
                                                    "ComfyUI), or leave it off"))
    return problems


# --- the session: models loaded once, caches ------------------------------------------------------

class _Lru:
    """A small least-recently-used cache."""

    def __init__(self, size: int):
        self.size, self.items = size, OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = make()
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def _quiet_detector(path: Path) -> Callable[[], "_QuietDetector"]:
    from .face import LandmarkDetector

    def make() -> _QuietDetector:
        with native_stderr_quiet():
            return _QuietDetector(LandmarkDetector(path))
    return make


class _QuietDetector:
    """A LandmarkDetector whose native log lines are held back (see native_stderr_quiet)."""

    def __init__(self, detector):
        self.detector = detector

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        with native_stderr_quiet():
            return self.detector(rgb)

    def close(self) -> None:
        self.detector.close()


@dataclass
class PreparedPortrait:
    """A photo analysed for the network: its square crop's inputs, and where the crop lies in the photo."""

    portrait: Any  # pipeline.Portrait
    crop: Any  # face.PortraitCrop in the (upright) photo
    note: str


@dataclass
class _Models:
    net: Any = None
    vae: Any = None
    text: Any = None
    wav2vec: Any = None
    landmarker: Any = None
    faces: Any = None
    declared_steps: int | None = None


class Session:
    """The models of one models folder on one device/dtype, loaded once (each on first use, or all with
    `load()`), and caches of per-input work: `portraits` (key: photo sha256 + crop/identity settings +
    model size), `emotions` (prompt text + truncation), `audio_features` (audio sha256 + fps + clip
    length + vocal separation). Use as a context manager or call `close()`. Not thread-safe: one
    session per worker process."""

    def __init__(self, settings: ModelSettings, on_progress: OnProgress | None = None, portrait_cache: int = 16,
                 emotion_cache: int = 256, audio_cache: int = 2):
        problems = _device_problems(settings.device, settings.precision)
        if problems:
            raise JobError(problems)
        self.settings = settings
        self.models = Path(settings.models)
        self.checkpoint = Path(settings.checkpoint) if settings.checkpoint else default_checkpoint(self.models)
        self.device = _pick_device(settings.device)
        self.dtype = _pick_dtype(settings.precision, self.device)
        self.on_progress = on_progress
        self.portraits, self.emotions = _Lru(portrait_cache), _Lru(emotion_cache)
        self.audio_features = _Lru(audio_cache)
        self._m = _Models()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._m.landmarker is not None:
            self._m.landmarker.close()
        self._m = _Models()

    def _say(self, stage: str, text: str) -> None:
        if self.on_progress:
            self.on_progress(Progress(stage, text))

    def _load(self, what: layout.ModelFile, path: Path, make: Callable[[], Any]) -> Any:
        """Load one model with a progress line; any failure becomes a JobError naming the file."""
        from .checkpoint import CheckpointError

        self._say("load", f"loading {what.what} from {path}{_size_text(path)}")
        field = "checkpoint" if what is layout.NET else "models"
        try:
            return make()
        except JobError:
            raise
        except CheckpointError as e:
            raise JobError([Problem(field, str(e).splitlines()[0])]) from e
        except MemoryError as e:
            raise JobError([Problem(field, f"not enough memory to load {path}; close other programs, or use a GPU "
                                           "(--device) or half precision (--precision bf16)")]) from e
        except Exception as e:  # any damage in a file the headers did not show
            raise JobError([Problem(field, f"{path} cannot be loaded as the {what.what} ({_reason(e)}); download it "
                                           f"again from {what.source}")]) from e

    @property
    def net(self):
        if self._m.net is None:
            from .checkpoint import STEPS_KEY, load_net, read_metadata

            def make():
                net = load_net(self.checkpoint, dtype=self.dtype, device=self.device)
                _refuse_nonfinite(net, self.checkpoint, "checkpoint")
                return net

            self._m.net = self._load(layout.NET, self.checkpoint, make)
            steps = read_metadata(self.checkpoint).get(STEPS_KEY)
            self._m.declared_steps = int(steps) if steps and steps.isdigit() and int(steps) > 0 else None
        return self._m.net

    @property
    def declared_steps(self) -> int | None:
        """The step count the checkpoint declares (checkpoint.STEPS_KEY), if any."""
        self.net  # noqa: B018 - read with the network
        return self._m.declared_steps

    @property
    def vae(self):
        if self._m.vae is None:
            from .companions import load_vae

            path = layout.VAE.path(self.models)
            self._m.vae = self._load(layout.VAE, path, lambda: load_vae(path, self.device, self.dtype))
        return self._m.vae

    @property
    def text_encoder(self):
        if self._m.text is None:
            from .companions import load_clip_l

            path = layout.CLIP_L.path(self.models)
            self._m.text = self._load(layout.CLIP_L, path, lambda: _checked(load_clip_l(path, self.device), path,
                                                                             lambda e: e.text_model))
        return self._m.text

    @property
    def wav2vec(self):
        if self._m.wav2vec is None:
            from .audio import load_wav2vec2

            path = layout.WAV2VEC.path(self.models)
            self._m.wav2vec = self._load(layout.WAV2VEC, path,
                                         lambda: _checked(load_wav2vec2(path), path).to(self.device))
        return self._m.wav2vec

    @property
    def landmarker(self):
        if self._m.landmarker is None:
            path = layout.LANDMARKER.path(self.models)
            self._m.landmarker = self._load(layout.LANDMARKER, path, _quiet_detector(path))
        return self._m.landmarker

    @property
    def face_analysis(self):
        if self._m.faces is None:
            from .face import load_face_analysis

            path = layout.face_dir(self.models)
            self._m.faces = self._load(layout.FACE_RECOGNIZER, path, lambda: load_face_analysis(path))
        return self._m.faces

    def load(self, identity: bool = True) -> None:
        """Load every model now (else each loads on first use); `identity=False` skips face recognition."""
        self.net, self.vae, self.text_encoder, self.wav2vec, self.landmarker  # noqa: B018
        if identity:
            self.face_analysis  # noqa: B018

    # --- cached per-input work ---

    def portrait(self, spec: JobSpec) -> PreparedPortrait:
        """The photo's network inputs (cached by photo content and the settings that shape them)."""
        size = self.net.config.sample_size
        key = (file_digest(Path(spec.image)), _crop_mode(spec, None), spec.crop_scale, spec.expand_ratio,
               spec.no_identity, size)
        return self.portraits.get(key, lambda: self._analyse(spec, size))

    def _analyse(self, spec: JobSpec, size: int) -> PreparedPortrait:
        from . import face as face_lib
        from .pipeline import make_portrait

        self._say("prepare", f"analysing the face in {spec.image}")
        rgb = load_photo(spec.image)
        try:
            landmarks = self.landmarker(rgb)
        except ValueError as e:
            raise JobError([Problem("image", f"{spec.image}: no face found; use a photo with one clear, "
                                             "frontal face")]) from e
        h, w = rgb.shape[:2]
        if _crop_mode(spec, (h, w)) == "face":
            crop_rgb, crop = face_lib.crop_portrait(rgb, landmarks, spec.crop_scale, spec.expand_ratio)
            landmarks = landmarks - np.array([crop.x0, crop.y0], np.float64)
            note = f"cropped {crop.side}x{crop.side} around the face at ({crop.x0}, {crop.y0}) of the {w}x{h} photo"
        else:
            crop_rgb = rgb
            _, box = face_lib.expand_box(landmarks[list(face_lib.FACE_OVAL_IDS)], spec.expand_ratio, w, h)
            crop = face_lib.PortraitCrop(0, 0, h, h, w, tuple(box))
            note = f"the whole {w}x{h} photo"
        identity = None
        if not spec.no_identity:
            try:
                found = face_lib.face_identity(self.face_analysis, crop_rgb)
            except ValueError as e:
                raise JobError([Problem("image", f"{spec.image}: face recognition found no face in the portrait; "
                                                 "use a clearer frontal photo, or --no-identity")]) from e
            identity, note = found.embedding, f"{note}; {found.note}"
        return PreparedPortrait(make_portrait(crop_rgb, landmarks, identity, size, spec.expand_ratio), crop, note)

    def emotion(self, text: str, truncate: bool):
        """EncodedText of a prompt (cached by text and truncation)."""
        from .emotion import encode_prompt

        return self.emotions.get((text, truncate), lambda: encode_prompt(self.text_encoder, text, truncate))

    def features(self, spec: JobSpec, wave16k: Callable[[], np.ndarray]):
        """audio.AudioFeatures of the job's speech (cached by audio content, fps, clip length, separation)."""
        from .audio import encode_audio

        key = (file_digest(Path(spec.audio)), spec.fps, spec.clip_length, spec.vocal_separation)
        return self.audio_features.get(key, lambda: encode_audio(wave16k(), self.wav2vec, spec.fps, spec.clip_length))


def _size_text(path: Path) -> str:
    try:
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return ""
    return f" ({size / 1e6:.0f} MB)" if size >= 1e6 else f" ({size / 1e3:.0f} kB)"


def _checked(model, path: Path, module: Callable[[Any], Any] = lambda m: m):
    _refuse_nonfinite(module(model), path, "models")
    return model


def _refuse_nonfinite(module, path: Path, field: str) -> None:
    """A model file with NaN or infinite weights gives a black or noisy video with exit 0: refuse it."""
    import torch

    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise JobError([Problem(field, f"{path}: the weight {name} holds NaN or infinite values; the file is "
                                           "damaged: download it again")])


def _pick_device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")


def _pick_dtype(name: str, device):
    from .config import PRECISIONS

    if name == "auto":
        return PRECISIONS["fp16"] if device.type in ("cuda", "mps") else PRECISIONS["fp32"]
    return PRECISIONS[name]


def _crop_mode(spec: JobSpec, hw: tuple[int, int] | None) -> str:
    """"face" or "none"; "auto" becomes "face" for a non-square photo (hw None: not resolved yet)."""
    if spec.crop != "auto" or hw is None:
        return spec.crop
    return "face" if hw[0] != hw[1] else "none"


# --- running a job --------------------------------------------------------------------------------

def run_job(session: Session, spec: JobSpec, on_progress: OnProgress | None = None,
            should_stop: Callable[[], bool] | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Make the video of `spec` with the session's models; returns the mp4 path (see the module docstring).

    Order: cheap checks (JobError) -> decode the audio -> load the models not loaded yet -> analyse the
    portrait, encode audio and emotion (cached) -> clips, each written to the mp4 as it is decoded.
    `on_progress` gets Progress events (default: the session's); `should_stop()` is asked before every
    denoising step and ends the job with sampling.GenerationCancelled. `metadata` goes into the mp4's
    container tags (the batch records the job's settings there)."""
    import torch

    from . import audio as audio_lib
    from .face import paste_back
    from .files import OutputError
    from .pipeline import AudioWindows, iter_clips
    from .video import Mp4Writer

    say = on_progress or session.on_progress or (lambda p: None)
    say(Progress("check", f"checking {spec.image}, {spec.audio}"))
    problems = check_job(spec, session.models)
    if problems:
        raise JobError(problems)
    wave, rate = audio_lib.load_audio_file(spec.audio)
    previous, session.on_progress = session.on_progress, say
    try:
        net = session.net
        steps = spec.steps or session.declared_steps or SamplingConfig.steps
        if spec.steps is None:
            source = "the step count the checkpoint declares" if session.declared_steps else "the released default"
            say(Progress("prepare", f"{steps} denoising steps per clip ({source}; --steps changes it)"))
        settings = sampling_config(steps, spec.cfg, spec.seed, (spec.pose_weight, spec.face_weight, spec.lip_weight),
                                   spec.fps, spec.clip_length, spec.scheduler, spec.cfg_end, spec.cache_interval)
        prepared = session.portrait(spec)
        say(Progress("prepare", f"portrait: {prepared.note}"))
        feats = session.features(spec, lambda: _speech_16k(spec, session, wave, rate))
        emotion = _emotion(session, spec, feats.audio_length, say)
        session.vae  # noqa: B018 - load before the first step, so the ETA measures sampling only
    finally:
        session.on_progress = previous

    photo, crop = (_paste_target(spec, prepared.crop) if spec.paste_back else (None, None))
    clips, total = feats.num_clips, feats.num_clips * settings.steps
    start = time.perf_counter()

    def on_step(clip: int, step: int, _latents) -> None:
        done = clip * settings.steps + step + 1
        eta = (time.perf_counter() - start) / done * (total - done)
        say(Progress("sample", f"clip {clip + 1}/{clips} step {step + 1}/{settings.steps}", clip + 1, clips, done,
                     total, eta))

    try:
        writer = Mp4Writer(spec.out, spec.fps, wave, rate, overwrite=spec.overwrite, metadata=metadata)
    except OutputError as e:  # the output changed since the checks (another process wrote it)
        raise JobError([Problem("out", str(e))]) from e
    with writer:
        for clip in iter_clips(net, session.vae, prepared.portrait, AudioWindows(feats.windowed, feats.audio_length),
                               emotion, settings, on_step=on_step, should_stop=should_stop):
            if not bool(torch.isfinite(clip.latents).all()):
                raise JobError([Problem("checkpoint", f"clip {clip.index + 1} came out with NaN or infinite values: "
                                        f"a model file under {session.models} or {session.checkpoint} is damaged, or "
                                        f"{session.dtype} overflowed; try --precision fp32, or download the models "
                                        "again")])
            frames = clip.frames
            if photo is not None:
                frames = torch.cat([paste_back(photo, part, crop) for part in frames.split(4)])
            writer.write(frames)
    say(Progress("done", f"wrote {spec.out} ({writer.frames} frames, {time.perf_counter() - start:.1f} s sampling)"))
    return Path(spec.out)


def _speech_16k(spec: JobSpec, session: Session, wave: np.ndarray, rate: int) -> np.ndarray:
    import tempfile

    from . import audio as audio_lib

    if not spec.vocal_separation:
        return audio_lib.to_16k_mono(wave, rate)
    with tempfile.TemporaryDirectory(prefix="emocast-vocals-") as tmp:
        vocals = audio_lib.separate_vocals(spec.audio, layout.SEPARATOR.path(session.models).parent, tmp)
        return audio_lib.load_separated_16k(vocals)


def _emotion(session: Session, spec: JobSpec, frames: int, say: OnProgress):
    """pipeline.Emotion: one prompt, or the schedule resolved per frame."""
    from .emotion import emotion_schedule
    from .pipeline import Emotion

    texts = [s.text for s in spec.schedule] or [spec.emotion]
    encoded = [session.emotion(t, spec.truncate_prompt) for t in texts]
    for e in encoded:
        if e.dropped:
            say(Progress("prepare", f"prompt cut to CLIP's 77 tokens; dropped: {e.dropped!r}"))
    uncond = session.emotion("", False).hidden
    if not spec.schedule:
        return Emotion(encoded[0].hidden, uncond)
    segments = [(e.hidden[0], s.start, s.end) for e, s in zip(encoded, spec.schedule, strict=True)]
    return Emotion(emotion_schedule(segments, spec.crossfade, spec.fps, frames), uncond)


def _paste_target(spec: JobSpec, crop):
    """The photo (3, H, W) in [0, 1], scaled to at most PASTE_MAX_SIDE with even sides, and the crop in it."""
    import torch
    from PIL import Image

    from .face import PortraitCrop

    rgb = load_photo(spec.image)
    h, w = rgb.shape[:2]
    scale = min(1.0, PASTE_MAX_SIDE / max(h, w))
    nw, nh = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
    if (nw, nh) != (w, h):
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.LANCZOS))
    sx, sy = nw / w, nh / h
    side = max(1, min(round(crop.side * sx), nw, nh))
    x0, y0 = min(round(crop.x0 * sx), nw - side), min(round(crop.y0 * sy), nh - side)
    scaled = PortraitCrop(x0, y0, side, nh, nw, crop.face_box)
    return torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1).contiguous(), scaled


__all__ = ["LIMITS", "Segment", "JobSpec", "ModelSettings", "Problem", "JobError", "Progress", "value_problems",
           "sampling_config", "prompt_problem", "count_tokens", "load_photo", "default_checkpoint", "check_models",
           "check_job", "detect_face", "Session", "PreparedPortrait", "run_job"]
