"""Smoke test of `python -m emocast_lib.bench`, in-process: the child entry point times the tiny
configuration over two clips and writes its JSON, which the parent's summary and table accept.
No timing assertions (a shared CI machine)."""
from __future__ import annotations

import json

import pytest
import torch

from emocast_lib import bench
from emocast_lib.checkpoint import load_net
from emocast_lib.tiny import TINY_NET, TINY_SEED, filled_net

STAGES = ("reference_unet", "denoising_unet", "vae_encode", "vae_decode", "audio_proj", "image_proj", "face_locator",
          "prepare")


def test_bench_child_report_two_clips(tmp_path):
    out = tmp_path / "child.json"
    bench.main(["--child", "--config", "tiny", "--child-clips", "2", "--runs", "1", "--steps", "2", "--json", str(out)])
    child = json.loads(out.read_text())
    assert child["config"] == {"name": "tiny", "model": "tiny", "size": 128, "frames": 4, "steps": 2, "clips": 2}
    assert child["threads"] == 1

    (run,) = child["runs"]
    assert [c["frames"] for c in run] == [4, 4]
    for clip in run:
        assert len(clip["steps"]) == 2 and all(t > 0 for t in clip["steps"] + clip["steps_cpu"])
        assert all(clip["stages"][k] > 0 for k in ("reference_unet", "denoising_unet", "vae_encode", "vae_decode",
                                                   "audio_proj", "prepare"))
        # Timed stages lie inside the clip; `other` is the untimed remainder, so they add up.
        assert abs(sum(clip["stages"][k] for k in (*STAGES, "other")) - clip["total"]) < 1e-6
        assert clip["stages"]["denoising_unet"] == sum(clip["steps"])
        assert clip["cpu"] > 0 and clip["rss"] > 0
    # Identity tokens and face features are computed once per video, in clip 0.
    assert run[0]["stages"]["face_locator"] > 0 and run[1]["stages"]["face_locator"] == 0

    s = bench.summarize(child)
    assert 0 < s["seconds_per_clip"]["min"] <= s["seconds_per_clip"]["median"]
    # High-water marks may trail a later RSS reading by a few pages (the kernel syncs per-thread counters lazily).
    assert s["peak_rss_gb"] >= s["rss_built_gb"] - 1e-3 and s["rss_built_gb"] > s["net_gb"] > 0
    assert len(s["rss_after_clip_gb"]) == 2
    if s["peak_rss_inference_gb"] is not None:  # Linux lets a process restart its RSS high-water mark
        rss = max(s["rss_after_clip_gb"])
        assert s["peak_rss_inference_gb"] >= rss - 1e-3 and rss > s["net_gb"]
    assert "speedup_vs_reference" not in s  # 2 steps: not the reference's run
    # The floor: this run's FLOPs per clip (the first clip runs the source's reference rows, the second
    # its motion frames, so they differ) at the GEMM rate measured in the same process.
    assert len(s["gflop_by_clip"]) == 2 and all(g > 0 for g in s["gflop_by_clip"])
    assert s["gflop_by_clip"][0] != s["gflop_by_clip"][1]
    assert all(rate["wall"] > 0 and rate["cpu"] > 0 for rate in s["gemm_gflops"].values())
    assert s["floor_seconds_by_clip"][0] == pytest.approx(s["gflop_by_clip"][0] / s["gemm_gflops"]["large"]["wall"])
    assert len(s["best_seconds_by_clip"]) == 2 and s["mean_best_seconds_per_clip"] > 0
    text = bench.table([child | {"summary": s}])
    assert "tiny" in text and "x2 1 thr: s/clip" in text and "floor per clip" in text


def test_bench_loads_a_written_checkpoint(tmp_path):
    """--write-checkpoint streams a fill-rule network to a .safetensors that the library's loader reads
    (the tiny sizes here; the released ones by default), and a child run measures that load."""
    path = tmp_path / "net.safetensors"
    bench.write_checkpoint(path, TINY_NET)
    assert not list(tmp_path.glob(".*partial*"))
    net = load_net(path)
    filled = filled_net(TINY_NET, TINY_SEED).state_dict()
    assert all(torch.equal(v, filled[k]) for k, v in net.state_dict().items())
    out = tmp_path / "child.json"
    bench.main(["--child", "--config", "tiny", "--runs", "1", "--steps", "1", "--checkpoint", str(path),
                "--json", str(out)])
    child = json.loads(out.read_text())
    assert child["weights"] == f"{path} (load_net)" and child["build_s"] > 0


def test_bench_thread_counts_and_scaling():
    assert bench.parse_args(["--threads", "1,2"]).threads == [1, 2]
    with pytest.raises(SystemExit):
        bench.parse_args(["--threads", "two"])
    runs = [{"config": {"name": "real64", "clips": 2}, "threads": t, "summary": {"mean_best_seconds_per_clip": s}}
            for t, s in ((1, 6.0), (2, 3.2))]
    assert bench.thread_scaling(runs) == {"real64 x2": {"2 vs 1": pytest.approx(6.0 / 3.2)}}


def test_bench_config_selection():
    args = bench.parse_args(["--config", "tiny,long", "--config", "real64", "--clips", "1,3", "--steps", "5"])
    assert bench._configs(args.config) == ["tiny", "long", "real64"]
    assert bench.resolve("long", args).clips == (1, 3) and bench.resolve("tiny", args).clips == (1,)
    assert bench.resolve("real64", args).steps == 5 and bench.resolve("real64", args).size == 64
