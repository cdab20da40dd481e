"""What the bench runs: its named configurations, and the one place where command-line options become the
sampling configuration of a run (`LEVERS`, `resolve`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from typing import Any

from ..config import SamplingConfig
from ..sampling import SCHEDULERS

MOTION_SCALE = (0.9, 1.1, 1.25)  # the fixtures' values; any non-trivial scales cost the same


@dataclass(frozen=True)
class BenchConfig:
    name: str
    model: str  # "tiny" (fixture sizes) or "real" (released widths)
    size: int
    frames: int
    steps: int
    clips: tuple[int, ...] = (1,)
    # The experimental sampling levers (SamplingConfig fields of the same names), released settings by default.
    scheduler: str = "ddim"
    cfg_end: float = 1.0
    cache_interval: int = 1
    emotion_cfg: float | None = None  # None: the same as cfg (no neutral half)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(steps=self.steps, frames_per_clip=self.frames, motion_scale=MOTION_SCALE,
                              **{k: getattr(self, k) for k in LEVERS})

    def levers(self) -> str:
        """The levers that differ from the released sampler, e.g. "cfg_end 0.5", or ""."""
        return ", ".join(f"{k} {getattr(self, k)}" for k in LEVERS if getattr(self, k) != getattr(BenchConfig, k))


CONFIGS = {
    "tiny": BenchConfig("tiny", "tiny", 128, 4, 3),
    # Two clips: the first computes the source's reference rows once for all of its rows, the second
    # is what every later clip of a video costs.
    "real64": BenchConfig("real64", "real", 64, 4, 2, clips=(2,)),
    "real256": BenchConfig("real256", "real", 256, 4, 2),
    "long": BenchConfig("long", "tiny", 128, 4, 3, clips=(1, 4, 16)),
    # The released inference settings (512 px, 16-frame clips, 2 motion frames, 40 steps, CFG): for a GPU.
    "gpu512": BenchConfig("gpu512", "real", 512, 16, 40),
}

# The sampling levers of the command line: a BenchConfig field and a SamplingConfig field of the same name, and
# its option (`--cfg-end` for cfg_end). A new lever is a field of both dataclasses and one entry here.
LEVERS: dict[str, dict[str, Any]] = {
    "scheduler": {"choices": SCHEDULERS, "help": "experimental lever: the sampler (default ddim, released)"},
    "cfg_end": {"type": float, "help": "experimental lever: guidance for this fraction of the steps only"},
    "cache_interval": {"type": int, "help": "experimental lever: a full UNet pass every N steps, shallow passes in "
                                            "between (DeepCache)"},
    "emotion_cfg": {"type": float, "help": "guidance scale of the emotion prompt alone (default: the same as cfg); "
                                       "another value runs the neutral half: its denoising calls follow each "
                                       "released one in a clip's `steps`"},
}
# The configuration's shape, overridable on the command line as well.
SHAPE = {"steps": "override the denoising steps of every configuration", "frames": "override the frames per clip",
         "size": "override the pixel size (multiple of 64)"}


def add_options(p: argparse.ArgumentParser) -> None:
    for name, help_text in SHAPE.items():
        p.add_argument(f"--{name}", type=int, help=help_text)
    for name, kwargs in LEVERS.items():
        p.add_argument(f"--{name.replace('_', '-')}", **kwargs)
    p.add_argument("--clips", help="override the clip counts of `long`, comma-separated (e.g. 1,4,16)")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The BenchConfig fields the command line sets."""
    return {k: getattr(args, k) for k in (*SHAPE, *LEVERS) if getattr(args, k, None) is not None}


def resolve(name: str, args: argparse.Namespace) -> BenchConfig:
    bc = CONFIGS[name]
    over = overrides(args)
    if getattr(args, "clips", None) and bc.clips != (1,):
        over["clips"] = tuple(int(c) for c in args.clips.split(","))
    return replace(bc, **over)


def config_names(names: list[str]) -> list[str]:
    """`--config tiny,long --config real64` as a list of known names."""
    out = [n.strip() for arg in names for n in arg.split(",") if n.strip()]
    bad = [n for n in out if n not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown configuration {bad}; choose from {', '.join(CONFIGS)}")
    return out


def from_record(config: dict[str, Any]) -> BenchConfig:
    """A BenchConfig from its JSON record (`asdict` with `clips` the count run)."""
    known = {f.name for f in fields(BenchConfig)}
    return BenchConfig(**{k: v for k, v in config.items() if k in known and k != "clips"})
