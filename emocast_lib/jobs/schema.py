"""The job schema: every value a user sets, declared once with its type, range, default and help.

`JobSpec` (one video) and `ModelSettings` (where the models are, how to run them) are pydantic models;
the command line (cli.py), the batch reader (batch.py) and the nodes' widgets read their options, columns,
ranges and defaults from the declarations here (`option`, `widget`, `limits`). Construction checks every
value (type, range, finiteness) and raises `JobError`, one `Problem` per bad value; what needs the files
(photo, audio, models) is checks.py's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_serializer
from pydantic.fields import FieldInfo

from ..audio import CHANNELS, MAX_SECONDS
from ..config import DEFAULT_EMOTION, MAX_FACES, PRECISIONS, SCHEDULERS, STORAGE_FORMATS, SamplingConfig
from ..emotion import EMOTION_CFG_RANGE, STRENGTH_RANGE

# Strict: a whole number must be an int (not 1.5, not true), a switch a bool; floats take ints. Paths
# (UserPath) also take text.
CONFIG = ConfigDict(frozen=True, strict=True, allow_inf_nan=False, extra="forbid")
UserPath = Annotated[Path, Field(strict=False)]
MAX_PROMPT_TOKENS = 75  # CLIP's 77 minus the start and end tokens
CROP_MODES = ("auto", "face", "none")
DEVICES = "auto, cpu, cuda, cuda:N or mps"
PASTE_MAX_SIDE = 1920  # --paste-back videos are scaled to at most this long side (x264 at sane sizes)


def setting(default: Any = ..., *, help: str, ge: float | None = None, le: float | None = None,
            cli: bool | str = True, batch: bool = True) -> Any:
    """One user value: `help` is the CLI help and the docs' text; `cli` False keeps it off the command
    line (a string names its option instead of --the-name), `batch` False off the jobs file's columns."""
    return Field(default, ge=ge, le=le, description=help, json_schema_extra={"cli": cli, "batch": batch})


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

    def __reduce__(self):  # crosses process boundaries (Ray) with its problems
        return JobError, (self.problems,)


class _Values(BaseModel):
    """A pydantic model whose bad values raise JobError with one line per value."""

    model_config = CONFIG

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise JobError(problems_of(e, type(self))) from None


class Segment(_Values):
    """One emotion of a schedule: `text` from `start` to `end` seconds of the video (Emotion Schedule node)."""

    text: str
    start: float = Field(ge=0.0, le=3600.0, description="start of the segment in seconds")
    end: float = Field(ge=0.0, le=3600.0, description="end of the segment in seconds")
    strength: float = Field(1.0, ge=STRENGTH_RANGE[0], le=STRENGTH_RANGE[1],
                            description="how strongly the segment's emotion shows: a multiple of emotion_cfg, "
                                        "crossfaded like the prompts (1: emotion_cfg as it is)")

    def __init__(self, text: str, start: float, end: float, strength: float = 1.0):
        super().__init__(text=text, start=start, end=end, strength=strength)

    @model_serializer(mode="wrap")
    def _strength_when_set(self, handler: Callable) -> dict[str, Any]:
        # Strength 1 is left out, so the batch records of videos made before strengths existed still match.
        values = handler(self)
        if self.strength == 1.0:
            values.pop("strength", None)
        return values


class Speaker(_Values):
    """One person of a conversation: face `face` of the photo (0 = the leftmost) speaks `audio` (one `channel`
    of it, or all of them mixed) with `emotion` (None: the job's emotion)."""

    face: int = Field(ge=0, le=MAX_FACES - 1, description="face of the photo, counted from the left from 0")
    audio: UserPath
    emotion: str | None = None
    channel: Literal[CHANNELS] = "mix"


def parse_speaker(text: str) -> Speaker:
    """`FACE:AUDIO[@CHANNEL][:EMOTION]` (the --speaker syntax) -> Speaker; ValueError says what is wrong. AUDIO
    ends at the first colon after a Windows drive letter; the emotion may hold colons."""
    face, colon, rest = text.partition(":")
    if not colon or not rest.strip():
        raise ValueError(f"{text!r} is not FACE:AUDIO[:EMOTION] (e.g. 0:alice.wav:A cheerful host.)")
    cut = rest.find(":", 2 if re.match(r"[A-Za-z]:[\\/]", rest) else 0)
    audio, emotion = (rest, None) if cut < 0 else (rest[:cut], rest[cut + 1:].strip() or None)
    audio, at, channel = audio.rpartition("@") if re.search(r"@(\w+)$", audio) else ("", "", audio)
    if not face.strip().isdigit():
        raise ValueError(f"{text!r}: FACE {face!r} is not a face number (0 = the leftmost face of the photo)")
    try:
        return Speaker(face=int(face), audio=Path(audio if at else channel), emotion=emotion,
                       channel=channel if at else "mix")
    except JobError as e:
        raise ValueError(f"{text!r}: {'; '.join(p.message for p in e.problems)}") from None


class JobSpec(_Values):
    """One video to make. Paths are used as given (relative to the working folder)."""

    image: UserPath = setting(help="photo with one face: any size (non-square photos are cropped around the face), "
                                   "any format PIL reads; EXIF orientation applied")
    audio: UserPath | None = setting(None, help="speech: any file FFmpeg decodes (wav, flac, mp3, m4a, ogg/opus, a "
                                                f"video's sound), up to {MAX_SECONDS / 60:g} minutes")
    out: UserPath = setting(help="output mp4 (H.264 + AAC)")
    emotion: str = setting(DEFAULT_EMOTION, help=f"free-text emotion prompt (CLIP, at most {MAX_PROMPT_TOKENS} "
                                                 "tokens); used when there is no schedule")
    schedule: tuple[Segment, ...] = setting((), cli="--segment", batch=False,
                                            help="an emotion over a time range in seconds, repeatable; replaces "
                                                 "--emotion (the last segment holds to the end); TEXT ending in "
                                                 "@STRENGTH (e.g. @1.6) multiplies --emotion-cfg over the segment")
    crossfade: float = setting(0.4, ge=0.0, le=10.0, help="seconds of each crossfade between schedule segments")
    speakers: tuple[Speaker, ...] = setting((), cli="--speaker",
                                            help="a conversation, one per person who speaks: FACE:AUDIO[@CHANNEL]"
                                                 "[:EMOTION], repeatable. FACE counts the photo's faces from the "
                                                 "left from 0; AUDIO is that person's track (silent where the "
                                                 "others speak); @left, @right or @3..@8 takes one channel of it; "
                                                 "EMOTION defaults to --emotion. Replaces --audio; the video is the "
                                                 "whole photo with every speaker pasted in and their tracks mixed")
    seed: int = setting(SamplingConfig.seed, ge=0, le=2**64 - 1, help="seed of the initial noise (0 .. 2^64-1)")
    steps: int | None = setting(None, ge=1, le=200, help="denoising steps per clip (default: what the checkpoint "
                                                         f"declares, else {SamplingConfig.steps})")
    cfg: float = setting(SamplingConfig.cfg_scale, ge=0.0, le=20.0, help="guidance scale")
    emotion_cfg: float | None = setting(None, ge=EMOTION_CFG_RANGE[0], le=EMOTION_CFG_RANGE[1],
                                        help="guidance scale of the emotion prompt alone (default: the same as "
                                             "--cfg, the released guidance): above it the emotion shows more, "
                                             "below less, 0 leaves it out; any other value than --cfg runs a third "
                                             "half-batch on every guided step. A segment's @strength multiplies it")
    pose_weight: float = setting(SamplingConfig.motion_scale[0], ge=0.0, le=3.0, help="audio strength on head pose")
    face_weight: float = setting(SamplingConfig.motion_scale[1], ge=0.0, le=3.0, help="audio strength on expression")
    lip_weight: float = setting(SamplingConfig.motion_scale[2], ge=0.0, le=3.0, help="audio strength on lip motion")
    fps: int = setting(SamplingConfig.fps, ge=1, le=60, help="frames per second")
    clip_length: int = setting(SamplingConfig.frames_per_clip, ge=4, le=32, help="frames generated per clip")
    expand_ratio: float = setting(1.2, ge=1.0, le=2.0, help="face box expansion for the masks")
    crop: Literal[CROP_MODES] = setting("auto", help="auto: a square crop around the face when the photo is not "
                                                     "square; face: always crop; none: use the photo whole (it "
                                                     "must be square)")
    crop_scale: float = setting(2.0, ge=1.2, le=4.0, help="crop side relative to the face size")
    paste_back: bool = setting(False, help="return the video at the photo's framing (the animated crop pasted "
                                           f"into the photo, at most {PASTE_MAX_SIDE} px)")
    no_identity: bool = setting(False, help="skip face recognition and use the zero identity (the original code's "
                                            "no-face fallback)")
    truncate_prompt: bool = setting(False, help=f"drop the last words of a prompt over {MAX_PROMPT_TOKENS} tokens "
                                                "instead of stopping")
    vocal_separation: bool = setting(False, help="separate the voice first (needs audio-separator); the mp4 keeps "
                                                 "the input sound")
    overwrite: bool = setting(False, batch=False, help="replace --out if it exists")
    # Experimental speed levers (README "Speed and memory"); the defaults are the released sampler.
    scheduler: Literal[SCHEDULERS] = setting(SamplingConfig.scheduler,
                                             help="experimental speed lever: the sampler; ddim is the released one, "
                                                  "dpmpp_2m and uni_pc aim at its result in fewer --steps (judge "
                                                  "the output yourself)")
    cfg_end: float = setting(SamplingConfig.cfg_end, ge=0.0, le=1.0,
                             help="experimental speed lever: guidance for this fraction of the steps only, the rest "
                                  "runs half the batch (1 = released)")
    cache_interval: int = setting(SamplingConfig.cache_interval, ge=1, le=10,
                                  help="experimental speed lever: a full network pass every N steps, DeepCache reuse "
                                       "of its deep features in between (1 = released)")

    def __init__(self, image: Path | str, audio: Path | str | None, out: Path | str, **values: Any):
        super().__init__(image=image, audio=audio, out=out, **values)
        problems = speaker_problems(self)
        if problems:
            raise JobError(problems)


def speaker_problems(spec: JobSpec) -> list[Problem]:
    """What does not go together with (or without) conversation speakers: one line each."""
    if not spec.speakers:
        missing = f"is missing; give the speech file (or {option('speakers')} per person of a conversation)"
        return [] if spec.audio is not None else [Problem("audio", missing)]
    problems = []
    if spec.audio is not None:
        problems.append(Problem("speakers", f"does not go with {option('audio')}: each speaker's track comes with "
                                            f"their {option('speakers')}; leave {option('audio')} out"))
    faces = [s.face for s in spec.speakers]
    for face in sorted({f for f in faces if faces.count(f) > 1}):
        problems.append(Problem("speakers", f"face {face} is given to {faces.count(face)} speakers; give each face "
                                            "one speaker (one track)"))
    clashes = [(spec.schedule, f"an emotion schedule ({option('schedule')}) is for one speaker; give each speaker's "
                               "emotion in their own entry"),
               (spec.crop == "none", f"{option('crop')} none keeps the photo whole; a conversation crops each face: "
                                     f"use {option('crop')} auto"),
               (spec.vocal_separation, f"{option('vocal_separation')} separates one {option('audio')}; separate "
                                       "each speaker's track beforehand")]
    return problems + [Problem("speakers", text) for clash, text in clashes if clash]


class ModelSettings(_Values):
    """Where the models are and how to run them (one per Session)."""

    models: UserPath = setting(Path("models"), help="ComfyUI-style models folder (see README)")
    checkpoint: UserPath | None = setting(None, help="EmoCAST network, .pth or converted .safetensors (default: "
                                                     "MODELS/emocast/net.pth, else the only .safetensors there)")
    device: str = setting("auto", help=DEVICES)
    precision: Literal[("auto", *PRECISIONS)] = setting("auto", help="auto: fp16 on a GPU, fp32 on the CPU")
    weight_dtype: Literal[("default", *STORAGE_FORMATS)] = setting(
        "default", help="default: the weights in the precision; fp8_e4m3fn / fp8_e5m2: the linear and convolution "
                        "weights stored as 8-bit floats (half of fp16's memory), cast to the precision in every "
                        "layer; e4m3fn is the closer to the default's video (README: fp8 weights)")


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


# --- what the runners derive from the declarations ---------------------------------------------------

def fields(model: type[BaseModel] = JobSpec) -> dict[str, FieldInfo]:
    return model.model_fields


def kind(info: FieldInfo) -> Any:
    """The field's value type without `| None`: int, float, bool, str, Path, a Literal or a tuple."""
    args = [a for a in get_args(info.annotation) if a is not type(None)]
    return args[0] if get_origin(info.annotation) is not Literal and len(args) == 1 else info.annotation


def choices(info: FieldInfo) -> tuple[str, ...] | None:
    return get_args(info.annotation) if get_origin(info.annotation) is Literal else None


def limits(name: str, model: type[BaseModel] = JobSpec) -> tuple[Any, Any]:
    """(low, high) of a number field, inclusive."""
    meta = fields(model)[name].metadata
    return (next(m.ge for m in meta if hasattr(m, "ge")), next(m.le for m in meta if hasattr(m, "le")))


def extra(info: FieldInfo, key: str) -> Any:
    return (info.json_schema_extra or {}).get(key, True)


def option(name: str) -> str:
    """The command-line option of a JobSpec or ModelSettings field (also how error lines name it)."""
    info = fields(JobSpec).get(name) or fields(ModelSettings).get(name)
    named = extra(info, "cli") if info is not None else True
    return named if isinstance(named, str) else f"--{name.replace('_', '-')}"


def widget(name: str, model: type[BaseModel] = JobSpec) -> dict[str, Any]:
    """A node widget's `default` and `min`/`max` (numbers) or `options` (a choice), from the declaration."""
    info = fields(model)[name]
    if options := choices(info):
        return {"options": list(options), "default": info.default}
    if kind(info) in (int, float):
        low, high = limits(name, model)
        return {"default": info.default, "min": low, "max": high}
    return {"default": info.default}


# --- checking values ----------------------------------------------------------------------------------

def problems_of(error: ValidationError, model: type[BaseModel]) -> list[Problem]:
    """pydantic's errors as Problems whose messages name the value and the accepted range."""
    problems = []
    for e in error.errors():
        name = str(e["loc"][0]) if e["loc"] else "value"
        info = fields(model).get(name)
        entry = {Segment: "schedule", Speaker: "speakers"}.get(model)  # an entry of a multi-entry field
        text = _message(e, info, name, model)
        problems.append(Problem(entry, f"{name} {text}") if entry else Problem(name, text))
    return problems


def _range(info: FieldInfo | None, name: str, model: type[BaseModel]) -> str:
    if info is None or kind(info) not in (int, float):
        return ""
    low, high = limits(name, model)
    return f" from {low} to {high}"


def _message(e: dict, info: FieldInfo | None, name: str, model: type[BaseModel]) -> str:
    value, error, span = e.get("input"), e["type"], _range(info, name, model)
    if error in ("greater_than_equal", "less_than_equal"):
        return f"{value} is out of range; use a value{span}"
    if error == "finite_number":
        return f"{value} is not a finite number; use a value{span}"
    if error.startswith("int_"):
        return f"{value!r} is not a whole number; use a whole number{span}"
    if error.startswith("float_"):
        return f"{value!r} is not a number; use a number{span}"
    if error.startswith("bool_"):
        return f"{value!r} is not true or false"
    if error == "literal_error" and info is not None:
        return f"{value!r} is not one of {', '.join(map(str, choices(info)))}"
    if error == "missing":
        return "is missing"
    return f"{value!r}: {e['msg']}"


@lru_cache(maxsize=None)
def _adapter(name: str) -> TypeAdapter:
    info = fields(JobSpec)[name]
    return TypeAdapter(Annotated[info.annotation, info], config=CONFIG)


def value_problems(**values: Any) -> list[Problem]:
    """Type, range and finiteness problems of named JobSpec values, each checked against its declaration."""
    problems = []
    for name, value in values.items():
        try:
            _adapter(name).validate_python(value)
        except ValidationError as e:
            problems += [Problem(name, _message(x, fields(JobSpec)[name], name, JobSpec)) for x in e.errors()]
    return problems


def sampling_config(steps: int, cfg: float, seed: int, weights: tuple[float, float, float], fps: int,
                    clip_length: int, scheduler: str = SamplingConfig.scheduler,
                    cfg_end: float = SamplingConfig.cfg_end,
                    cache_interval: int = SamplingConfig.cache_interval,
                    emotion_cfg: float | None = SamplingConfig.emotion_cfg) -> SamplingConfig:
    """The one place user values become a SamplingConfig (CLI, batch and the sampler node); raises
    JobError naming each bad value."""
    problems = value_problems(steps=steps, cfg=cfg, seed=seed, pose_weight=weights[0], face_weight=weights[1],
                              lip_weight=weights[2], fps=fps, clip_length=clip_length, scheduler=scheduler,
                              cfg_end=cfg_end, cache_interval=cache_interval, emotion_cfg=emotion_cfg)
    if problems:
        raise JobError(problems)
    return SamplingConfig(steps=int(steps), cfg_scale=float(cfg), frames_per_clip=int(clip_length), fps=int(fps),
                          motion_scale=tuple(float(w) for w in weights), seed=int(seed), scheduler=scheduler,
                          cfg_end=float(cfg_end), cache_interval=int(cache_interval),
                          emotion_cfg=None if emotion_cfg is None else float(emotion_cfg))
