"""The command line, parsed here and only here: `python -m emocast_lib {generate,make-tiny-models,convert,batch}`.

Each command turns its arguments into typed values (job.JobSpec, job.ModelSettings, paths) and calls the
library; the option defaults are JobSpec's. The first line is printed before anything heavy is imported;
the models load only after the cheap checks. Exit codes: 0 done, 2 bad input (one line per problem, no
traceback), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows" / "inputs"
FIRST_LINE = {"generate": "EmoCAST generate: checking the inputs (no model loads before they pass) ...",
              "make-tiny-models": "make-tiny-models: writing tiny TEST models ...",
              "batch": "EmoCAST batch: checking every job (no model loads before they pass) ..."}
OPTION = {"image": "--image", "audio": "--audio", "out": "--out", "emotion": "--emotion", "schedule": "--segment",
          "crossfade": "--crossfade", "seed": "--seed", "steps": "--steps", "cfg": "--cfg",
          "pose_weight": "--pose-weight", "face_weight": "--face-weight", "lip_weight": "--lip-weight",
          "fps": "--fps", "clip_length": "--clip-length", "expand_ratio": "--expand-ratio", "crop": "--crop",
          "crop_scale": "--crop-scale", "vocal_separation": "--vocal-separation", "models": "--models",
          "checkpoint": "--checkpoint", "device": "--device", "precision": "--precision"}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in --help, except for switches and options whose help explains their default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, []) or "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the option, like every other input error."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _number(kind):
    """argparse type: int or float (nan and inf pass here and are named by the job's range checks)."""
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    parse.__name__ = kind.__name__
    return parse


def _segment(text: str):
    """START:END:TEXT -> job.Segment."""
    from .job import Segment

    parts = text.split(":", 2)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:END:TEXT (seconds, e.g. 0:1.5:A happy portrait.)")
    try:
        start, end = float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: START and END must be seconds, e.g. 0:1.5:A happy portrait.") from None
    return Segment(parts[2], start, end)


def build_parser() -> argparse.ArgumentParser:
    from dataclasses import fields

    from .audio import MAX_SECONDS
    from .config import SCHEDULERS, SamplingConfig
    from .job import CROP_MODES, MAX_PROMPT_TOKENS, PASTE_MAX_SIDE, JobSpec

    default = {f.name: f.default for f in fields(JobSpec)}
    parser = _Parser(prog="python -m emocast_lib", description="EmoCAST talking portraits.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", formatter_class=_Help,
                       help="photo + speech + emotion text -> talking-portrait mp4 with the sound",
                       description="Photo + speech + emotion text -> talking-portrait mp4 with the input's sound. "
                                   "Every input is checked before any model loads.")

    def number(option: str, kind: type, text: str) -> None:  # a JobSpec number, with its default
        g.add_argument(option, type=_number(kind), default=default[option[2:].replace("-", "_")], help=text)

    g.add_argument("--image", type=Path, default=EXAMPLES / "emocast_portrait.png",
                   help="photo with one face: any size (non-square photos are cropped around the face), any "
                        "format PIL reads; EXIF orientation applied")
    g.add_argument("--audio", type=Path, default=EXAMPLES / "emocast_speech.wav",
                   help="speech: any file FFmpeg decodes (wav, flac, mp3, m4a, ogg/opus, a video's sound), "
                        f"up to {MAX_SECONDS / 60:g} minutes")
    g.add_argument("--emotion", default=default["emotion"],
                   help=f"free-text emotion prompt (CLIP, at most {MAX_PROMPT_TOKENS} tokens)")
    g.add_argument("--segment", type=_segment, action="append", default=[], metavar="START:END:TEXT",
                   help="an emotion over a time range in seconds, repeatable; replaces --emotion (the last "
                        "segment holds to the end)")
    number("--crossfade", float, "seconds of each crossfade between segments")
    g.add_argument("--truncate-prompt", action="store_true",
                   help=f"drop the last words of a prompt over {MAX_PROMPT_TOKENS} tokens instead of stopping")
    g.add_argument("--models", type=Path, default=Path("models"), help="ComfyUI-style models folder (see README)")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="EmoCAST network, .pth or converted .safetensors (default: MODELS/emocast/net.pth, "
                        "else the only .safetensors there)")
    g.add_argument("--out", type=Path, default=Path("out.mp4"), help="output mp4 (H.264 + AAC)")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.add_argument("--steps", type=_number(int), default=None,
                   help="denoising steps per clip (default: what the checkpoint declares, else "
                        f"{SamplingConfig.steps})")
    number("--cfg", float, "guidance scale")
    number("--seed", int, "seed of the initial noise (0 .. 2^64-1)")
    number("--fps", int, "frames per second")
    number("--clip-length", int, "frames generated per clip")
    number("--pose-weight", float, "audio strength on head pose")
    number("--face-weight", float, "audio strength on expression")
    number("--lip-weight", float, "audio strength on lip motion")
    number("--expand-ratio", float, "face box expansion for the masks")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=default["scheduler"],
                   help="experimental speed lever: the sampler; ddim is the released one, dpmpp_2m and uni_pc aim at "
                        "its result in fewer --steps (judge the output yourself)")
    number("--cfg-end", float, "experimental speed lever: guidance for this fraction of the steps only, the rest "
                               "runs half the batch (1 = released)")
    number("--cache-interval", int, "experimental speed lever: a full network pass every N steps, DeepCache reuse "
                                    "of its deep features in between (1 = released)")
    g.add_argument("--crop", choices=CROP_MODES, default=default["crop"],
                   help="auto: a square crop around the face when the photo is not square; face: always crop; "
                        "none: use the photo whole (it must be square)")
    number("--crop-scale", float, "crop side relative to the face size")
    g.add_argument("--paste-back", action="store_true",
                   help="return the video at the photo's framing (the animated crop pasted into the photo, "
                        f"at most {PASTE_MAX_SIDE} px)")
    g.add_argument("--no-identity", action="store_true",
                   help="skip face recognition and use the zero identity (the original code's no-face fallback)")
    g.add_argument("--vocal-separation", action="store_true", help="separate the voice first (needs audio-separator)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on a GPU, fp32 on the CPU")

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
    c.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="precision of floating tensors (fp32 keeps every bit)")
    c.add_argument("--no-check", action="store_true",
                   help="skip the strict key/shape check against the released network (for other sizes)")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")

    from .batch import add_parser as add_batch_parser

    add_batch_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FIRST_LINE and not {"-h", "--help"} & set(argv):
        print(FIRST_LINE[argv[0]], flush=True)  # before torch is imported (for the defaults)
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


def _problem_line(problem) -> str:
    return f"{OPTION.get(problem.field, problem.field)}: {problem.message}"


def _quiet_libraries() -> None:
    """Keep the libraries' own chatter (MediaPipe's C++ logs, TFLite notes, weight-loading bars) out of
    the progress lines; real errors still arrive as exceptions."""
    import os
    import warnings

    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)


def batch(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .batch import main as run_batch

    return run_batch(args)


def generate(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .job import JobError, JobSpec, ModelSettings, Session, check_job, check_models, run_job

    spec = JobSpec(image=args.image, audio=args.audio, out=args.out, emotion=args.emotion,
                   schedule=tuple(args.segment), crossfade=args.crossfade, seed=args.seed, steps=args.steps,
                   cfg=args.cfg, pose_weight=args.pose_weight, face_weight=args.face_weight,
                   lip_weight=args.lip_weight, fps=args.fps, clip_length=args.clip_length,
                   expand_ratio=args.expand_ratio, crop=args.crop, crop_scale=args.crop_scale,
                   paste_back=args.paste_back, no_identity=args.no_identity, truncate_prompt=args.truncate_prompt,
                   vocal_separation=args.vocal_separation, overwrite=args.overwrite, scheduler=args.scheduler,
                   cfg_end=args.cfg_end, cache_interval=args.cache_interval)
    settings = ModelSettings(models=args.models, checkpoint=args.checkpoint, device=args.device,
                             precision=args.precision)
    problems = check_models(settings, identity=not spec.no_identity) + check_job(spec, settings.models)
    if problems:
        return _fail([_problem_line(p) for p in problems])
    started = time.perf_counter()
    printer = _ProgressPrinter(started)
    try:
        with Session(settings) as session:
            out = run_job(session, spec, on_progress=printer)
    except JobError as e:
        printer.end_line()
        return _fail([_problem_line(p) for p in e.problems])
    except (OSError, ValueError) as e:  # the environment during the run: a full disk, a vanished input...
        printer.end_line()
        return _fail([f"{type(e).__name__}: {e}"])
    printer.end_line()
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return 0


class _ProgressPrinter:
    """Progress lines: what loads, then clip/step with an ETA (rewritten in place on a terminal)."""

    def __init__(self, started: float):
        self.started, self.tty, self.open_line = started, sys.stdout.isatty(), False

    def __call__(self, p) -> None:
        at = f"[{time.perf_counter() - self.started:5.1f} s]"
        if p.stage != "sample":
            self.end_line()
            if p.stage != "done":
                print(f"{at} {p.text}", flush=True)
            return
        line = f"{at} {p.text}" + (f", about {p.eta_s:.0f} s left" if p.eta_s is not None else "")
        if self.tty:
            print(f"\r{line}\033[K", end="", flush=True)
            self.open_line = True
        elif p.done == p.total or p.done % max(1, p.total // p.clips) == 0:  # a log: one line per clip
            print(line, flush=True)

    def end_line(self) -> None:
        if self.open_line:
            print(flush=True)
            self.open_line = False


def make_tiny(args: argparse.Namespace) -> int:
    from .bench.tiny import TinyModelsError, make_tiny_models

    try:
        for path in make_tiny_models(args.dir, force=args.force):
            print(f"wrote {path}")
    except TinyModelsError as e:
        return _fail([str(e)])
    print("These are tiny TEST models: the pipeline runs end to end but produces noise.")
    return 0


def convert(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, checkpoint_config, convert_file, net_shapes, read_metadata

    try:
        expected = None if args.no_check else net_shapes(checkpoint_config(args.src, read_metadata(args.src)))
        convert_file(args.src, args.dst, args.dtype, expected=expected, overwrite=args.overwrite)
    except CheckpointError as e:
        return _fail([str(e)])
    print(f"wrote {args.dst} ({args.dtype})")
    return 0
