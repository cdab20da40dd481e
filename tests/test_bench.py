"""Smoke test of `python -m emocast_lib.bench`, in-process: the child entry point times the tiny
configuration over two clips and writes its JSON, which the parent's summary and table accept.
No timing assertions (a shared CI machine)."""
from __future__ import annotations

import json

import pytest
import torch

from emocast_lib.bench import measure as bench
from emocast_lib.bench.tiny import TINY_NET, TINY_SEED, filled_net
from emocast_lib.checkpoint import load_net

STAGES = ("reference_unet", "denoising_unet", "vae_encode", "vae_decode", "audio_proj", "image_proj", "face_locator",
          "prepare")


def test_bench_child_report_two_clips(tmp_path):
    out = tmp_path / "child.json"
    bench.main(["--child", "--config", "tiny", "--child-clips", "2", "--runs", "1", "--steps", "2", "--json", str(out)])
    child = json.loads(out.read_text())
    assert child["config"] == {"name": "tiny", "model": "tiny", "size": 128, "frames": 4, "steps": 2, "clips": 2,
                               "scheduler": "ddim", "cfg_end": 1.0, "cache_interval": 1}
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


def test_bench_levers_reach_the_sampler(tmp_path):
    """The experimental levers on the command line: checked before any work, handed to the child's sampler
    (what each does is tested in test_levers.py), kept out of the reference comparison, labelled."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--cfg-end", "2"])
    args = bench.parse_args(["--config", "tiny", "--cfg-end", "0.5", "--cache-interval", "2", "--steps", "2"])
    bc = bench.resolve("tiny", args)
    assert (bc.cfg_end, bc.cache_interval, bc.levers()) == (0.5, 2, "cfg_end 0.5, cache_interval 2")
    out = tmp_path / "child.json"
    bench.main(["--child", "--config", "tiny", "--runs", "1", "--steps", "2", "--cfg-end", "0.5", "--json", str(out)])
    child = json.loads(out.read_text())
    assert child["config"]["cfg_end"] == 0.5 and len(child["runs"][0][0]["steps"]) == 2
    s = bench.summarize(child)
    assert "speedup_vs_reference" not in s and "[cfg_end 0.5]" in bench.table([child | {"summary": s}])


def test_bench_config_selection():
    args = bench.parse_args(["--config", "tiny,long", "--config", "real64", "--clips", "1,3", "--steps", "5"])
    assert bench._configs(args.config) == ["tiny", "long", "real64"]
    assert bench.resolve("long", args).clips == (1, 3) and bench.resolve("tiny", args).clips == (1,)
    assert bench.resolve("real64", args).steps == 5 and bench.resolve("real64", args).size == 64


def test_bench_low_precision_path_on_cpu(tmp_path):
    """The code path of `--device cuda --dtype fp16 --config gpu512`, exercised on the CPU in bf16 with the
    tiny configuration: models built in the dtype on the device, seconds per video-second reported."""
    out = tmp_path / "child.json"
    bench.main(["--child", "--config", "tiny", "--device", "cpu", "--dtype", "bf16", "--runs", "1", "--steps", "1",
                "--json", str(out)])
    child = json.loads(out.read_text())
    assert (child["device"], child["dtype"], child["fps"], child["motion_frames"]) == ("cpu", "bf16", 25, 2)
    assert "peak_vram" not in child  # CPU run: no VRAM figure
    fp32_bytes = sum(p.numel() * 4 for p in bench.build_models("tiny")[0].parameters())
    assert child["net_bytes"] == fp32_bytes // 2
    s = bench.summarize(child)
    (clip,) = child["runs"][0]
    assert s["seconds_per_video_second"]["min"] == pytest.approx(clip["total"] * 25 / 4)
    assert s["peak_vram_gb"] is None and "speedup_vs_reference" not in s
    assert "cpu bf16" in bench.table([child | {"summary": s}])


def test_bench_gpu512_is_the_released_setting():
    args = bench.parse_args(["--config", "gpu512", "--device", "cuda", "--dtype", "fp16"])
    bc = bench.resolve("gpu512", args)
    assert (bc.model, bc.size, bc.frames, bc.steps) == ("real", 512, 16, 40)
    assert bench.resolve("gpu512", bench.parse_args(["--config", "gpu512", "--steps", "4"])).steps == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_cuda_without_a_gpu_exits_with_one_message(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda", "--dtype", "fp16", "--config", "gpu512", "--json", str(tmp_path / "r.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--device cuda" in err and "no CUDA GPU" in err and "--device cpu" in err
    assert not (tmp_path / "r.json").exists()


def test_tensor_memory_counts_allocations_not_views():
    with bench.TensorMemory() as mem:
        a = torch.ones(1000)  # 4000 bytes
        view = a[10:]  # shares a's storage: nothing new
        b = a * 2  # 4000 more: the peak
        del b
        c = torch.empty(250)  # 1000
    assert (mem.peak, mem.live) == (8000, 5000)
    del a, view, c
    assert mem.live == 0  # counted down as storages are freed, also after the mode


def test_tensor_memory_on_meta_equals_the_real_run():
    """`--device meta --tensor-memory` counts what a real run allocates: the tiny configuration's calls,
    counted for real on the CPU and on the meta device (which computes nothing), agree exactly for the
    network; the VAE's attention is counted as a fused kernel there, slightly above the CPU's kernel."""
    bc = bench.resolve("tiny", bench.parse_args(["--steps", "1"]))
    real = bench.run_child(bc, 1, 0, 1, False, "cpu", "fp32", memory=True)["tensor_memory"]
    meta = bench.run_child(bc, 1, 0, 1, False, "meta", "fp32", memory=True)["tensor_memory"]
    for call in ("reference_unet", "prepare", "denoising_step"):
        assert meta[call] == real[call] and real[call]["peak"] > 0, call
    for call in ("vae_encode", "vae_decode"):
        assert real[call]["peak"] <= meta[call]["peak"] <= 1.05 * real[call]["peak"], call
    # One denoising call keeps its output only: (2, 4, frames, 16, 16) fp32.
    assert real["denoising_step"]["kept"] == 2 * 4 * bc.frames * 16 * 16 * 4
    assert meta["weights"] == real["weights"] > 0
