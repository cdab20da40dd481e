"""Jobs: one talking-portrait mp4 from a photo, a speech file and an emotion, for the CLI and batch runners.

The API a runner builds on (the CLI is one such runner, `python -m emocast_lib generate`):

    settings = ModelSettings(models=Path("models"))      # where the models are, device, precision
    problems = check_models(settings)                     # cheap, no model loaded
    with Session(settings, on_progress=print) as session:  # loads each model once, on first use
        for spec in specs:                                 # JobSpec: files + user values (checked on construction)
            job = session.check(spec)                      # CheckedJob, or JobError listing every problem
            path = run_job(session, job, on_progress, should_stop)

The package, in the order a job passes through it:

* schema.py: `JobSpec` and `ModelSettings`, pydantic models declaring every user value with its type,
  range, default and help. Constructing one checks the values (JobError, one `Problem` per bad value).
  The CLI options, the batch file's columns and the node widgets' ranges and defaults are read from here.
* checks.py: `check_models` and `check_job` open no network weights: files exist and decode (photo, audio
  container and samples, safetensors headers, zip directories), the photo has a face (MediaPipe's
  landmarker, ~50 ms: counted as cheap, because a run that would stop at "no face" must stop before the
  40 s model load), the prompts are text CLIP can take, the device exists, the output can be written.
  `check_job` returns a `CheckedJob`: the spec, the face's landmarks, and the run's `Inputs`, which hold
  each decoded photo and sound once for every job naming the same file.
* session.py: `Session` loads each model once on first use and caches work keyed by input content:
  portrait analyses (photo sha256 + crop/identity settings), prompt encodings (text), audio features
  (audio sha256 + fps/clip length).
* run.py: `run_job` takes the CheckedJob (a JobSpec is checked first) and writes the mp4 atomically: a
  hidden temporary file in the output folder, renamed when complete. SIGKILL leaves at most that hidden
  `.NAME.PID.partial` file, which the next write of the same output removes; never a half file under the
  final name. Failures raise `JobError` (its `problems` name the input and the fix),
  `GenerationCancelled` when `should_stop()` said so, or propagate KeyboardInterrupt; in every case the
  output is left as it was.

How to add a job field
----------------------
1. Declare it once in `JobSpec` (schema.py) with `setting(default, ge=..., le=..., help=...)` and a type
   (int, float, bool, str, a `Literal[...]` of choices, a path, `X | None` for "unset", or a tuple of a
   small `_Values` model). That alone makes it a checked value of every JobSpec, a `generate` option
   (`--the-name`, with its help, default and choices; error lines name it so), a column of the batch file
   (coerced and range-checked with the same error lines) and part of the batch's settings record (a
   changed value makes a rerun redo the job). `cli=False` / `batch=False` keep it off one of them;
   `cli="--other"` names its option.
2. Use it: in `run._prepare` (the sampler's settings) or in `Session.portrait` / `Session.features` (then
   add it to that cache's key: the key holds everything that shapes the cached result).
3. Where a node has a widget for it, build the widget with `**widget("the_name")` (range and default) and
   add the pair to tests/test_schema.py's WIDGETS.
A model setting (how the models load, e.g. a weight dtype) is declared the same way in `ModelSettings`: it
becomes an option of `generate` and `batch` and part of the settings record, and is read in
`Session.__init__` / the model properties. A field holding several entries (e.g. one speaker per face) is
a tuple of a small `_Values` model declared beside `Segment`, as `schedule` holds `Segment`s; its option and
column need a parser of their own, like `--segment` (cli._argument) and `parse_emotion` (batch.py).
"""
import importlib

from .schema import (
    MAX_PROMPT_TOKENS,
    PASTE_MAX_SIDE,
    JobError,
    JobSpec,
    ModelSettings,
    OnProgress,
    Problem,
    Progress,
    Segment,
    Speaker,
    limits,
    option,
    sampling_config,
    value_problems,
    widget,
)

# The runner's names and their modules. They load on first use (PEP 562), so that importing the schema,
# as the nodes do, does not import the runner (checks, session, run and their libraries).
_RUNNER = {"CheckedJob": "checks", "Inputs": "checks", "check_job": "checks", "check_models": "checks",
           "count_tokens": "checks", "default_checkpoint": "checks", "prompt_problem": "checks",
           "PreparedPortrait": "session", "Session": "session", "run_job": "run"}


def __getattr__(name: str):
    if name in _RUNNER:
        return getattr(importlib.import_module(f"{__name__}.{_RUNNER[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MAX_PROMPT_TOKENS", "PASTE_MAX_SIDE", "CheckedJob", "Inputs", "JobError", "JobSpec", "ModelSettings",
           "OnProgress", "PreparedPortrait", "Problem", "Progress", "Segment", "Session", "Speaker", "check_job",
           "check_models", "count_tokens", "default_checkpoint", "limits", "option", "prompt_problem", "run_job",
           "sampling_config", "value_problems", "widget"]
