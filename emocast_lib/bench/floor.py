"""The compute floor of a clip (`--floor`): its FLOPs (torch's FLOP counter: matrix products, convolutions,
attention) at the GEMM rate this machine reaches in the same process (`torch.utils.benchmark.Timer`)."""
from __future__ import annotations

import itertools

import torch
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

from ..config import SamplingConfig
from ..models import EmoCASTNet
from ..pipeline import Vae, iter_clips
from .workload import Inputs

# (rows, inner, outer): a large product, and the small-row products of real64's deep levels with cold weights.
GEMM_SHAPES = {"large": (4096, 1024, 1024), "real64 32 rows": (32, 1280, 10240), "real64 8 rows": (8, 1280, 1280)}
COLD_BYTES = 256_000_000  # small-row products cycle through this many bytes of weights, read from memory


def gemm_rate(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """GFLOP/s of `F.linear(x, W)` of this shape (as the model's linear layers compute), median of
    `Timer.blocked_autorange`, at the process's thread count."""
    m, k, n = shape
    count = 1 if m >= 1024 else max(2, COLD_BYTES // (4 * k * n))
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g).to(device, dtype) for _ in range(count)]
    x = torch.randn(m, k, generator=g).to(device, dtype)
    timing = Timer("linear(x, next(weights))", num_threads=torch.get_num_threads(),
                   globals={"linear": torch.nn.functional.linear, "x": x, "weights": itertools.cycle(weights)})
    return 2 * m * k * n / timing.blocked_autorange(min_run_time=seconds).median / 1e9


def gemm_rates(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
               seconds: float = 1.0) -> dict[str, float]:
    """This machine's GEMM rates (GFLOP/s) in `dtype` on `device`, per shape of `GEMM_SHAPES`."""
    return {name: gemm_rate(shape, device, dtype, seconds) for name, shape in GEMM_SHAPES.items()}


def count_flops(net: EmoCASTNet, vae: Vae, inp: Inputs, settings: SamplingConfig, clips: int) -> list[float]:
    """FLOPs of each of the first `clips` clips (matrix products, convolutions, attention)."""
    counts = []
    generator = iter_clips(net, vae, inp.portrait, inp.audio, inp.emotion, settings)
    for _ in range(clips):
        with FlopCounterMode(display=False) as counter:
            next(generator)
        counts.append(float(counter.get_total_flops()))
    generator.close()
    return counts
