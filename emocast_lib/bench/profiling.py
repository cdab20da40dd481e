"""Where a call's time goes (`--profile`): self CPU time of its aten ops by category and by input shape
(torch.profiler), for the calls clip 0 of the real pipeline made, replayed with the arguments it used."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.benchmark import timer

from ..config import SamplingConfig
from ..models import EmoCASTNet
from ..pipeline import Vae
from .stages import clip0_calls
from .workload import Inputs

CATEGORIES = (  # (category, full-match pattern on the aten op name without "aten::"), first match wins
    ("conv", r".*conv.*|im2col|col2im"),
    ("attention", r".*scaled_dot_product.*|.*flash_attention.*|.*efficient_attention.*|_?softmax|bmm|baddbmm"),
    ("linear", r"addmm|mm|linear|matmul"),  # also the convs the model runs as im2col + GEMM
    ("group_norm", r".*group_norm"),
    ("layer_norm", r".*layer_norm"),
    ("dtype_cast", r"_to_copy|to"),  # e.g. the fp16 rounding of the reference bank
    ("copy/layout", r"cat|copy_|clone|contiguous|index.*|repeat.*|expand|.*upsample.*|.*pad.*|unfold"),
    ("elementwise", r"add_?|mul_?|sub_?|div_?|silu_?|gelu|relu_?|exp|sin|cos|clamp.*|neg|sqrt|rsqrt|pow"),
)


def _category(op: str) -> str:
    name = op.removeprefix("aten::")
    return next((c for c, pattern in CATEGORIES if re.fullmatch(pattern, name)), "other")


def profile_call(fn: Callable[[], Any], top: int = 15) -> dict[str, Any]:
    """Self CPU time of the aten ops of one call (after the timed runs, so kernels are warm)."""
    start = timer()
    fn()
    plain = timer() - start
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    ops = sorted(({"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in events),
                 key=lambda r: -r["self_s"])
    shaped = sorted(({"op": e.key, "shapes": str(e.input_shapes), "self_s": e.self_cpu_time_total / 1e6,
                      "calls": e.count} for e in prof.key_averages(group_by_input_shape=True)
                     if e.key.startswith("aten::")), key=lambda r: -r["self_s"])
    cats: dict[str, float] = defaultdict(float)
    for r in ops:
        cats[_category(r["op"])] += r["self_s"]
    aten = sum(cats.values())
    return {"wall_unprofiled": plain, "aten_self_total": aten, "outside_aten": max(plain - aten, 0.0),
            "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "top_ops": ops[:top],
            "top_ops_by_shape": shaped[:top]}


def profiles(net: EmoCASTNet, vae: Vae, inp: Inputs, settings: SamplingConfig) -> dict[str, Any]:
    """Profile the calls clip 0 of the real pipeline made, replayed with the arguments it used."""
    calls = clip0_calls(net, vae, inp, settings)
    with torch.no_grad():
        return {name: profile_call(fn) for name, fn in calls.items()}
