"""The session: the models of one folder on one device and precision, each loaded once on first use,
and least-recently-used caches of the per-input work (portrait analyses, prompt encodings, audio features)
that jobs sharing an input reuse."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable, Hashable

import numpy as np
import torch

from .. import audio as audio_lib
from .. import face as face_lib
from .. import layout
from ..checkpoint import STEPS_KEY, CheckpointError, load_net, read_metadata
from ..companions import load_clip_l, load_vae
from ..config import PRECISIONS
from ..emotion import EncodedText, encode_prompt
from ..photo import reason
from ..pipeline import make_portrait
from .checks import CheckedJob, Inputs, check_job, default_checkpoint, device_problems, storage_problems
from .schema import JobError, JobSpec, ModelSettings, OnProgress, Problem, Progress


@dataclass
class PreparedPortrait:
    """A photo analysed for the network: its square crop's inputs, and where the crop lies in the photo."""

    portrait: Any  # pipeline.Portrait
    crop: face_lib.PortraitCrop  # in the (upright) photo
    note: str


@dataclass(frozen=True)
class _Keyed:
    """An lru_cache argument that compares by `key` alone (what shapes the result); the job rides along."""

    key: Hashable
    job: CheckedJob = field(compare=False, hash=False)
    speaker: int | None = field(default=None, compare=False, hash=False)  # a conversation's speaker (in `key` too)


class Session:
    """The models of one models folder on one device/dtype, loaded once (each on first use, or all with
    `load()`), and caches of per-input work: portraits (key: photo sha256 + crop/identity settings +
    model size), emotions (prompt text + truncation), audio features (audio sha256 + fps + clip length +
    vocal separation); `inputs` holds the decoded files (pass the Inputs the jobs were checked with).
    Use as a context manager or call `close()`. Not thread-safe: one session per worker process."""

    MODELS = ("net", "declared_steps", "vae", "text_encoder", "wav2vec", "face_analysis")

    def __init__(self, settings: ModelSettings, on_progress: OnProgress | None = None, portrait_cache: int = 16,
                 emotion_cache: int = 256, audio_cache: int = 2, inputs: Inputs | None = None):
        problems = device_problems(settings.device, settings.precision)
        if problems:
            raise JobError(problems)
        self.settings = settings
        self.models = Path(settings.models)
        self.checkpoint = Path(settings.checkpoint) if settings.checkpoint else default_checkpoint(self.models)
        self.device = _pick_device(settings.device)
        if problems := storage_problems(settings.weight_dtype, self.device):
            raise JobError(problems)
        self.dtype = _pick_dtype(settings.precision, self.device)
        self.on_progress = on_progress
        self.inputs = inputs or Inputs(self.models)  # the checks' decodings, when the caller checked the jobs
        self._portraits = lru_cache(maxsize=portrait_cache)(self._analyse)
        self._emotions = lru_cache(maxsize=emotion_cache)(self._encode_prompt)
        self._features = lru_cache(maxsize=audio_cache)(self._encode_audio)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.inputs.close()
        for name in self.MODELS:
            self.__dict__.pop(name, None)
        for cache in (self._portraits, self._emotions, self._features):
            cache.cache_clear()

    def check(self, spec: JobSpec) -> CheckedJob:
        """check_job with this session's models folder and decoded inputs."""
        return check_job(spec, self.models, self.inputs)

    def _say(self, stage: str, text: str) -> None:
        if self.on_progress:
            self.on_progress(Progress(stage, text))

    def _load(self, what: layout.ModelFile, path: Path, make: Callable[[], Any]) -> Any:
        """Load one model with a progress line; any failure becomes a JobError naming the file."""
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
            raise JobError([Problem(field, f"{path} cannot be loaded as the {what.what} ({reason(e)}); download it "
                                           f"again from {what.source}")]) from e

    # --- the models, each loaded on first use ---

    @cached_property
    def net(self):
        def make():
            net = load_net(self.checkpoint, dtype=self.dtype, device=self.device,
                           weight_dtype=self.settings.weight_dtype)
            _refuse_nonfinite(net, self.checkpoint, "checkpoint")
            return net

        return self._load(layout.NET, self.checkpoint, make)

    @cached_property
    def declared_steps(self) -> int | None:
        """The step count the checkpoint declares (checkpoint.STEPS_KEY), if any."""
        self.net  # noqa: B018 - a checkpoint that does not load says so first
        steps = read_metadata(self.checkpoint).get(STEPS_KEY)
        return int(steps) if steps and steps.isdigit() and int(steps) > 0 else None

    @cached_property
    def vae(self):
        path = layout.VAE.path(self.models)
        return self._load(layout.VAE, path, lambda: load_vae(path, self.device, self.dtype))

    @cached_property
    def text_encoder(self):
        path = layout.CLIP_L.path(self.models)
        return self._load(layout.CLIP_L, path,
                          lambda: _checked(load_clip_l(path, self.device), path, lambda e: e.text_model))

    @cached_property
    def wav2vec(self):
        path = layout.WAV2VEC.path(self.models)
        return self._load(layout.WAV2VEC, path, lambda: _checked(audio_lib.load_wav2vec2(path), path).to(self.device))

    @cached_property
    def face_analysis(self):
        path = layout.face_dir(self.models)
        return self._load(layout.FACE_RECOGNIZER, path, lambda: face_lib.load_face_analysis(path))

    def load(self, identity: bool = True) -> None:
        """Load every model now (else each loads on first use); `identity=False` skips face recognition."""
        self.net, self.vae, self.text_encoder, self.wav2vec  # noqa: B018
        if identity:
            self.face_analysis  # noqa: B018

    # --- cached per-input work ---

    def portrait(self, job: CheckedJob, speaker: int | None = None) -> PreparedPortrait:
        """The photo's network inputs, or those of a conversation speaker's face (cached by photo content,
        the face and the settings that shape them)."""
        spec = job.spec
        face = None if speaker is None else spec.speakers[speaker].face
        key = (job.image_sha256, crop_mode(spec, None), face, spec.crop_scale, spec.expand_ratio, spec.no_identity,
               self.net.config.sample_size)
        return self._portraits(_Keyed(key, job, speaker))

    def _analyse(self, keyed: _Keyed) -> PreparedPortrait:
        job, spec = keyed.job, keyed.job.spec
        if job.landmarks is None and not job.faces:
            raise JobError([Problem("models", f"{layout.LANDMARKER.path(self.models)} is missing or damaged; the "
                                              "face cannot be found without it")])
        self._say("prepare", f"analysing the face in {spec.image}")
        crop_rgb, landmarks, crop, note = _crop(job, keyed.speaker)
        identity = None
        if not spec.no_identity:
            try:
                found = face_lib.face_identity(self.face_analysis, crop_rgb)
            except ValueError as e:
                raise JobError([Problem("image", f"{spec.image}: face recognition found no face in the portrait; "
                                                 "use a clearer frontal photo, or --no-identity")]) from e
            identity, note = found.embedding, f"{note}; {found.note}"
        size = self.net.config.sample_size
        return PreparedPortrait(make_portrait(crop_rgb, landmarks, identity, size, spec.expand_ratio), crop, note)

    def emotion(self, text: str, truncate: bool) -> EncodedText:
        """The encoding of a prompt (cached by text and truncation)."""
        return self._emotions(text, truncate)

    def _encode_prompt(self, text: str, truncate: bool) -> EncodedText:
        return encode_prompt(self.text_encoder, text, truncate)

    def features(self, job: CheckedJob, speaker: int | None = None) -> audio_lib.AudioFeatures:
        """The job's speech features, or a conversation speaker's (cached by audio content and channel, fps,
        clip length, vocal separation)."""
        spec = job.spec
        if speaker is None:
            key = (job.audio_sha256, spec.fps, spec.clip_length, spec.vocal_separation)
        else:
            key = (job.speaker_sha256(speaker), spec.speakers[speaker].channel, spec.fps, spec.clip_length)
        return self._features(_Keyed(key, job, speaker))

    def _encode_audio(self, keyed: _Keyed) -> audio_lib.AudioFeatures:
        spec = keyed.job.spec
        return audio_lib.encode_audio(self._speech_16k(keyed.job, keyed.speaker), self.wav2vec, spec.fps,
                                      spec.clip_length)

    def _speech_16k(self, job: CheckedJob, speaker: int | None = None) -> np.ndarray:
        if speaker is not None:
            return audio_lib.to_16k_mono(*job.speaker_sound(speaker))
        if not job.spec.vocal_separation:
            return audio_lib.to_16k_mono(*job.sound)
        with tempfile.TemporaryDirectory(prefix="emocast-vocals-") as tmp:
            vocals = audio_lib.separate_vocals(job.spec.audio, layout.SEPARATOR.path(self.models).parent, tmp)
            return audio_lib.load_separated_16k(vocals)


def _crop(job: CheckedJob, speaker: int | None) -> tuple[np.ndarray, np.ndarray, face_lib.PortraitCrop, str]:
    """(portrait pixels, its landmarks, where it lies in the photo, a note): a conversation speaker's face, a
    square crop around the face, or the whole (square) photo."""
    spec, rgb = job.spec, job.photo
    h, w = rgb.shape[:2]
    if speaker is not None:
        face = spec.speakers[speaker].face
        crop_rgb, crop = face_lib.crop_face(rgb, list(job.faces), face, spec.crop_scale, spec.expand_ratio)
        landmarks = face_lib.pick_face(list(job.faces), face)[0] - np.array([crop.x0, crop.y0], np.float64)
        return crop_rgb, landmarks, crop, (f"face {face} of {crop.faces} (from the left), cropped {crop.side}x"
                                           f"{crop.side} at ({crop.x0}, {crop.y0}) of the {w}x{h} photo")
    landmarks = job.landmarks
    if crop_mode(spec, (h, w)) == "face":
        crop_rgb, crop = face_lib.crop_portrait(rgb, landmarks, spec.crop_scale, spec.expand_ratio)
        note = f"cropped {crop.side}x{crop.side} around the face at ({crop.x0}, {crop.y0}) of the {w}x{h} photo"
        return crop_rgb, landmarks - np.array([crop.x0, crop.y0], np.float64), crop, note
    _, box = face_lib.expand_box(landmarks[list(face_lib.FACE_OVAL_IDS)], spec.expand_ratio, w, h)
    return rgb, landmarks, face_lib.PortraitCrop(0, 0, h, h, w, tuple(box)), f"the whole {w}x{h} photo"


def crop_mode(spec: JobSpec, hw: tuple[int, int] | None) -> str:
    """"face" or "none"; "auto" becomes "face" for a non-square photo (hw None: not resolved yet)."""
    if spec.crop != "auto" or hw is None:
        return spec.crop
    return "face" if hw[0] != hw[1] else "none"


def _size_text(path: Path) -> str:
    try:
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return ""
    return f" ({size / 1e6:.0f} MB)" if size >= 1e6 else f" ({size / 1e3:.0f} kB)"


def _checked(model, path: Path, module: Callable[[Any], Any] = lambda m: m):
    _refuse_nonfinite(module(model), path, "models")
    return model


def _refuse_nonfinite(module: torch.nn.Module, path: Path, field: str) -> None:
    """A model file with NaN or infinite weights gives a black or noisy video with exit 0: refuse it."""
    for name, tensor in module.state_dict().items():
        if tensor.element_size() == 1 and tensor.is_floating_point():  # fp8 (torch has no isfinite for it)
            tensor = tensor.float()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise JobError([Problem(field, f"{path}: the weight {name} holds NaN or infinite values; the file is "
                                           "damaged: download it again")])


def _pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return PRECISIONS["fp16"] if device.type in ("cuda", "mps") else PRECISIONS["fp32"]
    return PRECISIONS[name]
