"""Command line: `python -m emocast_lib {generate,make-tiny-models,convert} ...`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows" / "inputs"
DEFAULT_EMOTION = "The portrait is watching a horror movie with jump scares."


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="portrait + speech + emotion text -> talking-portrait mp4 with the sound")
    p.add_argument("--image", type=Path, default=EXAMPLES / "emocast_portrait.png",
                   help="portrait image (any size; square works best)")
    p.add_argument("--audio", type=Path, default=EXAMPLES / "emocast_speech.wav",
                   help="speech audio file (wav/flac/ogg)")
    p.add_argument("--emotion", default=DEFAULT_EMOTION, help="free-text emotion prompt (CLIP, at most 75 tokens)")
    p.add_argument("--models", type=Path, default=Path("models"), help="ComfyUI-style models folder (see README)")
    p.add_argument("--out", type=Path, default=Path("out.mp4"), help="output mp4 (H.264 + AAC)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--cfg", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--clip-length", type=int, default=16, help="frames generated per clip")
    p.add_argument("--pose-weight", type=float, default=1.0)
    p.add_argument("--face-weight", type=float, default=1.0)
    p.add_argument("--lip-weight", type=float, default=1.0)
    p.add_argument("--expand-ratio", type=float, default=1.2, help="face box expansion for the masks")
    p.add_argument("--no-identity", action="store_true",
                   help="skip face recognition and use the zero identity (the original code's no-face fallback)")
    p.add_argument("--vocal-separation", action="store_true", help="separate vocals first (needs audio-separator)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        from .checkpoint import main_convert

        return main_convert(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m emocast_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    tiny = sub.add_parser("make-tiny-models", help="write tiny TEST models (not EmoCAST; their output is noise)")
    tiny.add_argument("dir", type=Path, help="models folder to create, e.g. ComfyUI/models")
    sub.add_parser("convert", help="net.pth -> .safetensors (run `convert -h` for options)")
    args = parser.parse_args(argv)
    try:
        if args.command == "make-tiny-models":
            from .tiny import make_tiny_models

            for path in make_tiny_models(args.dir):
                print(f"wrote {path}")
            print("These are tiny TEST models: the pipeline runs end to end but produces noise.")
            return 0
        from .cli import generate_file

        print(f"wrote {generate_file(args)}")
        return 0
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
