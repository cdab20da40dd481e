"""`python -m emocast_lib batch JOBS`: many talking-portrait videos from one JSONL or CSV jobs file.

Jobs run one after another in this process (models loaded once), or with `--ray` on a Ray runtime:
one actor per GPU (or per N CPU threads) holds the models and takes the next job from the driver,
which keeps only the queue and the report. Ray is imported only then.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# One job per line. `emotion` is a prompt, or a schedule: a JSON list of {"text", "start", "end"}
# (seconds) or the text form `0-1.5 s: "calm" | 1.5-3 s: "angry"`, as the Emotion Schedule node shows it.
REQUIRED = ("image", "audio", "emotion", "out")
OPTIONAL = ("seed", "steps", "cfg", "weights", "crossfade")
WEIGHTS = ("pose", "face", "lip")  # EmoCAST's motion weights, in the order of config.REGIONS
DEFAULT_CROSSFADE = 0.4  # seconds; the Emotion Schedule node's default


class JobsFileError(ValueError):
    """The jobs file as a whole cannot be read (missing, unknown format, bad CSV header)."""


@dataclass(frozen=True)
class Segment:
    text: str
    start: float
    end: float


@dataclass
class JobLine:
    """One line of the jobs file: its typed values (paths resolved against the jobs file's folder), or
    what is wrong with it."""

    line: int
    values: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def where(self) -> str:
        return f"line {self.line}"


# --- parsing -------------------------------------------------------------------------------------------------

_SEGMENT = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*-\s*(\d+(?:\.\d*)?)\s*s?\s*:\s*(.*?)\s*$", re.S)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: needs a non-empty text, got {value!r}")
    return value


def _number(name: str, value: Any, kind: type) -> int | float:
    if isinstance(value, str):
        try:
            value = json.loads(value.strip())
        except json.JSONDecodeError:
            raise ValueError(f"{name}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError(f"{name}: {value!r} is not {'a whole number' if kind is int else 'a number'}")
    return kind(value)


def parse_emotion(value: Any) -> str | list[Segment]:
    """A prompt stays text; a schedule (list of {"text", "start", "end"} or `START-END s: text | ...`)
    becomes segments. Whether the segments fit together is checked with the timeline (`check_schedule`)."""
    if isinstance(value, list):
        segments = []
        for i, seg in enumerate(value, 1):
            if not isinstance(seg, dict) or set(seg) != {"text", "start", "end"}:
                raise ValueError(f"emotion: schedule entry {i} must be {{\"text\", \"start\", \"end\"}}, got {seg!r}")
            segments.append(Segment(_text(f"emotion entry {i} text", seg["text"]),
                                    _number(f"emotion entry {i} start", seg["start"], float),
                                    _number(f"emotion entry {i} end", seg["end"], float)))
        if not segments:
            raise ValueError("emotion: the schedule is empty; give at least one {\"text\", \"start\", \"end\"}")
        return segments
    text = _text("emotion", value)
    if not _SEGMENT.match(text.split("|")[0]):
        return text
    segments = []
    for i, part in enumerate(text.split("|"), 1):
        m = _SEGMENT.match(part)
        if not m or not m.group(3).strip('"'):
            raise ValueError(f"emotion: schedule part {i} {part.strip()!r} is not `START-END s: text` "
                             f"(seconds, e.g. `0-1.5 s: calm | 1.5-3 s: angry`)")
        segments.append(Segment(m.group(3).strip('"'), float(m.group(1)), float(m.group(2))))
    return segments


def parse_weights(value: Any) -> tuple[float, float, float]:
    """{"pose": p, "face": f, "lip": l} or the text `pose=p face=f lip=l`; a weight left out is 1."""
    if isinstance(value, str):
        pairs = [p for p in re.split(r"[\s;,]+", value.strip()) if p]
        if not all(p.count("=") == 1 for p in pairs):
            raise ValueError(f"weights: {value!r} is not `pose=P face=F lip=L` (any of the three, default 1)")
        value = dict(p.split("=") for p in pairs)
    if not isinstance(value, dict) or set(value) - set(WEIGHTS):
        raise ValueError(f"weights: {value!r} must name only {', '.join(WEIGHTS)}, e.g. {{\"lip\": 1.2}}")
    return tuple(_number(f"weights {k}", value.get(k, 1.0), float) for k in WEIGHTS)


def _resolve(value: Any, name: str, base: Path) -> Path:
    path = Path(_text(name, value)).expanduser()
    return path if path.is_absolute() else base / path


def _json_cell(name: str, value: Any, opener: str) -> Any:
    """A CSV cell (or JSONL string) holding a JSON list or object, as a spreadsheet exports it."""
    if isinstance(value, str) and value.lstrip().startswith(opener):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: {value!r} starts like JSON but is not ({e.msg} at column {e.colno})") from None
    return value


def parse_values(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Raw fields of one line -> typed values; ValueError names the field and what is wrong."""
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(REQUIRED + OPTIONAL)}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (each line needs {', '.join(REQUIRED)})")
    values: dict[str, Any] = {k: _resolve(raw[k], k, base) for k in ("image", "audio", "out")}
    values["emotion"] = parse_emotion(_json_cell("emotion", raw["emotion"], "["))
    for k, kind in (("seed", int), ("steps", int), ("cfg", float), ("crossfade", float)):
        if k in raw:
            values[k] = _number(k, raw[k], kind)
    if "weights" in raw:
        values["weights"] = parse_weights(_json_cell("weights", raw["weights"], "{"))
    if "crossfade" in values and isinstance(values["emotion"], str):
        raise ValueError("crossfade: only applies to an emotion schedule; this line has a single emotion")
    return values


def _parse(line: int, raw: dict[str, Any], base: Path) -> JobLine:
    try:
        return JobLine(line, parse_values(raw, base))
    except ValueError as e:
        return JobLine(line, error=str(e))


def _read_jsonl(text: str, base: Path) -> list[JobLine]:
    jobs = []
    for n, row in enumerate(text.splitlines(), 1):
        if not row.strip() or row.lstrip().startswith("#"):
            continue
        try:
            raw = json.loads(row)
        except json.JSONDecodeError as e:
            jobs.append(JobLine(n, error=f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(raw, dict):
            jobs.append(JobLine(n, error=f"needs a JSON object {{\"image\": ..., ...}}, got {type(raw).__name__}"))
            continue
        jobs.append(_parse(n, raw, base))
    return jobs


def _read_csv(text: str, base: Path, name: str) -> list[JobLine]:
    reader = csv.reader(text.splitlines(keepends=True))
    header = next(reader, None)
    if header is None:
        raise JobsFileError(f"{name}: empty; the first line names the columns: {', '.join(REQUIRED + OPTIONAL)}")
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in REQUIRED + OPTIONAL]
    missing = [h for h in REQUIRED if h not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise JobsFileError(f"{name}:1: the header must name the columns {', '.join(REQUIRED)} and optionally "
                            f"{', '.join(OPTIONAL)}, each once; got {', '.join(header)}")
    jobs, end = [], reader.line_num
    for row in reader:
        start, end = end + 1, reader.line_num  # a quoted cell may span lines: report where the record starts
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            jobs.append(JobLine(start, error=f"has {len(row)} cells, the header has {len(header)} columns"))
            continue
        jobs.append(_parse(start, {k: v for k, v in zip(header, row) if v.strip()}, base))
    return jobs


def read_jobs(path: Path) -> list[JobLine]:
    """Every line of a .jsonl or .csv jobs file, parsed; a bad line carries its error, the others their
    values. Relative paths resolve against the jobs file's folder."""
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise JobsFileError(f"{path}: name the jobs file .jsonl (one JSON object per line) or .csv (with a header)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise JobsFileError(f"jobs file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobsFileError(f"cannot read the jobs file {path}: {e}") from None
    base = path.resolve().parent
    jobs = _read_jsonl(text, base) if path.suffix.lower() == ".jsonl" else _read_csv(text, base, str(path))
    if not jobs:
        raise JobsFileError(f"{path}: holds no jobs")
    return jobs


def check_outputs_distinct(jobs: list[JobLine]) -> None:
    """Two lines writing one file would each overwrite the other: the later line is marked bad."""
    first: dict[Path, int] = {}
    inputs = {j.values[k].resolve(): j.line for j in jobs if not j.error for k in ("image", "audio")}
    for job in jobs:
        if job.error:
            continue
        out = job.values["out"].resolve()
        if out in first:
            job.error = f"out: {job.values['out']} is also the output of line {first[out]}; give each job its own file"
        elif out in inputs:
            job.error = f"out: {job.values['out']} is an input of line {inputs[out]}; it would be overwritten"
        else:
            first[out] = job.line


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--"
    seconds = round(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
