"""Speed and memory benchmark: `python -m emocast_lib.bench --config tiny,long [--runs 3] [--threads 1,2]`;
on a GPU: `python -m emocast_lib.bench --device cuda --dtype fp16 --config gpu512 [--steps 4]`.

Models are built from the fixtures' fill rule (weights do not change the cost), or loaded from a
checkpoint file (`--checkpoint`, e.g. one written by `--write-checkpoint`: the load and the first
touch of the memory-mapped weights are then part of the figures); inputs are random tensors of the
shapes the preprocessing produces. Each configuration (and each clip count of `long`, and each thread
count) runs in a fresh process, because peak RSS is a per-process high-water mark.

Each clip is timed by stage inside the real `iter_clips` (stages.py); `--floor` also counts the FLOPs of the
first clips and measures this machine's GEMM rate in the same process, so that the compute floor of a clip
(its FLOPs at that rate) is reported next to its time (floor.py). On CUDA every timed call waits for the
GPU, and the peak VRAM is `torch.cuda.max_memory_allocated` after the model build (weights) and while
generating.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.benchmark import timer

from ..config import PRECISIONS, NetConfig, SamplingConfig
from ..sampling import check_settings
from .configs import CONFIGS, LEVERS, BenchConfig, add_options, config_names, resolve
from .floor import count_flops, gemm_rates
from .memory import hwm_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes
from .profiling import profiles
from .report import code_version, machine_info, memory_table, profile_table, summarize, table, thread_scaling
from .stages import time_clips
from .tensor_memory import tensor_memory, tensor_memory_meta
from .workload import build_models, make_inputs, write_checkpoint


@dataclass(frozen=True)
class Options:
    """What every measured configuration of one invocation shares."""
    runs: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    checkpoint: Path | None = None  # the network to load instead of building it by the fill rule
    floor: bool = False
    profile: bool = False
    tensor_memory: bool = False


def _built(bc: BenchConfig, clips: int, opts: Options) -> dict[str, Any]:
    """The models and inputs of `bc`, with the time and memory the build took."""
    dev = torch.device(opts.device)
    rss_start, t0 = rss_bytes(), timer()
    net, vae, weights = build_models(bc.model, dev, PRECISIONS[opts.dtype], opts.checkpoint)
    return {"net": net, "vae": vae, "inp": make_inputs(net.config, bc.size, bc.frames, clips),
            "record": {"weights": weights, "build_s": timer() - t0, "rss_start": rss_start, "rss_built": rss_bytes(),
                       "net_bytes": sum(p.numel() * p.element_size() for p in net.parameters())}}


def _timed_runs(bc: BenchConfig, clips: int, opts: Options, built: dict[str, Any]) -> dict[str, Any]:
    """`opts.runs` runs of the pipeline with the process's peak RSS (and VRAM) of generating alone."""
    dev, settings = torch.device(opts.device), bc.sampling()
    out = {"peak_rss_build": peak_rss_bytes()}
    hwm_reset = reset_peak_rss()
    if dev.type == "cuda":
        out["vram_built"] = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    out["runs"] = []
    for r in range(opts.runs):
        out["runs"].append(time_clips(built["net"], built["vae"], built["inp"], settings))
        print(f"[bench] {bc.name} x{clips} run {r + 1}/{opts.runs}: "
              f"{[round(c['total'], 2) for c in out['runs'][-1]]} s/clip", file=sys.stderr, flush=True)
    out |= {"peak_rss": peak_rss_bytes(), "peak_rss_inference": hwm_bytes() if hwm_reset else None}
    if dev.type == "cuda":
        out |= {"gpu": torch.cuda.get_device_name(dev), "peak_vram": torch.cuda.max_memory_allocated(dev)}
    return out


def _extras(bc: BenchConfig, clips: int, opts: Options, built: dict[str, Any]) -> dict[str, Any]:
    """After the peak readings: neither the FLOP counter, the GEMM operands nor the profiler belong to the
    pipeline."""
    net, vae, inp, settings = built["net"], built["vae"], built["inp"], bc.sampling()
    out: dict[str, Any] = {}
    if opts.floor:
        out["flops_per_clip"] = count_flops(net, vae, inp, settings, min(clips, 2))
        out["gemm_gflops"] = gemm_rates(torch.device(opts.device), PRECISIONS[opts.dtype])
    if opts.profile:
        out["profile"] = profiles(net, vae, inp, settings)
    if opts.tensor_memory:
        out["tensor_memory"] = tensor_memory(net, vae, inp, settings)
    return out


def measure_config(bc: BenchConfig, clips: int, threads: int, opts: Options) -> dict[str, Any]:
    """One configuration at one clip count and thread count, in this process: its record (JSON-ready)."""
    torch.set_num_threads(threads)  # the benchmark's own process: the library never sets it
    if torch.device(opts.device).type == "cuda":
        torch.cuda.set_device(torch.device(opts.device))  # the device the timer waits for (cuda:N)
    settings = bc.sampling()
    out = {"config": asdict(bc) | {"clips": clips}, "threads": torch.get_num_threads(), "device": opts.device,
           "dtype": opts.dtype, "fps": settings.fps, "motion_frames": settings.motion_frames}
    if opts.device == "meta":  # nothing runs there to be timed: tensor memory only
        return out | {"runs": [], "tensor_memory": tensor_memory_meta(bc, settings, PRECISIONS[opts.dtype])}
    built = _built(bc, clips, opts)
    out |= built["record"] | _timed_runs(bc, clips, opts, built) | _extras(bc, clips, opts, built)
    return out | {"load_average_child": os.getloadavg()}


def in_fresh_process(bc: BenchConfig, clips: int, threads: int, opts: Options) -> dict[str, Any]:
    """`measure_config` in a fresh interpreter, so that its peak RSS is its own."""
    load_before = os.getloadavg()
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter, not a copy of this one (fork)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            result = pool.submit(measure_config, bc, clips, threads, opts).result()
    except BrokenProcessPool as e:  # killed (e.g. out of memory) or crashed
        raise SystemExit(f"benchmark process for {bc.name} x{clips} on {threads} thread(s) died: {e}") from None
    return result | {"load_average": {"before": load_before, "after": os.getloadavg()}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m emocast_lib.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=None,
                   help=f"configuration(s), repeatable or comma-separated: {', '.join(CONFIGS)} (default tiny)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per configuration (min and median are reported)")
    p.add_argument("--threads", default="1",
                   help="torch intra-op threads; comma-separated to compare thread counts in one invocation (1,2)")
    p.add_argument("--checkpoint", type=Path,
                   help="load the released-width network from this file (e.g. a float32 .safetensors, memory-mapped) "
                        "instead of building it by the fill rule: loading and first use of the weights are measured")
    p.add_argument("--write-checkpoint", type=Path, metavar="PATH",
                   help="write the fill rule's released-width network to PATH (float32 .safetensors, 10 GB) and exit")
    p.add_argument("--device", default="cpu",
                   help="where the models run: cpu (default), cuda or cuda:N; meta: count --tensor-memory only, "
                        "at any size, without computing")
    p.add_argument("--dtype", choices=list(PRECISIONS), default="fp32",
                   help="precision of the network and the VAE (default fp32)")
    add_options(p)
    p.add_argument("--floor", action="store_true",
                   help="also count each clip's FLOPs and measure this machine's GEMM rates (about 10-25 s per "
                        "configuration): the compute floor, and the fraction of its speed each clip reaches")
    p.add_argument("--profile", action="store_true",
                   help="also profile one denoising step, reference pass, prepare and VAE decode (torch.profiler)")
    p.add_argument("--tensor-memory", action="store_true",
                   help="also measure the peak tensor bytes of each call of clip 0 (with --runs 0: only that)")
    p.add_argument("--json", type=Path, default=Path("bench_results.json"), help="where to write the results")
    args = p.parse_args(argv)
    problem = _problem(args)
    if problem:
        p.error(problem)
    args.threads = [int(t) for t in str(args.threads).split(",")]
    return args


def _problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, before any work, or None."""
    if args.size is not None and args.size % 64:
        return f"--size {args.size} is not a multiple of 64 (the latent grid must halve three times)"
    if not all(t.strip().isdigit() and int(t) > 0 for t in str(args.threads).split(",")):
        return f"--threads {args.threads}: give thread counts such as 1 or 1,2"
    try:
        check_settings(SamplingConfig(**{k: getattr(args, k) for k in LEVERS if getattr(args, k) is not None}))
        torch.device(args.device)
    except (ValueError, RuntimeError) as e:
        return f"--device {args.device!r} is not a device name; use cpu, cuda or cuda:N" if isinstance(
            e, RuntimeError) else str(e)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        return f"--checkpoint {args.checkpoint}: no such file (write one with --write-checkpoint PATH)"
    if args.device == "meta" and not args.tensor_memory:
        return "--device meta computes nothing and only counts tensor memory: add --tensor-memory"
    return None


def options(args: argparse.Namespace, bc: BenchConfig | None = None) -> Options:
    """The options of `args`; for `bc` a tiny configuration, without --checkpoint (a released-width network)."""
    use_checkpoint = args.checkpoint is not None and (bc is None or bc.model == "real")
    return Options(runs=args.runs, device=args.device, dtype=args.dtype, floor=args.floor, profile=args.profile,
                   tensor_memory=args.tensor_memory, checkpoint=args.checkpoint.resolve() if use_checkpoint else None)


def run_all(names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration, clip count and thread count, each in a fresh process, with its summary."""
    results = []
    for name in names:
        bc = resolve(name, args)
        for clips in bc.clips:
            for threads in args.threads:
                result = in_fresh_process(bc, clips, threads, options(args, bc))
                results.append(result | {"summary": summarize(result) if result["runs"] else None})
    return results


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    timed = [r for r in report["results"] if r["summary"]]
    if timed:
        print(table(timed))
    if args.profile:
        print(profile_table(report["results"]))
    if args.tensor_memory:
        print(memory_table(report["results"]))
    machine = report["machine"]
    load = ", ".join(f"{x:.1f}" for x in machine["load_average"])
    gpu = f", GPU {machine['gpu']}" if torch.device(args.device).type == "cuda" else ""
    print(f"\ncode {report['code']}; {machine['cpu_count']} CPUs{gpu}, torch {torch.__version__}, "
          f"{','.join(map(str, args.threads))} thread(s), load average {load} (wall times are inflated when it "
          f"exceeds the threads); results in {args.json}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.write_checkpoint is not None:
        write_checkpoint(args.write_checkpoint, NetConfig())
        print(f"wrote {args.write_checkpoint}: the fill rule's released-width network (a benchmark stand-in)")
        return
    names = config_names(args.config or ["tiny"])
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: this PyTorch ({torch.__version__}) sees no CUDA GPU; run the GPU "
              "benchmark on a machine with an NVIDIA GPU and a CUDA build of PyTorch, or use --device cpu",
              file=sys.stderr)
        raise SystemExit(2)
    results = run_all(names, args)
    report = {"machine": machine_info() | {"threads": args.threads, "device": args.device, "dtype": args.dtype},
              "code": code_version(), "command": sys.argv, "results": results,
              "thread_scaling": thread_scaling([r for r in results if r["summary"]])}
    args.json.write_text(json.dumps(report, indent=1))
    print_report(report, args)
