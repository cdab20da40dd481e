"""The bench's summary and tables: statistics and the timing table from `torch.utils.benchmark`
(`Measurement`: median, IQR, high-variance warnings; `Compare`: one block per configuration, one section per
thread count), and EmoCAST's own figures beside them: memory, the compute floor, thread scaling."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.utils.benchmark import Compare, Measurement
from torch.utils.benchmark.utils.common import TaskSpec

from .configs import from_record

GB = 1e9
ROWS = {"clip": "clip", "reference_unet": "reference UNet", "step": "denoising step", "vae_encode": "VAE encode",
        "vae_decode": "VAE decode", "conditioning": "conditioning", "other": "other"}


def measurement(values: Iterable[float], what: str = "", **spec: Any) -> Measurement:
    return Measurement(1, list(values), TaskSpec(what, "pass", **spec))


def stats(values: Iterable[float]) -> dict[str, float]:
    """Min, median and IQR of the calls that took time (a stage a clip does not run takes none)."""
    m = measurement(v for v in values if v)
    return {"min": min(m.times), "median": m.median, "iqr": m.iqr} if m.times else {}


def _memory(child: dict[str, Any]) -> dict[str, Any]:
    gb = {k: child[k] / GB if child.get(k) is not None else None
          for k in ("peak_rss", "peak_rss_inference", "net_bytes", "rss_start", "rss_built", "vram_built",
                    "peak_vram")}
    return {"peak_rss_gb": gb["peak_rss"], "peak_rss_inference_gb": gb["peak_rss_inference"],
            "net_gb": gb["net_bytes"], "rss_start_gb": gb["rss_start"] or 0.0, "rss_built_gb": gb["rss_built"] or 0.0,
            "vram_built_gb": gb["vram_built"], "peak_vram_gb": gb["peak_vram"],
            "rss_after_clip_gb": [c["rss"] / GB for c in child["runs"][-1] if c["rss"] is not None]}


def _floor(child: dict[str, Any], best: list[float]) -> dict[str, Any]:
    """The floor of each counted clip at the large-GEMM rate of the same process, and the fraction of that
    floor's speed the clip reached (floor seconds / measured seconds)."""
    rate = child["gemm_gflops"]["large"] * 1e9
    floor = [f / rate for f in child["flops_per_clip"]]
    return {"gemm_gflops": child["gemm_gflops"], "gflop_by_clip": [f / 1e9 for f in child["flops_per_clip"]],
            "floor_seconds_by_clip": floor, "floor_fraction_by_clip": [f / t for f, t in zip(floor, best)]}


def summarize(child: dict[str, Any]) -> dict[str, Any]:
    """Statistics over every clip of every run (seconds per clip, per stage and per denoising call); per clip
    position of a run (the first clip of a video does less than the later ones) the best over runs; memory;
    with `--floor` the compute floor."""
    clips = [c for run in child["runs"] for c in run]
    by_position = [[run[i] for run in child["runs"]] for i in range(len(child["runs"][0]))]
    best = [min(c["total"] for c in position) for position in by_position]
    s = {"seconds_per_clip": stats(c["total"] for c in clips), "cpu_seconds_per_clip": stats(c["cpu"] for c in clips),
         "best_seconds_by_clip": best, "best_cpu_seconds_by_clip": [min(c["cpu"] for c in p) for p in by_position],
         "mean_best_seconds_per_clip": statistics.fmean(best),
         "stages": {k: stats(c["stages"][k] for c in clips) for k in clips[0]["stages"]},
         "stages_cpu": {k: stats(c["stages_cpu"][k] for c in clips) for k in clips[0]["stages_cpu"]},  # {} if not run
         "step": stats(t for c in clips for t in c["steps"]),
         "step_cpu": stats(t for c in clips for t in c["steps_cpu"]),
         "build_s": child["build_s"],
         # A clip shows frames / fps seconds of video.
         "seconds_per_video_second": stats(c["total"] * child["fps"] / c["frames"] for c in clips)}
    s |= _memory(child)
    if "flops_per_clip" in child:
        s |= _floor(child, best)
    return s


def label(r: dict[str, Any]) -> str:
    c = r["config"]
    levers = from_record(c).levers()
    return f"{c['name']} x{c['clips']}, {r['device']} {r['dtype']}" + (f" [{levers}]" if levers else "")


def _cells(clips: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per table row, the wall seconds of these clips (`step`: each denoising call); `... CPU`: process CPU."""
    cells = {}
    for kind, total, stages, steps in (("", "total", "stages", "steps"), (" CPU", "cpu", "stages_cpu", "steps_cpu")):
        cells["clip" + kind] = [c[total] for c in clips]
        cells["step" + kind] = [t for c in clips for t in c[steps]]
        cells |= {k + kind: [c[stages][k] for c in clips] for k in ROWS if k not in ("clip", "step")}
    return cells


def measurements(r: dict[str, Any]) -> list[Measurement]:
    """The result's timings as `Measurement`s: rows are the stages, columns clip 0 and the later clips of a
    run (each over every run), wall and CPU seconds."""
    groups = {"clip 0": [run[0] for run in r["runs"]], "clips 1+": [c for run in r["runs"] for c in run[1:]]}
    out = []
    for column, clips in groups.items():
        for key, values in (_cells(clips) if clips else {}).items():
            row, _, cpu = key.partition(" ")
            values = [v for v in values if v]  # a stage a clip does not run (the face locator after clip 0)
            if values:
                out.append(measurement(values, row, label=label(r), sub_label=ROWS[row],
                                       description=column + (" CPU" if cpu else ""), num_threads=r["threads"]))
    return out


def thread_scaling(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per configuration and clip count run at several thread counts: the speed-up of each thread count
    over the lowest one (mean of the best per-clip wall times, measured in the same invocation)."""
    out: dict[str, dict[str, float]] = {}
    for r in results:
        key = f"{r['config']['name']} x{r['config']['clips']}"
        base = min((q for q in results if f"{q['config']['name']} x{q['config']['clips']}" == key),
                   key=lambda q: q["threads"])
        if r is not base:
            out.setdefault(key, {})[f"{r['threads']} vs {base['threads']}"] = (
                base["summary"]["mean_best_seconds_per_clip"] / r["summary"]["mean_best_seconds_per_clip"])
    return out


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def memory_line(r: dict[str, Any]) -> str:
    s = r["summary"]
    line = (f"peak RSS {_gb(s['peak_rss_gb'])} GB (build included), while generating {_gb(s['peak_rss_inference_gb'])}"
            f" GB, weights {_gb(s['net_gb'])} GB, built in {s['build_s']:.1f} s")
    if s["peak_vram_gb"] is not None:
        line += f", peak VRAM {s['peak_vram_gb']:.2f} GB"
    return line


def floor_line(r: dict[str, Any]) -> str:
    s = r["summary"]
    if "gemm_gflops" not in s:
        return "floor: not measured (add --floor)"
    rates = ", ".join(f"{k} {v:.0f}" for k, v in s["gemm_gflops"].items())
    clips = "; ".join(f"clip {i}: {g:.1f} GFLOP, floor {f:.2f} s, {100 * q:.0f} % of the floor's speed"
                      for i, (g, f, q) in enumerate(zip(s["gflop_by_clip"], s["floor_seconds_by_clip"],
                                                        s["floor_fraction_by_clip"])))
    return f"GEMM GFLOP/s {rates}; at the large rate {clips}"


def result_lines(r: dict[str, Any]) -> list[str]:
    s, name = r["summary"], f"{label(r)}, {r['threads']} thr"
    per_second = s["seconds_per_video_second"]["min"]
    lines = [f"{name}: s/clip, each clip's best run: " + " ".join(f"{t:.3f}" for t in s["best_seconds_by_clip"])
             + " (CPU " + " ".join(f"{t:.3f}" for t in s["best_cpu_seconds_by_clip"])
             + f"); {per_second:.3f} s per second of video", f"    {memory_line(r)}", f"    {floor_line(r)}"]
    if len(s["rss_after_clip_gb"]) > 1:
        lines.append("    RSS GB after each clip (last run) " + " ".join(f"{g:.3f}" for g in s["rss_after_clip_gb"]))
    return lines


def table(results: list[dict[str, Any]]) -> str:
    compare = Compare([m for r in results for m in measurements(r)])
    compare.highlight_warnings()
    lines = [str(compare).rstrip(), "(median over the runs; each cell's clips: `clip 0` the first clip of each run, "
             "`clips 1+` the later ones. `denoising step` is one denoising-UNet call; `conditioning` = audio/image "
             "projections + face locator + prepare; `other` = the rest of the clip: guidance, scheduler, glue)", ""]
    lines += [line for r in results for line in result_lines(r)]
    for key, ratios in thread_scaling(results).items():
        lines.append(f"{key} thread scaling (same invocation): "
                     + ", ".join(f"{k} threads {v:.2f}x" for k, v in ratios.items()))
    return "\n".join(lines)


def memory_table(results: list[dict[str, Any]]) -> str:
    lines = ["\nTensor memory of clip 0's calls (GB; peak: the call's own tensors at their largest; kept: its result)"]
    for r in results:
        m, c = r["tensor_memory"], r["config"]
        lines.append(f"  {c['name']} on {r['device']} {r['dtype']}, {c['size']} px, {c['frames']} frames + "
                     f"{r['motion_frames']} motion frames: weights {m['weights'] / GB:.2f}")
        for name, what in (("vae_encode", f"VAE encode of {1 + r['motion_frames']} reference frames"),
                           ("reference_unet", "reference UNet (reference features kept)"),
                           ("prepare", "prepare (clip context kept)"), ("denoising_step", "one denoising call"),
                           ("vae_decode", f"VAE decode of {m['decode_batch']} frames")):
            lines.append(f"    {what:<42} peak {m[name]['peak'] / GB:7.3f}   kept {m[name]['kept'] / GB:7.3f}")
    return "\n".join(lines)


def profile_table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        for section, p in r.get("profile", {}).items():
            lines.append(f"\n{r['config']['name']} {section}: {p['wall_unprofiled']:.3f} s unprofiled, aten self "
                         f"{p['aten_self_total']:.3f} s, outside aten (python/dispatch) {p['outside_aten']:.3f} s")
            lines.append("  by category (s): " + ", ".join(f"{k} {v:.3f}" for k, v in p["categories"].items()))
            for op in p["top_ops"][:10]:
                lines.append(f"    {op['op']:<42}{op['self_s']:>8.3f} s {op['calls']:>6} calls")
            lines.append("  top ops by input shape:")
            for op in p["top_ops_by_shape"][:8]:
                lines.append(f"    {op['self_s']:>7.3f} s {op['calls']:>5}x {op['op']} {op['shapes'][:110]}")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__,
            "mkldnn": torch.backends.mkldnn.is_available(), "load_average": os.getloadavg(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def code_version() -> str | None:
    """The checkout's commit, `+dirty` if it has local changes (results are only comparable per version)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True)
    except OSError:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None
