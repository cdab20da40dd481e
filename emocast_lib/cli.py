"""The command line: `python -m emocast_lib {generate,make-tiny-models,convert,batch}`.

`generate`'s options and `batch`'s model options are made from the job schema (jobs/schema.py): one
option per JobSpec / ModelSettings field, with its help, default and choices; only the file defaults
(the shipped example inputs) are this module's. Each command turns its arguments into typed values and
calls the library; the models load only after the cheap checks. Exit codes: 0 done, 2 bad input (one line
per problem, no traceback), 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from tqdm import tqdm

from . import batch as batch_lib
from .checkpoint import CONVERT_DTYPES, CheckpointError, checkpoint_config, convert_file, net_shapes, read_metadata
from .emotion import split_strength
from .jobs import JobError, JobSpec, ModelSettings, Progress, Segment, Session, check_job, check_models, run_job
from .jobs.checks import Inputs
from .jobs.schema import choices, extra, fields, kind, option, parse_speaker

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows" / "inputs"
# The defaults of JobSpec's required files on the command line: the shipped example.
FILE_DEFAULTS = {"image": EXAMPLES / "emocast_portrait.png", "audio": EXAMPLES / "emocast_speech.wav",
                 "out": Path("out.mp4")}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in --help, except for switches and options whose help explains their default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], ()) or "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the option, like every other input error."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _number(kind):
    """argparse type: int or float (nan and inf pass here and are named by the schema's range checks)."""
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    parse.__name__ = kind.__name__
    return parse


def _segment(text: str) -> Segment:
    """START:END:TEXT -> Segment; TEXT may end in @STRENGTH (0:1.5:A frightened portrait. @1.6)."""
    parts = text.split(":", 2)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:END:TEXT (seconds, e.g. 0:1.5:A happy portrait.)")
    try:
        prompt, strength = split_strength(parts[2])
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    try:
        return Segment(prompt, float(parts[0]), float(parts[1]), strength)
    except ValueError:  # float() or the schema's range (JobError)
        raise argparse.ArgumentTypeError(
            f"{text!r}: START and END must be seconds from 0, e.g. 0:1.5:A happy portrait.") from None


def _speaker(text: str):
    """FACE:AUDIO[@CHANNEL][:EMOTION] -> Speaker."""
    try:
        return parse_speaker(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Given(argparse.Action):
    """Stores the value and notes that it was given (--speaker refuses a given --audio, not its default)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def _argument(name: str, info: FieldInfo) -> dict[str, Any]:
    """add_argument's keywords for one schema field."""
    value = kind(info)
    default = FILE_DEFAULTS.get(name, info.default)
    if value is bool:
        return {"action": "store_true"}
    if value in (int, float):
        return {"type": _number(value), "default": default}
    if options := choices(info):
        return {"choices": options, "default": default}
    if name == "schedule":
        return {"type": _segment, "action": "append", "default": [], "metavar": "START:END:TEXT"}
    if name == "speakers":
        return {"type": _speaker, "action": "append", "default": [], "metavar": "FACE:AUDIO[:EMOTION]"}
    given = {"action": _Given} if name == "audio" else {}
    return {"type": Path if value is Path else str, "default": default, **given}


def add_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One option per field of a schema model (JobSpec or ModelSettings) that is on the command line."""
    for name, info in fields(model).items():
        if extra(info, "cli"):
            parser.add_argument(option(name), dest=name, help=info.description, **_argument(name, info))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m emocast_lib", description="EmoCAST talking portraits.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", formatter_class=_Help,
                       help="photo + speech + emotion text -> talking-portrait mp4 with the sound",
                       description="Photo + speech + emotion text -> talking-portrait mp4 with the input's sound. "
                                   "Every input is checked before any model loads.")
    add_options(g, JobSpec)
    add_options(g, ModelSettings)

    t = sub.add_parser("make-tiny-models", formatter_class=_Help,
                       help="write tiny TEST models (not EmoCAST; their output is noise)",
                       description="Write a complete models tree of tiny TEST models (not EmoCAST: their video "
                                   "is noise) to try the pipeline without the real weights. Refuses a folder "
                                   "that holds any file it would write.")
    t.add_argument("dir", type=Path, help="an empty or new folder, e.g. models-tiny")
    t.add_argument("--force", action="store_true",
                   help="replace an earlier tiny tree there (files that are not tiny test models are never replaced)")

    c = sub.add_parser("convert", formatter_class=_Help, help="net.pth -> .safetensors",
                       description="Convert an EmoCAST net.pth (or .safetensors) to a .safetensors file, read "
                                   "without running any code from it.")
    c.add_argument("src", type=Path, help="net.pth / .pt / .ckpt / .bin / .safetensors to read")
    c.add_argument("dst", type=Path, help="output .safetensors (written only once complete)")
    c.add_argument("--dtype", choices=CONVERT_DTYPES, default="fp16",
                   help="precision of floating tensors (fp32 keeps every bit); fp8_e4m3fn / fp8_e5m2: the linear "
                        "and convolution weights as 8-bit floats, the rest fp32 (a quarter of fp32's size)")
    c.add_argument("--no-check", action="store_true",
                   help="skip the strict key/shape check against the released network (for other sizes)")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")

    add_options(batch_lib.add_parser(sub, _Help), ModelSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has printed
        return int(e.code or 0)
    try:
        commands = {"generate": generate, "make-tiny-models": make_tiny, "convert": convert, "batch": batch}
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written under the output name", file=sys.stderr)
        return 130


def _fail(lines: list[str]) -> int:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return 2


def _problem_lines(problems) -> list[str]:
    return [f"{option(p.field)}: {p.message}" for p in problems]


def _quiet_libraries() -> None:
    """Keep the libraries' own chatter (MediaPipe's C++ logs, TFLite notes, weight-loading bars) out of
    the progress lines; real errors still arrive as exceptions."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)


def batch(args: argparse.Namespace) -> int:
    _quiet_libraries()
    return batch_lib.main(args)


def _values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    values = {name: getattr(args, name) for name, info in fields(model).items() if extra(info, "cli")}
    if "schedule" in values:
        values["schedule"] = tuple(values["schedule"])
    if "speakers" in values:
        values["speakers"] = tuple(values["speakers"])
        if values["speakers"] and not getattr(args, "audio_given", False):
            values["audio"] = None  # a conversation's tracks come with its speakers, not the default --audio
    return values


def generate(args: argparse.Namespace) -> int:
    _quiet_libraries()
    try:
        spec, settings = JobSpec(**_values(args, JobSpec)), ModelSettings(**_values(args, ModelSettings))
    except JobError as e:
        return _fail(_problem_lines(e.problems))
    inputs = Inputs(settings.models)
    problems = check_models(settings, identity=not spec.no_identity)
    try:
        job = check_job(spec, settings.models, inputs)
    except JobError as e:
        problems += e.problems
    if problems:
        inputs.close()
        return _fail(_problem_lines(problems))
    started = time.perf_counter()
    with Session(settings, inputs=inputs) as session, _ProgressPrinter(started) as printer:
        try:
            out = run_job(session, job, on_progress=printer)
        except JobError as e:
            printer.close()
            return _fail(_problem_lines(e.problems))
        except (OSError, ValueError) as e:  # the environment during the run: a full disk, a vanished input...
            printer.close()
            return _fail([f"{type(e).__name__}: {e}"])
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return 0


class _ProgressPrinter:
    """Progress lines: what loads and prepares, each on a line of its own, then the denoising steps of
    the whole video as one tqdm line, rewritten in place on a terminal (in a log: every 30 s and at the
    end), with the job's own estimate of the sampling time left."""

    def __init__(self, started: float):
        self.started, self.bar = started, None

    def __enter__(self) -> "_ProgressPrinter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, p: Progress) -> None:
        if p.stage == "sample":
            if self.bar is None:
                self.bar = tqdm(total=p.total, file=sys.stdout, bar_format="[{elapsed_s:5.1f} s] {desc}", delay=1e-3,
                                mininterval=0.25 if sys.stdout.isatty() else 30.0, miniters=0)
                self.bar.start_t = time.time() - (time.perf_counter() - self.started)  # tqdm's clock: the job's start
            left = f", about {p.eta_s:.0f} s left" if p.eta_s is not None else ""
            self.bar.set_description_str(p.text + left, refresh=False)
            self.bar.update(p.done - self.bar.n)
        elif p.stage != "done":
            self.close()
            print(f"[{time.perf_counter() - self.started:5.1f} s] {p.text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def make_tiny(args: argparse.Namespace) -> int:
    # Developer tooling, in a git clone only (not in the registry archive): the rest of the CLI runs without it.
    from .bench.tiny import TinyModelsError, make_tiny_models

    try:
        for path in make_tiny_models(args.dir, force=args.force):
            print(f"wrote {path}")
    except TinyModelsError as e:
        return _fail([str(e)])
    print("These are tiny TEST models: the pipeline runs end to end but produces noise.")
    return 0


def convert(args: argparse.Namespace) -> int:
    try:
        expected = None if args.no_check else net_shapes(checkpoint_config(args.src, read_metadata(args.src)))
        convert_file(args.src, args.dst, args.dtype, expected=expected, overwrite=args.overwrite)
    except CheckpointError as e:
        return _fail([str(e)])
    print(f"wrote {args.dst} ({args.dtype})")
    return 0
