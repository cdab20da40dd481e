"""`python -m emocast_lib batch JOBS`: many talking-portrait videos from one JSONL or CSV jobs file.

Built on the job API (jobs/): every line becomes a `JobSpec` (its columns and their checks are the
schema's fields); `check_models` + `check_job` validate all of them before any model loads, decoding each
photo and sound once for the lines that share it; a `Session` per worker loads the models once and caches
portraits, emotion encodings and audio features shared by jobs; `run_job` writes each mp4 atomically.

Jobs run one after another in this process, or with `--ray` on a Ray runtime (ray_pool.py). Nothing done
twice: each mp4 carries the settings that made it (mp4 metadata, written with the file, so the record and
the video appear together). A rerun skips a job whose output exists and whose record equals the job's
settings: the same photo and audio bytes (sha256), the same JobSpec values, the same model files (size
and hash of their first and last MiB) and how they load (precision). The device it ran on is not part of it. `--redo`
runs every job again.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import av
import torch
from tqdm import tqdm

from . import layout
from .emotion import split_strength
from .files import write_bytes
from .jobs import (
    CheckedJob,
    Inputs,
    JobError,
    JobSpec,
    ModelSettings,
    Progress,
    Segment,
    Session,
    Speaker,
    check_job,
    check_models,
    default_checkpoint,
    run_job,
)
from .jobs.schema import choices, extra, fields, kind, parse_speaker
from .sampling import GenerationCancelled

REQUIRED = ("image", "audio", "emotion", "out")
CONVERSATION = ("image", "speakers", "out")  # what a conversation's line needs instead (speakers bring the audio)
PATHS = ("image", "audio", "out")
# `weights` (pose/face/lip) stands for three fields; every other JobSpec field the schema puts in the
# batch file is a column of its own.
WEIGHTS = {"pose": "pose_weight", "face": "face_weight", "lip": "lip_weight"}
COLUMNS = tuple(name for name, info in fields(JobSpec).items()
                if extra(info, "batch") and name not in (*REQUIRED, *WEIGHTS.values()))
PARSED = ("speakers",)  # columns with a parser of their own (parse_speakers)
OPTIONAL = ("weights", *COLUMNS)
RECORD_TAG = "comment"  # the mp4 metadata tag holding {"emocast_batch": settings}
RECORD_KEY = "emocast_batch"


class JobsFileError(ValueError):
    """The jobs file as a whole cannot be used (missing, unknown format, bad CSV header)."""


@dataclass
class JobLine:
    """One line of the jobs file: its JobSpec values (paths resolved against the jobs file's folder), or
    what is wrong with it."""

    line: int
    values: dict[str, Any] = field(default_factory=dict)
    error: str = ""


# --- parsing ---------------------------------------------------------------------------------------------

_SEGMENT = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*-\s*(\d+(?:\.\d*)?)\s*s?\s*:\s*(.*?)\s*$", re.DOTALL)
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: needs a non-empty text, got {value!r}")
    return value


def _cell(value: Any) -> Any:
    """Text holding a JSON number (a CSV cell, or a JSONL string) -> that number; other values as given."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value.strip())
    except json.JSONDecodeError:
        return value.strip()


def _json_cell(name: str, value: Any, opener: str) -> Any:
    """A CSV cell (or a JSONL string) holding a JSON list or object, as a spreadsheet exports it."""
    if isinstance(value, str) and value.lstrip().startswith(opener):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: {value!r} starts like JSON but is not ({e.msg} at column {e.colno})") from None
    return value


def _schedule_entry(i: int, seg: Any) -> Segment:
    if not isinstance(seg, dict) or not {"text", "start", "end"} <= set(seg) <= {"text", "start", "end", "strength"}:
        raise ValueError(f'emotion: schedule entry {i} must be {{"text", "start", "end"}} and optionally '
                         f'"strength", got {seg!r}')
    try:
        return Segment(_text(f"emotion entry {i} text", seg["text"]), _cell(seg["start"]), _cell(seg["end"]),
                       _cell(seg.get("strength", 1.0)))
    except JobError as e:
        raise ValueError(f"emotion entry {i}: {'; '.join(p.message for p in e.problems)}") from None


def _text_schedule(text: str) -> tuple[Segment, ...]:
    segments = []
    for i, part in enumerate(text.split("|"), 1):
        m = _SEGMENT.match(part)
        if not m or not m.group(3).strip('"'):
            raise ValueError(f"emotion: schedule part {i} {part.strip()!r} is not `START-END s: text` "
                             f"(seconds, e.g. `0-1.5 s: calm | 1.5-3 s: angry`)")
        try:  # `4-9 s: terrified @1.6`: the segment's strength
            text, strength = split_strength(m.group(3))
            segments.append(Segment(text.strip('"'), float(m.group(1)), float(m.group(2)), strength))
        except ValueError as e:  # a bad strength, or the schema's range (JobError)
            raise ValueError(f"emotion: schedule part {i} {part.strip()!r}: {e}") from None
    return tuple(segments)


def parse_emotion(value: Any) -> dict[str, Any]:
    """`emotion` -> JobSpec values: a prompt, or a schedule given as a list of {"text", "start", "end"}
    (seconds) or as the text `0-1.5 s: "calm" | 1.5-3 s: angry` (the Emotion Schedule node's preview)."""
    value = _json_cell("emotion", value, "[")
    if isinstance(value, list):
        if not value:
            raise ValueError('emotion: the schedule is empty; give at least one {"text", "start", "end"}')
        return {"schedule": tuple(_schedule_entry(i, seg) for i, seg in enumerate(value, 1))}
    text = _text("emotion", value)
    if not _SEGMENT.match(text.split("|")[0]):
        return {"emotion": text}
    return {"schedule": _text_schedule(text)}


def parse_weights(value: Any) -> dict[str, Any]:
    """{"pose": p, "face": f, "lip": l} or the text `pose=p face=f lip=l` -> JobSpec's *_weight values
    (a weight left out keeps its default)."""
    value = _json_cell("weights", value, "{")
    if isinstance(value, str):
        pairs = [p for p in re.split(r"[\s;,]+", value.strip()) if p]
        if not all(p.count("=") == 1 for p in pairs):
            raise ValueError(f"weights: {value!r} is not `pose=P face=F lip=L` (any of the three)")
        value = dict(p.split("=") for p in pairs)
    if not isinstance(value, dict) or not value or set(value) - set(WEIGHTS):
        raise ValueError(f"weights: {value!r} must name some of {', '.join(WEIGHTS)}, e.g. lip=1.2")
    return {WEIGHTS[k]: _column(WEIGHTS[k], v) for k, v in value.items()}


def _speaker_entry(i: int, entry: Any, base: Path) -> Speaker:
    try:
        if isinstance(entry, str):
            speaker = parse_speaker(entry.strip())
        elif isinstance(entry, dict):
            speaker = Speaker(**{k: _cell(v) if k == "face" else v for k, v in entry.items()})
        else:
            raise ValueError(f'{entry!r} is neither {{"face", "audio", "emotion", "channel"}} nor FACE:AUDIO[:EMOTION]')
    except ValueError as e:  # JobError too
        text = "; ".join(p.message for p in e.problems) if isinstance(e, JobError) else str(e)
        raise ValueError(f"speakers: entry {i}: {text}") from None
    path = speaker.audio.expanduser()
    return speaker.model_copy(update={"audio": path if path.is_absolute() else base / path})


def parse_speakers(value: Any, base: Path) -> tuple[Speaker, ...]:
    """`speakers` -> the conversation's Speakers: a list of {"face", "audio", "emotion", "channel"} (emotion and
    channel optional) or of `FACE:AUDIO[@CHANNEL][:EMOTION]` texts (the --speaker syntax), or such texts joined
    by `|` in one cell. Audio paths resolve against the jobs file's folder."""
    value = _json_cell("speakers", value, "[")
    entries = value if isinstance(value, list) else [e for e in _text("speakers", value).split("|") if e.strip()]
    if not entries:
        raise ValueError('speakers: the list is empty; give one {"face", "audio", "emotion"} per person who speaks')
    return tuple(_speaker_entry(i, entry, base) for i, entry in enumerate(entries, 1))


def _column(name: str, value: Any) -> Any:
    """A column's raw value as the schema's type takes it (text and choice fields keep their text); type
    and range are then checked by the schema."""
    info = fields(JobSpec)[name]
    if kind(info) is str or choices(info) or not isinstance(value, str):
        return value
    if kind(info) is bool and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    return _cell(value)


def parse_values(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Raw fields of one line -> JobSpec keyword values, checked by the schema; ValueError names the field
    and what is wrong."""
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(REQUIRED + OPTIONAL)}")
    missing = [k for k in (CONVERSATION if "speakers" in raw else REQUIRED) if k not in raw]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (each line needs {', '.join(REQUIRED)}; a conversation "
                         f"{', '.join(CONVERSATION)})")
    values: dict[str, Any] = {"audio": None}
    for k in PATHS:
        if k in raw:
            path = Path(_text(k, raw[k])).expanduser()
            values[k] = path if path.is_absolute() else base / path
    if "emotion" in raw:
        values.update(parse_emotion(raw["emotion"]))
    if "speakers" in raw:
        values["speakers"] = parse_speakers(raw["speakers"], base)
    if "weights" in raw:
        values.update(parse_weights(raw["weights"]))
    values.update({k: _column(k, raw[k]) for k in COLUMNS if k in raw and k not in PARSED})
    if "crossfade" in values and "schedule" not in values:
        raise ValueError("crossfade: only applies to an emotion schedule; this line has a single emotion")
    try:
        JobSpec(**values)
    except JobError as e:
        raise ValueError("; ".join(map(str, e.problems))) from None
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
            jobs.append(JobLine(n, error=f'needs a JSON object {{"image": ..., ...}}, got {type(raw).__name__}'))
            continue
        jobs.append(_parse(n, raw, base))
    return jobs


def _read_csv(text: str, base: Path, name: str) -> list[JobLine]:
    reader = csv.reader(text.splitlines(keepends=True))
    header = [h.strip() for h in next(reader, [])]
    if not header:
        raise JobsFileError(f"{name}: empty; its first line names the columns, at least {', '.join(REQUIRED)}")
    unknown = [h for h in header if h not in REQUIRED + OPTIONAL]
    missing = [h for h in (CONVERSATION if "speakers" in header else REQUIRED) if h not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise JobsFileError(f"{name}:1: the header must name the columns {', '.join(REQUIRED)} and may add "
                            f"{', '.join(OPTIONAL)}, each once; got {', '.join(header)}")
    jobs, end = [], reader.line_num
    for row in reader:
        start, end = end + 1, reader.line_num  # a quoted cell may span lines: report where the record starts
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            jobs.append(JobLine(start, error=f"has {len(row)} cells, the header has {len(header)} columns"))
            continue
        jobs.append(_parse(start, {k: v for k, v in zip(header, row, strict=True) if v.strip()}, base))
    return jobs


def read_jobs(path: Path) -> list[JobLine]:
    """Every job of a .jsonl or .csv jobs file, parsed; a bad line carries its error. Relative paths
    resolve against the jobs file's folder."""
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
    """Two lines writing one file would each replace the other's video: the later line is marked bad, as
    is a line whose output is another line's input."""
    first: dict[Path, int] = {}
    inputs = {path.resolve(): j.line for j in jobs if not j.error for path in _input_files(j.values)}
    for job in jobs:
        if job.error:
            continue
        out = job.values["out"]
        if out.resolve() in first:
            job.error = f"out: {out} is also the output of line {first[out.resolve()]}; give each job its own file"
        elif out.resolve() in inputs:
            job.error = f"out: {out} is an input of line {inputs[out.resolve()]}; it would be overwritten"
        else:
            first[out.resolve()] = job.line


def _input_files(values: dict[str, Any]) -> list[Path]:
    return [p for p in (values["image"], values.get("audio")) if p is not None] + [
        s.audio for s in values.get("speakers", ())]


# --- the settings record: what makes a rerun skip a job ---------------------------------------------------

def _model_files(settings: ModelSettings, identity: bool) -> list[Path]:
    """The files a session reads (layout's entries, folders expanded; the checkpoint as Session finds it)."""
    models = Path(settings.models)
    entries = [Path(settings.checkpoint) if settings.checkpoint else default_checkpoint(models)]
    entries += [f.path(models) for f in layout.REQUIRED if f is not layout.NET
                and (identity or f not in layout.IDENTITY)]
    files = {p for e in entries for p in ([e] if e.is_file() else e.rglob("*")) if p.is_file()}
    return sorted(p for p in files if not p.name.startswith("."))


def _quick_digest(path: Path, span: int = 1 << 20) -> str:
    """Size + sha256 of the first and last MiB: tells model files apart without reading gigabytes."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(span))
        f.seek(max(0, size - span))
        h.update(f.read(span))
    return f"{size}:{h.hexdigest()[:32]}"


def models_fingerprint(settings: ModelSettings, identity: bool) -> dict[str, str]:
    models = Path(settings.models)
    return {(p.relative_to(models).as_posix() if p.is_relative_to(models) else str(p)): _quick_digest(p)
            for p in _model_files(settings, identity)}


# ModelSettings fields that do not shape the video (the model files count by content, below).
NOT_RECORDED = ("models", "checkpoint", "device")


def settings_record(job: CheckedJob, settings: ModelSettings, models: dict[str, str]) -> dict:
    """Everything that determines a job's video, as plain JSON values: the input files by content, every
    other JobSpec value, how the models load (ModelSettings but NOT_RECORDED: the precision asked for) and
    the model files."""
    spec = job.spec
    unused = ("emotion",) if spec.schedule else ("schedule", "crossfade")
    if spec.emotion_cfg is None:  # unset (the released guidance) is left out, as in records made before it existed
        unused += ("emotion_cfg",)
    unused += () if spec.speakers else ("speakers",)  # records of jobs from before conversations stay valid
    values = spec.model_dump(mode="json", exclude={*PATHS, "overwrite", *unused})
    audio = {} if spec.speakers else {"audio_sha256": job.audio_sha256}
    if spec.speakers:  # the tracks by content, as the audio
        values["speakers"] = [{**{k: v for k, v in s.items() if k != "audio"}, "audio_sha256": job.speaker_sha256(i)}
                              for i, s in enumerate(values["speakers"])]
    record = {"image_sha256": job.image_sha256, **audio, **values,
              **settings.model_dump(mode="json", exclude=set(NOT_RECORDED)), "models": models}
    return json.loads(json.dumps(record))  # tuples -> lists: compares equal to what is read back


def read_record(out: Path) -> dict | None:
    """The settings recorded in an mp4 made by this command, or None (no file, not an mp4, not ours)."""
    try:
        with av.open(str(out)) as container:
            text = container.metadata.get(RECORD_TAG, "")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError):
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record.get(RECORD_KEY) if isinstance(record, dict) else None


def record_metadata(record: dict) -> dict[str, str]:
    return {RECORD_TAG: json.dumps({RECORD_KEY: record}, separators=(",", ":"))}


# --- the ledger: every job's state, the progress line and the report ------------------------------------

FINAL = ("done", "skipped", "failed", "invalid", "cancelled")


@dataclass
class Entry:
    """One job in the report; `attempts` has one record per run (worker, seconds, status, error)."""

    line: int
    out: str
    status: str = "pending"  # pending, running, then one of FINAL
    seconds: float | None = None
    worker: str | None = None
    error: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    progress: float = 0.0  # fraction of the running attempt (for the ETA; not reported)
    started: float = 0.0


class Ledger:
    """The driver's state: the job entries, the progress line (tqdm: rewritten in place on a terminal,
    in a log every 30 s and on each change of state) and report.json, which is rewritten atomically at
    every change, so even a killed batch leaves an honest report."""

    def __init__(self, entries: list[Entry], report: Path, jobs_file: Path, mode: str, stream: TextIO):
        self.entries, self.report, self.jobs_file, self.mode, self.stream = entries, report, jobs_file, mode, stream
        self.workers = 1
        self.begun = time.monotonic()
        self.bar = tqdm(total=len(entries), file=stream, bar_format="{desc}", miniters=0, leave=False,
                        mininterval=0.25 if stream.isatty() else 30.0)

    def count(self, *status: str) -> int:
        return sum(e.status in status for e in self.entries)

    def start(self, entry: Entry, worker: str) -> None:
        entry.status, entry.worker, entry.started, entry.progress = "running", worker, time.monotonic(), 0.0
        self.write_report()
        self.draw(force=True)

    def finish(self, entry: Entry, status: str, error: str | None = None, retry: bool = False) -> None:
        """Close the running attempt; with `retry` the job runs again (its worker died)."""
        seconds = round(time.monotonic() - entry.started, 3)
        entry.attempts.append({"worker": entry.worker, "seconds": seconds, "status": status, "error": error})
        entry.status, entry.seconds, entry.error = ("running" if retry else status), seconds, error
        if retry:
            entry.started = time.monotonic()
            self.say(f"line {entry.line}: {error}; trying it again")
        else:
            where = f" ({seconds:.1f} s, {entry.worker})" if status == "done" else ""
            self.say(f"line {entry.line}: {status} {entry.out}{where}" + (f": {error}" if error else ""))
        self.write_report()
        self.draw(force=True)

    def eta(self) -> float:
        """Seconds left: the mean job time (finished jobs, else running jobs extrapolated from their
        progress) times the work left, shared by the workers."""
        now = time.monotonic()
        running = [e for e in self.entries if e.status == "running"]
        took = [e.seconds for e in self.entries if e.status == "done" and e.seconds]
        took = took or [(now - e.started) / e.progress for e in running if e.progress > 0.02]
        if not took:
            return math.inf
        mean = sum(took) / len(took)
        work = self.count("pending") * mean + sum(mean * (1 - e.progress) for e in running)
        return work / max(1, self.workers)

    def line(self) -> str:
        return (f"batch: {self.count('done', 'skipped')}/{len(self.entries)} done, "
                f"{self.count('failed', 'invalid', 'cancelled')} failed, {self.count('pending', 'running')} left "
                f"({self.count('running')} running), ETA {format_eta(self.eta())}")

    def draw(self, force: bool = False) -> None:
        """The progress line, now (`force`) or when tqdm's interval has passed."""
        self.bar.set_description_str(self.line(), refresh=False)
        if force:
            self.bar.refresh()
        else:
            self.bar.update(0)

    def say(self, text: str) -> None:
        """A line that stays (a job finished, a bad line), printed above the progress line."""
        self.bar.write(text, file=self.stream)

    def close(self) -> None:
        self.bar.close()

    def write_report(self) -> None:
        report = {"jobs_file": str(self.jobs_file), "mode": self.mode,
                  "seconds": round(time.monotonic() - self.begun, 3),
                  "summary": {s: self.count(s) for s in (*FINAL, "pending", "running")},
                  "jobs": [{k: v for k, v in vars(e).items() if k not in ("progress", "started")}
                           for e in self.entries]}
        write_bytes(self.report, (json.dumps(report, indent=1) + "\n").encode(), overwrite=True)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--"
    return tqdm.format_interval(round(seconds))


# --- workers: the same runner in this process and inside each Ray actor -----------------------------------

@dataclass
class Task:
    index: int  # the job's ledger entry
    job: CheckedJob
    record: dict[str, Any]  # written into the mp4 (settings_record)


def describe_error(e: BaseException) -> str:
    """One line for the report: input errors as they are, anything else with its type."""
    if isinstance(e, JobError):
        return "; ".join(map(str, e.problems))
    text = str(e).strip() or repr(e)
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text.splitlines()[0]}"


class Worker:
    """One model session and one job at a time. `stop` (an Event) cancels the running job between two
    denoising steps; its mp4 is then not written."""

    def __init__(self, name: str, settings: ModelSettings, identity: bool, inputs: Inputs | None = None):
        self.name = name
        self.session = Session(settings, inputs=inputs)
        self.session.load(identity=identity)
        self.stop = threading.Event()
        self.progress = 0.0

    def run(self, task: Task, on_progress: Callable[[float], None] | None = None) -> dict[str, Any]:
        """{"index", "worker", "status", "error"}; a job's failure is a result, never an exception."""
        def progress(p: Progress) -> None:
            if p.stage == "sample" and p.total:
                self.progress = p.done / p.total
                if on_progress:
                    on_progress(self.progress)

        self.progress = 0.0
        result = {"index": task.index, "worker": self.name, "status": "done", "error": None}
        job = replace(task.job, inputs=self.session.inputs)  # this process's decodings
        try:
            run_job(self.session, job, on_progress=progress, should_stop=self.stop.is_set,
                    metadata=record_metadata(task.record))
        except GenerationCancelled:
            result.update(status="cancelled", error="cancelled by Ctrl-C")
        except Exception as e:  # one job's failure (bad input, out of memory, ...) never stops the batch
            result.update(status="failed", error=describe_error(e))
        return result


def worker_name(prefix: str) -> str:
    return f"{prefix}@{socket.gethostname()}:{os.getpid()}"


def run_embedded(ledger: Ledger, tasks: list[Task], settings: ModelSettings, identity: bool,
                 stop: threading.Event, inputs: Inputs) -> None:
    """The jobs one after another in this process, with the models loaded once and the inputs decoded
    by the checks."""
    ledger.say(f"loading the models from {settings.models} ...")
    try:
        worker = Worker(worker_name("local"), settings, identity, inputs)
    except Exception as e:  # models that do not load fail every job, with the reason
        for task in tasks:
            entry = ledger.entries[task.index]
            entry.status, entry.error = "failed", f"the models did not load: {describe_error(e)}"
        ledger.say(f"error: the models did not load: {describe_error(e)}")
        ledger.write_report()
        return
    worker.stop = stop
    try:
        for task in tasks:
            if stop.is_set():
                break
            entry = ledger.entries[task.index]

            def progress(fraction: float, entry: Entry = entry) -> None:
                entry.progress = fraction
                ledger.draw()

            ledger.start(entry, worker.name)
            result = worker.run(task, on_progress=progress)
            ledger.finish(entry, result["status"], result["error"])
    finally:
        worker.session.close()


# --- the command ---------------------------------------------------------------------------------------

def _count(text: str) -> int:
    """argparse type: a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def add_parser(sub, formatter: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    """The `batch` subcommand of `python -m emocast_lib` (cli.py adds the ModelSettings options)."""
    p = sub.add_parser(
        "batch", formatter_class=formatter,
        help="many videos from a JSONL or CSV jobs file, in this process or on Ray",
        description="One video per line of JOBS (.jsonl: a JSON object per line; .csv: a header row). Fields: "
                    f"{', '.join(REQUIRED)} (required), {', '.join(OPTIONAL)} (optional; defaults as in "
                    "`generate`). Relative paths resolve against the jobs file. Every job is checked before "
                    "any model loads. Jobs whose mp4 exists with the same settings are skipped.")
    p.add_argument("jobs", type=Path, help="the jobs file (.jsonl or .csv)")
    p.add_argument("--report", type=Path, default=None, help="report file (default: JOBS with .report.json)")
    p.add_argument("--strict", action="store_true", help="run nothing if any line is bad")
    p.add_argument("--redo", action="store_true",
                   help="run every job again, replacing existing outputs (also files this command did not make)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray: alone, a new local runtime; with an address (host:6379, auto, ray://...), "
                        "that cluster (needs requirements-ray.txt); with --ray the device is auto or cpu")
    p.add_argument("--workers", type=_count, default=None,
                   help="Ray workers (default: one per GPU, else the CPUs divided by --threads)")
    p.add_argument("--threads", type=_count, default=None,
                   help="CPU threads per job (this process: torch's threads; Ray: the CPUs of each CPU worker, "
                        "default: 4 or the CPUs of the largest node, whichever is fewer)")
    p.add_argument("--dashboard", action="store_true",
                   help="with a local Ray runtime, start Ray's dashboard (http://127.0.0.1:8265, needs ray[default])")
    return p


def _validate(lines: list[JobLine], settings: ModelSettings, redo: bool,
              inputs: Inputs) -> list[tuple[int, CheckedJob]]:
    """(index, CheckedJob) of the good lines; bad lines get their error. An existing output is replaced
    only when this command made it (with other settings), or with --redo."""
    checked = []
    for i, line in enumerate(lines):
        if line.error:
            continue
        out: Path = line.values["out"]
        if out.is_file() and not redo and read_record(out) is None:
            line.error = (f"out: {out} exists and was not made by this command; move it away, or pass --redo to "
                          "replace it")
            continue
        try:
            checked.append((i, check_job(JobSpec(**line.values, overwrite=out.exists()), settings.models, inputs)))
        except JobError as e:
            line.error = "; ".join(map(str, e.problems))
    return checked


@dataclass
class _Plan:
    """What main has read and checked, before anything runs."""

    lines: list[JobLine]
    settings: ModelSettings
    identity: bool
    inputs: Inputs
    checked: list[tuple[int, CheckedJob]]


def _read_and_check(args: argparse.Namespace, fail: Callable[[str], int], stream: TextIO) -> _Plan | int:
    if args.ray is not None:
        try:
            import_ray()
        except ImportError as e:
            return fail(str(e))
    try:
        lines = read_jobs(args.jobs)
        given = {name: getattr(args, name) for name in fields(ModelSettings)}  # cli.py added them from the schema
        settings = ModelSettings(**{**given, "device": "auto" if args.ray is not None and args.device != "cpu"
                                    else args.device})
    except (JobsFileError, JobError) as e:
        return fail(str(e))
    check_outputs_distinct(lines)
    identity = not all(j.values.get("no_identity", False) for j in lines if not j.error)
    problems = check_models(settings, identity=identity)
    if problems:
        return fail("\n".join(map(str, problems)))
    inputs = Inputs(settings.models)
    checked = _validate(lines, settings, args.redo, inputs)
    for line in lines:
        if line.error:
            print(f"{args.jobs}:{line.line}: {line.error}", file=stream)
    if args.strict and any(j.error for j in lines):
        inputs.close()
        return fail(f"--strict: {sum(bool(j.error) for j in lines)} bad line(s), nothing was run")
    return _Plan(lines, settings, identity, inputs, checked)


def main(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    """Run the batch; exit code 0 (every job done or skipped), 1 (a job failed or a line was bad),
    2 (the jobs file or the models cannot be used, --strict and a bad line, or Ray cannot run the
    workers), 130 (Ctrl-C)."""
    stream = stream or sys.stderr

    def fail(text: str) -> int:
        print(f"error: {text}", file=stream)
        return 2

    plan = _read_and_check(args, fail, stream)
    if isinstance(plan, int):
        return plan
    models = models_fingerprint(plan.settings, plan.identity)
    entries = [Entry(j.line, str(j.values.get("out", "")), status="invalid" if j.error else "pending",
                     error=j.error or None) for j in plan.lines]
    tasks = []
    for i, job in plan.checked:
        record = settings_record(job, plan.settings, models)
        if not args.redo and job.spec.overwrite and read_record(job.spec.out) == record:
            entries[i].status = "skipped"
        else:
            tasks.append(Task(i, job, record))
    report = args.report or args.jobs.with_suffix(".report.json")
    ledger = Ledger(entries, report, args.jobs, "ray" if args.ray is not None else "embedded", stream)
    try:
        return _run(args, ledger, tasks, plan, fail)
    finally:
        ledger.close()
        plan.inputs.close()


def _run(args: argparse.Namespace, ledger: Ledger, tasks: list[Task], plan: _Plan, fail: Callable[[str], int]) -> int:
    from .ray_pool import RayStartError, run_ray  # Ray is optional and heavy: imported for --ray only

    if skipped := ledger.count("skipped"):
        ledger.say(f"{skipped} job(s) already done with the same settings (--redo runs them again)")
    ledger.write_report()
    stop, reason = threading.Event(), "cancelled by Ctrl-C"
    try:
        with _ctrl_c_stops(stop, ledger):
            if tasks and args.ray is not None:
                run_ray(ledger, tasks, plan.settings, plan.identity, stop, args.ray or None, args.workers,
                        args.threads, args.dashboard)
            elif tasks:
                if args.threads:
                    torch.set_num_threads(args.threads)
                run_embedded(ledger, tasks, plan.settings, plan.identity, stop, plan.inputs)
    except RayStartError as e:
        reason = str(e)
        return fail(reason)
    except BaseException as e:
        reason = "cancelled by Ctrl-C" if isinstance(e, KeyboardInterrupt) else f"not run: {describe_error(e)}"
        raise
    finally:
        for entry in ledger.entries:
            if entry.status in ("pending", "running"):
                entry.status, entry.error = "cancelled", reason
        ledger.write_report()
    ledger.say(f"batch: {ledger.count('done')} done, {ledger.count('skipped')} skipped (already done), "
               f"{ledger.count('failed', 'invalid')} failed, {ledger.count('cancelled')} cancelled, in "
               f"{time.monotonic() - ledger.begun:.0f} s; report: {ledger.report}")
    if stop.is_set():
        return 130
    return 1 if ledger.count("failed", "invalid", "cancelled") else 0


RAY_INSTALL = 'Ray is not installed: pip install -r requirements-ray.txt (or pip install ".[ray]")'


def import_ray():
    """Ray, or ImportError with the line that says how to install it."""
    try:
        import ray  # optional (requirements-ray.txt)
    except ImportError:
        raise ImportError(RAY_INSTALL) from None
    return ray


@contextmanager
def _ctrl_c_stops(stop: threading.Event, ledger: Ledger) -> Iterator[None]:
    """While inside: the first Ctrl-C stops taking jobs and cancels the running ones at their next step
    (their mp4 is not written); a second Ctrl-C interrupts at once."""
    def handler(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        ledger.say("stopping: running jobs end at their next step, no half files are left (Ctrl-C again: at once)")

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
