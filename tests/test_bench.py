"""The benchmark `python -m emocast_lib.bench`: a configuration measured in this process (the stages add up to
the clip, the floor comes from the same process's GEMM rate), the summary and tables accept it, the options
reach the sampler, and the whole command in its fresh measuring process. No timing assertions (a shared CI
machine)."""
from __future__ import annotations

import json

import pytest
import torch

from emocast_lib.bench import measure as bench
from emocast_lib.bench.configs import resolve
from emocast_lib.bench.floor import GEMM_SHAPES, gemm_rates
from emocast_lib.bench.report import stats, summarize, table, thread_scaling
from emocast_lib.bench.stages import STAGES
from emocast_lib.bench.tensor_memory import TensorMemory
from emocast_lib.bench.tiny import TINY_NET, TINY_SEED, filled_net
from emocast_lib.bench.workload import build_models, write_checkpoint
from emocast_lib.checkpoint import load_net


def measured(argv: list[str], clips: int = 1, threads: int = 1) -> dict:
    """One configuration measured in this process as the command line `argv` asks, with its summary."""
    args = bench.parse_args(argv)
    result = bench.measure_config(resolve(args.config[0], args), clips, threads, bench.options(args))
    return result | {"summary": summarize(result)}


@pytest.mark.slow
def test_bench_two_clips_with_the_floor():
    r = measured(["--config", "tiny", "--runs", "1", "--steps", "2", "--floor"], clips=2)
    assert r["config"] == {"name": "tiny", "model": "tiny", "size": 128, "frames": 4, "steps": 2, "clips": 2,
                           "scheduler": "ddim", "cfg_end": 1.0, "cache_interval": 1, "emotion_cfg": None}
    assert r["threads"] == 1

    (run,) = r["runs"]
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

    s = r["summary"]
    assert 0 < s["seconds_per_clip"]["min"] <= s["seconds_per_clip"]["median"]
    assert s["best_seconds_by_clip"] == [c["total"] for c in run]
    # High-water marks may trail a later RSS reading by a few pages (the kernel syncs per-thread counters lazily).
    assert s["peak_rss_gb"] >= s["rss_built_gb"] - 1e-3 and s["rss_built_gb"] > s["net_gb"] > 0
    assert len(s["rss_after_clip_gb"]) == 2
    if s["peak_rss_inference_gb"] is not None:  # Linux lets a process restart its RSS high-water mark
        rss = max(s["rss_after_clip_gb"])
        assert s["peak_rss_inference_gb"] >= rss - 1e-3 and rss > s["net_gb"]
    # The floor: this run's FLOPs per clip (the first clip runs the source's reference rows, the second
    # its motion frames, so they differ) at the GEMM rate measured in the same process, and the fraction of
    # the floor's speed each clip reached in the same run.
    assert len(s["gflop_by_clip"]) == 2 and all(g > 0 for g in s["gflop_by_clip"])
    assert s["gflop_by_clip"][0] != s["gflop_by_clip"][1]
    assert set(s["gemm_gflops"]) == set(GEMM_SHAPES) and all(rate > 0 for rate in s["gemm_gflops"].values())
    assert s["floor_seconds_by_clip"][0] == pytest.approx(s["gflop_by_clip"][0] / s["gemm_gflops"]["large"])
    assert s["floor_fraction_by_clip"][1] == pytest.approx(s["floor_seconds_by_clip"][1] / run[1]["total"])
    assert not any("speedup" in key or "reference" == key for key in s)  # no figure measured elsewhere
    text = table([r])
    assert "tiny x2, cpu fp32" in text and "clips 1+" in text and "denoising step" in text
    assert "% of the floor's speed" in text


def test_the_floor_is_opt_in():
    """Without --floor no GEMM rate is measured and no FLOPs counted: the report says how to get them."""
    r = measured(["--config", "tiny", "--runs", "1", "--steps", "1", "--frames", "2", "--size", "64"])
    assert "gemm_gflops" not in r and "flops_per_clip" not in r and "gemm_gflops" not in r["summary"]
    assert "floor: not measured (add --floor)" in table([r])


def test_gemm_rates_time_every_shape_at_the_thread_count():
    torch.set_num_threads(1)
    rates = gemm_rates(seconds=0.05)
    assert set(rates) == set(GEMM_SHAPES) and all(rate > 0 for rate in rates.values())
    assert torch.get_num_threads() == 1


@pytest.mark.slow
def test_bench_loads_a_written_checkpoint(tmp_path):
    """--write-checkpoint streams a fill-rule network to a .safetensors that the library's loader reads
    (the tiny sizes here; the released ones by default), and a measured run includes that load."""
    path = tmp_path / "net.safetensors"
    write_checkpoint(path, TINY_NET)
    assert not list(tmp_path.glob(".*partial*"))
    net = load_net(path)
    filled = filled_net(TINY_NET, TINY_SEED).state_dict()
    assert all(torch.equal(v, filled[k]) for k, v in net.state_dict().items())
    args = bench.parse_args(["--runs", "1", "--steps", "1", "--checkpoint", str(path)])
    r = bench.measure_config(resolve("tiny", args), 1, 1, bench.options(args))
    assert r["weights"] == f"{path} (load_net)" and r["build_s"] > 0


def test_bench_thread_counts_and_scaling():
    assert bench.parse_args(["--threads", "1,2"]).threads == [1, 2]
    for bad in ("two", "0", "1,"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--threads", bad])
    runs = [{"config": {"name": "real64", "clips": 2}, "threads": t, "summary": {"mean_best_seconds_per_clip": s}}
            for t, s in ((1, 6.0), (2, 3.2))]
    assert thread_scaling(runs) == {"real64 x2": {"2 vs 1": pytest.approx(6.0 / 3.2)}}


@pytest.mark.slow
def test_bench_levers_reach_the_sampler():
    """The experimental levers on the command line: checked before any work, handed to the sampler (what
    each does is tested in test_levers.py), labelled in the table."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--cfg-end", "2"])
    args = bench.parse_args(["--config", "tiny", "--cfg-end", "0.5", "--cache-interval", "2", "--steps", "2"])
    bc = resolve("tiny", args)
    assert (bc.cfg_end, bc.cache_interval, bc.levers()) == (0.5, 2, "cfg_end 0.5, cache_interval 2")
    assert (bc.sampling().cfg_end, bc.sampling().cache_interval) == (0.5, 2)
    r = measured(["--config", "tiny", "--runs", "1", "--steps", "2", "--cfg-end", "0.5"])
    assert r["config"]["cfg_end"] == 0.5 and len(r["runs"][0][0]["steps"]) == 2
    assert "[cfg_end 0.5]" in table([r])


def test_statistics_of_the_calls_that_ran():
    """torch.utils.benchmark's Measurement gives median and IQR; a stage that a clip does not run (0 s) is left
    out, and one that no clip runs has no statistics (a zero median has no relative spread)."""
    assert stats([0.4, 0.1, 0.2, 0.0]) == {"min": 0.1, "median": pytest.approx(0.2), "iqr": pytest.approx(0.15)}
    assert stats([0.0, 0.0]) == {}


def test_bench_config_selection():
    args = bench.parse_args(["--config", "tiny,long", "--config", "real64", "--clips", "1,3", "--steps", "5"])
    assert bench.config_names(args.config) == ["tiny", "long", "real64"]
    assert resolve("long", args).clips == (1, 3) and resolve("tiny", args).clips == (1,)
    assert resolve("real64", args).steps == 5 and resolve("real64", args).size == 64
    with pytest.raises(SystemExit):
        bench.config_names(["tiny,huge"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--size", "100"])


@pytest.mark.slow
def test_bench_low_precision_path_on_cpu():
    """The code path of `--device cuda --dtype fp16 --config gpu512`, exercised on the CPU in bf16 with the
    tiny configuration: models built in the dtype on the device, seconds per video-second reported."""
    r = measured(["--config", "tiny", "--device", "cpu", "--dtype", "bf16", "--runs", "1", "--steps", "1"])
    assert (r["device"], r["dtype"], r["fps"], r["motion_frames"]) == ("cpu", "bf16", 25, 2)
    assert "peak_vram" not in r  # CPU run: no VRAM figure
    fp32_bytes = sum(p.numel() * 4 for p in build_models("tiny")[0].parameters())
    assert r["net_bytes"] == fp32_bytes // 2
    s = r["summary"]
    (clip,) = r["runs"][0]
    assert s["seconds_per_video_second"]["min"] == pytest.approx(clip["total"] * 25 / 4)
    assert s["peak_vram_gb"] is None
    assert "cpu bf16" in table([r])


def test_bench_gpu512_is_the_released_setting():
    args = bench.parse_args(["--config", "gpu512", "--device", "cuda", "--dtype", "fp16"])
    bc = resolve("gpu512", args)
    assert (bc.model, bc.size, bc.frames, bc.steps) == ("real", 512, 16, 40)
    assert resolve("gpu512", bench.parse_args(["--config", "gpu512", "--steps", "4"])).steps == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_cuda_without_a_gpu_exits_with_one_message(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda", "--dtype", "fp16", "--config", "gpu512", "--json", str(tmp_path / "r.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--device cuda" in err and "no CUDA GPU" in err and "--device cpu" in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_bench_command_measures_in_a_fresh_process(tmp_path, capsys):
    """The whole command: each thread count measured in its own spawned process (its own peak RSS), the
    report written to --json and the timing table printed, with the load average."""
    out = tmp_path / "r.json"
    bench.main(["--config", "tiny", "--runs", "2", "--steps", "1", "--frames", "2", "--size", "64", "--threads", "1,2",
                "--json", str(out)])
    report = json.loads(out.read_text())
    assert [r["threads"] for r in report["results"]] == [1, 2]
    assert all(len(r["runs"]) == 2 and r["summary"]["peak_rss_gb"] > 0 for r in report["results"])
    assert set(report["thread_scaling"]["tiny x1"]) == {"2 vs 1"}
    printed = capsys.readouterr().out
    assert "1 threads:" in printed and "2 threads:" in printed and "load average" in printed


def test_tensor_memory_counts_allocations_not_views():
    with TensorMemory() as mem:
        a = torch.ones(1000)  # 4000 bytes
        view = a[10:]  # shares a's storage: nothing new
        b = a * 2  # 4000 more: the peak
        del b
        c = torch.empty(250)  # 1000
    assert (mem.peak, mem.live) == (8000, 5000)
    del a, view, c
    assert mem.live == 0  # counted down as storages are freed, also after the mode


@pytest.mark.slow
def test_tensor_memory_on_meta_equals_the_real_run():
    """`--device meta --tensor-memory` counts what a real run allocates: the tiny configuration's calls,
    counted for real on the CPU and on the meta device (which computes nothing), agree exactly for the
    network; the VAE's attention is counted as a fused kernel there, slightly above the CPU's kernel."""
    bc = resolve("tiny", bench.parse_args(["--steps", "1"]))
    real = bench.measure_config(bc, 1, 1, bench.Options(runs=0, tensor_memory=True))["tensor_memory"]
    meta = bench.measure_config(bc, 1, 1, bench.Options(runs=0, device="meta", tensor_memory=True))["tensor_memory"]
    for call in ("reference_unet", "prepare", "denoising_step"):
        assert meta[call] == real[call] and real[call]["peak"] > 0, call
    for call in ("vae_encode", "vae_decode"):
        assert real[call]["peak"] <= meta[call]["peak"] <= 1.05 * real[call]["peak"], call
    # One denoising call keeps its output only: (2, 4, frames, 16, 16) fp32.
    assert real["denoising_step"]["kept"] == 2 * 4 * bc.frames * 16 * 16 * 4
    assert meta["weights"] == real["weights"] > 0
