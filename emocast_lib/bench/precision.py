"""How far each weight precision moves the video: `python -m emocast_lib.bench.precision --config real64`.

For every choice the fill rule's network (released widths for `real64`) generates the bench configuration's
clips from the same inputs and initial noise as the float32 network, with the same float32 VAE (so only the
network's precision differs). Reported per choice: the frames' max and mean absolute deviation from the
float32 frames (pixels in 0..1), the latents' RMS deviation relative to their RMS, and the bytes of the
network's weights (all of them, and those of its linear/conv layers, which an fp8 format stores).

A choice is a precision (`fp16`: weights and computation in fp16) or `FORMAT/COMPUTE`: linear/conv weights
stored in an fp8 format, cast to COMPUTE in every call (`fp8_e4m3fn/fp16` is what a GPU runs, `/fp32`
isolates the storage). The row `unrelated` gives the scale: the float32 network with other initial noise,
i.e. another video of the same inputs. The fill rule's random network amplifies rounding far more than a
trained one would (test_precision.py), so the figures compare choices with each other, not with what a
viewer would see.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..checkpoint import WEIGHT_DTYPES, assign_weights, net_shapes
from ..config import PRECISIONS, SD_VAE, NetConfig, SamplingConfig
from ..files import atomic_path
from ..models import EmoCASTNet
from ..models.ops import CastOps, TorchOps, large_weights
from ..pipeline import Vae, diffusers_vae, iter_clips
from .configs import CONFIGS
from .fill import fill_tensor
from .tiny import TINY_NET, TINY_SEED, TINY_VAE, filled_vae
from .workload import Inputs, make_inputs

DEFAULT_CHOICES = ("fp16", "bf16", "fp8_e4m3fn/fp32", "fp8_e5m2/fp32", "fp8_e4m3fn/fp16", "fp8_e5m2/fp16",
                   "fp8_e4m3fn/bf16", "fp8_e5m2/bf16")
GB = 1e9


@dataclass(frozen=True)
class Choice:
    name: str
    weight_dtype: str  # "default" or an fp8 storage format (checkpoint.WEIGHT_DTYPES)
    dtype: str  # the precision of every other tensor and of the computation (config.PRECISIONS)


def parse_choice(name: str) -> Choice:
    """`fp16` / `bf16` / `fp32`, or `FORMAT/COMPUTE` such as `fp8_e4m3fn/fp16`."""
    stored, _, compute = name.partition("/")
    if stored in PRECISIONS and not compute:
        return Choice(name, "default", stored)
    if stored in WEIGHT_DTYPES[1:] and compute in PRECISIONS:
        return Choice(name, stored, compute)
    raise ValueError(f"unknown choice {name!r}: give one of {', '.join(PRECISIONS)}, or FORMAT/COMPUTE with FORMAT "
                     f"one of {', '.join(WEIGHT_DTYPES[1:])} and COMPUTE one of {', '.join(PRECISIONS)}")


class FilledWeights(Mapping):
    """The fill rule's state dict of a network, each tensor made when it is read (the released widths in
    float32 would need 10 GB at once)."""

    def __init__(self, config: NetConfig, seed: int = TINY_SEED) -> None:
        self.shapes, self.seed = net_shapes(config), seed

    def __getitem__(self, key: str) -> torch.Tensor:
        return fill_tensor(self.seed, key, self.shapes[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def build_net(config: NetConfig, choice: Choice) -> EmoCASTNet:
    """The fill rule's network of `config` held as `choice` says, on the CPU."""
    ops = TorchOps if choice.weight_dtype == "default" else CastOps
    net = EmoCASTNet(config, device="meta", operations=ops)
    return assign_weights(net, FilledWeights(config), PRECISIONS[choice.dtype], "cpu", choice.weight_dtype,
                          "fill rule")


def weight_bytes(net: EmoCASTNet) -> dict[str, int]:
    """Bytes of the network's state (parameters and buffers), and of its linear/conv weights."""
    state = net.state_dict()
    large = large_weights(net)
    return {"all": sum(t.nbytes for t in state.values()), "linear_conv": sum(state[k].nbytes for k in large)}


def generate(net: EmoCASTNet, vae: Vae, inp: Inputs, settings: SamplingConfig,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and frames of every clip, in float32."""
    done = list(iter_clips(net, vae, inp.portrait, inp.audio, inp.emotion, settings, dtype=dtype))
    return torch.cat([c.latents.float() for c in done], dim=2), torch.cat([c.frames.float() for c in done])


def deviation(ours: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    d = (ours[1] - ref[1]).abs()
    rel = (ours[0] - ref[0]).double().pow(2).mean().sqrt() / ref[0].double().pow(2).mean().sqrt()
    return {"frames_max": d.max().item(), "frames_mean": d.mean().item(), "latents_rel_rms": rel.item()}


def measure(config_name: str, choices: list[str], log=lambda line: None) -> dict[str, Any]:
    """The float32 run, the unrelated-video row and one row per choice (see the module's docstring)."""
    bc = CONFIGS[config_name]
    config = TINY_NET if bc.model == "tiny" else NetConfig()
    vae = diffusers_vae(filled_vae(TINY_VAE if bc.model == "tiny" else SD_VAE, TINY_SEED))
    settings = bc.sampling()
    inp = make_inputs(config, bc.size, bc.frames, max(bc.clips))
    rows, ref = [], None
    for choice in [parse_choice("fp32"), *map(parse_choice, choices)]:
        start = time.perf_counter()
        net = build_net(config, choice)
        out = generate(net, vae, inp, settings, PRECISIONS[choice.dtype])
        seconds = time.perf_counter() - start
        if ref is None:
            ref = out
            other = generate(net, vae, inp, replace(settings, seed=settings.seed + 1), torch.float32)
            rows.append({"choice": "unrelated", **deviation(other, ref), "bytes": None})
        rows.append({"choice": choice.name, **deviation(out, ref), "bytes": weight_bytes(net), "seconds": seconds})
        log(f"[precision] {choice.name}: {rows[-1]}")
        del net
        gc.collect()
    return {"config": config_name, "steps": settings.steps, "frames": int(ref[1].shape[0]), "size": bc.size,
            "threads": torch.get_num_threads(), "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = ["| weights | frames max | frames mean | latents rel. RMS | weights GB (linear/conv) |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        size = "" if r["bytes"] is None else f"{r['bytes']['all'] / GB:.3f} ({r['bytes']['linear_conv'] / GB:.3f})"
        lines.append(f"| {r['choice']} | {r['frames_max']:.3g} | {r['frames_mean']:.3g} | {r['latents_rel_rms']:.3g} "
                     f"| {size} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m emocast_lib.bench.precision", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", choices=[n for n, c in CONFIGS.items() if n != "gpu512"],
                   help="bench configuration (real64: released widths at 64 px)")
    p.add_argument("--choices", default=",".join(DEFAULT_CHOICES),
                   help="comma-separated: fp16, bf16, or FORMAT/COMPUTE such as fp8_e4m3fn/fp16")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (one: reproducible figures)")
    p.add_argument("--json", help="also write the figures to this new file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    choices = args.choices.split(",")
    try:
        [parse_choice(c) for c in choices]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    torch.set_num_threads(args.threads)  # the tool's own process: the library never sets it
    load = os.getloadavg()
    result = measure(args.config, choices, log=lambda line: print(line, file=sys.stderr, flush=True))
    result["load_average"] = {"start": load, "end": os.getloadavg()}
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"{result['config']}: {result['frames']} frames, {result['steps']} steps, {result['threads']} thread(s); "
          f"load average {load[0]:.2f} at the start, {result['load_average']['end'][0]:.2f} at the end")


if __name__ == "__main__":
    main()
