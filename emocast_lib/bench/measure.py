"""Speed and memory benchmark: `python -m emocast_lib.bench --config tiny,long [--runs 3] [--threads 1,2]`;
on a GPU: `python -m emocast_lib.bench --device cuda --dtype fp16 --config gpu512 [--steps 4]`.

Models are built from the fixtures' fill rule (weights do not change the cost), or loaded from a
checkpoint file (`--checkpoint`, e.g. one written by `--write-checkpoint`: the load and the first
touch of the memory-mapped weights are then part of the figures); inputs are random tensors of the
shapes the preprocessing produces. Each configuration (and each clip count of `long`, and each thread
count) runs in a fresh child process, because peak RSS is a per-process high-water mark.

Beside the timings every child measures this CPU's float32 GEMM rate at its thread count and counts the
FLOPs of its first clips (torch's FLOP counter: matrix products, convolutions, attention), so that the
compute floor of a clip (its FLOPs at that rate) is reported next to its time.

The stages are timed inside the real `iter_clips`: it is handed stand-ins for the network and the VAE
that pass everything through to the real modules and time each call (projections, face locator,
reference UNet, `prepare`, every denoising-UNet call, VAE encode/decode). Whatever a clip costs
outside those calls (guidance, scheduler, concatenations) is reported as `other`, so the stages
always add up to the measured seconds per clip. On CUDA every timed call is synchronised at both ends,
so the stages hold the GPU time of their kernels, and the peak VRAM is `torch.cuda.max_memory_allocated`
after the model build (weights) and while generating.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..checkpoint import CONFIG_KEY, NOTE_KEY, load_net, net_shapes
from ..config import PRECISIONS, REGIONS, SD_VAE, FaceLocatorConfig, NetConfig, SamplingConfig, UNetConfig
from ..models import EmoCASTNet
from ..pipeline import AudioWindows, Emotion, Portrait, Vae, decode_frames, diffusers_vae, iter_clips
from ..sampling import SCHEDULERS, check_settings
from .fill import fill_tensor
from .tiny import TINY_NET, TINY_SEED, TINY_VAE, filled_net, filled_vae

GB = 1e9


@dataclass(frozen=True)
class BenchConfig:
    name: str
    model: str  # "tiny" (fixture sizes) or "real" (released widths)
    size: int
    frames: int
    steps: int
    clips: tuple[int, ...] = (1,)
    # The experimental sampling levers (SamplingConfig), released settings by default.
    scheduler: str = "ddim"
    cfg_end: float = 1.0
    cache_interval: int = 1

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(steps=self.steps, frames_per_clip=self.frames, motion_scale=MOTION_SCALE,
                              scheduler=self.scheduler, cfg_end=self.cfg_end, cache_interval=self.cache_interval)

    def levers(self) -> str:
        """The levers that differ from the released sampler, e.g. "cfg_end 0.5", or ""."""
        return ", ".join(f"{k} {getattr(self, k)}" for k in ("scheduler", "cfg_end", "cache_interval")
                         if getattr(self, k) != getattr(BenchConfig, k))


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
# The released reference on this project's machine, 1 thread (tests/fixtures/parity/README.md §8).
REFERENCE = {
    "tiny": {"s_per_clip": 1.60, "peak_rss_gb": 0.46, "step": 0.40, "reference_unet": 0.09, "vae_decode": 0.14,
             "vae_encode": 0.05},
    "real64": {"s_per_clip": 26.5, "peak_rss_gb": 10.9, "step": 8.7, "reference_unet": 4.2, "vae_decode": 3.0,
               "vae_encode": 1.0},
}
# FLOPs of one reference clip of real64 as counted for issue 12 (6 reference rows, 3 encoded frames; ours differ).
ISSUE_GFLOP = {"real64": 650.0}
MOTION_SCALE = (0.9, 1.1, 1.25)  # the fixtures' values; any non-trivial scales cost the same
CONDITIONING = ("audio_proj", "image_proj", "face_locator", "prepare")
STAGES = ("reference_unet", "denoising_unet", "vae_encode", "vae_decode", *CONDITIONING)


class Stopwatch:
    """Wall and CPU seconds per stage name: totals, and the wall time of every call. `sync` (e.g.
    `torch.cuda.synchronize`) runs at both ends of every call, so asynchronous device work is counted."""

    def __init__(self, sync: Callable[[], None] = lambda: None) -> None:
        self.sync = sync
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.calls_cpu: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.sync()
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.sync()
            self.calls[name].append(time.perf_counter() - w)
            self.calls_cpu[name].append(time.process_time() - c)
            self.wall[name] += self.calls[name][-1]
            self.cpu[name] += self.calls_cpu[name][-1]

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args):
            with self(name):
                return fn(*args)
        return timed


class Timed:
    """Stands in for a module passed to the pipeline: attributes pass through to `inner`; calling it
    (stage `name`) or one of `methods` ({attribute: stage}) is timed. `children` replaces attributes
    by other stand-ins. `capture`, when given, keeps each stage's last arguments (for profiling)."""

    def __init__(self, inner: Any, sw: Stopwatch, name: str = "", methods: dict[str, str] | None = None,
                 children: dict[str, "Timed"] | None = None, capture: dict[str, tuple] | None = None):
        self.__dict__.update(_inner=inner, _sw=sw, _name=name, _methods=methods or {}, _children=children or {},
                             _capture=capture)

    def _run(self, stage: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
        if self._capture is not None:
            self._capture[stage] = (fn, args, kwargs)
        with self._sw(stage):
            return fn(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._run(self._name, self._inner, args, kwargs)

    def __getattr__(self, attr: str) -> Any:
        if attr in self._children:
            return self._children[attr]
        value = getattr(self._inner, attr)
        if attr in self._methods:
            return lambda *args, **kwargs: self._run(self._methods[attr], value, args, kwargs)
        return value


def timed_net(net: EmoCASTNet, sw: Stopwatch, capture: dict[str, tuple] | None = None) -> Timed:
    kids = {attr: Timed(getattr(net, attr), sw, stage, capture=capture) for attr, stage in
            (("audioproj", "audio_proj"), ("imageproj", "image_proj"), ("face_locator", "face_locator"),
             ("reference_unet", "reference_unet"))}
    kids["denoising_unet"] = Timed(net.denoising_unet, sw, "denoising_unet", {"prepare": "prepare"}, capture=capture)
    return Timed(net, sw, children=kids)


def timed_vae(vae: Vae, sw: Stopwatch) -> Vae:
    return Vae(sw.wrap("vae_encode", vae.encode), sw.wrap("vae_decode", vae.decode), vae.decode_batch)


def rss_bytes() -> int | None:
    """Current resident set size (Linux /proc; None elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except OSError:
        return None


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart Linux's RSS high-water mark (VmHWM), so that the peak of inference alone can be read
    after the model build (whose allocator slack otherwise sets the process peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int | None:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def machine_info() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__,
            "mkldnn": torch.backends.mkldnn.is_available(), "load_average": os.getloadavg(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def code_version() -> str | None:
    """The checkout's commit, `+dirty` if it has local changes (results are only comparable per version)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True)
    except OSError:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


# ----------------------------------------------------------------------------------------------- models

def build_models(model: str, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                 checkpoint: Path | None = None) -> tuple[EmoCASTNet, Vae, str]:
    """The network and the VAE on `device` in `dtype`: fill-rule weights, or the network read from
    `checkpoint` by the library's loader (a float32 .safetensors is memory-mapped on the CPU: its pages
    are read, and counted in RSS, as they are used)."""
    vae = filled_vae(TINY_VAE if model == "tiny" else SD_VAE, TINY_SEED)
    if (device.type, dtype) != ("cpu", torch.float32):  # (diffusers logs a warning on every .to())
        vae = vae.to(device, dtype)
    vae = diffusers_vae(vae)
    if checkpoint is not None:
        return load_net(checkpoint, dtype=dtype, device=device), vae, f"{checkpoint} (load_net)"
    if model == "tiny":
        return filled_net(TINY_NET, TINY_SEED).to(device, dtype), vae, "fill rule, seed 1001"
    # Filled one tensor at a time straight into `dtype` on `device`: the released network in fp32
    # would need 10 GB of host memory first.
    net = EmoCASTNet(NetConfig(), device="meta")
    net.load_state_dict({k: fill_tensor(TINY_SEED, k, v.shape).to(device, dtype)
                         for k, v in net.state_dict().items()}, assign=True)
    return net.eval(), vae, "fill rule, seed 1001, meta-device build; sd-vae-ft-mse-shaped VAE"


def device_sync(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA runs asynchronously); nothing to wait for on the CPU."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def write_checkpoint(path: Path, config: NetConfig, seed: int = TINY_SEED) -> None:
    """The fill rule's network of `config` as a float32 .safetensors, one tensor in memory at a time
    (so the released size needs no 10 GB of RAM); written to a temporary name, then renamed."""
    shapes = net_shapes(config)
    header: dict[str, Any] = {"__metadata__": {CONFIG_KEY: config.to_json(), NOTE_KEY: (
        f"fill rule, seed {seed}: a benchmark stand-in, NOT EmoCAST (its output is noise)")}}
    sizes = {key: 4 * int(torch.Size(shape).numel()) for key, shape in shapes.items()}
    order = sorted(shapes, key=lambda key: (sizes[key] % 64 != 0, key))  # odd sizes last: the rest stays aligned
    offset = 0
    for key in order:
        header[key] = {"dtype": "F32", "shape": list(shapes[key]), "data_offsets": [offset, offset + sizes[key]]}
        offset += sizes[key]
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 64)  # tensors on 64-byte boundaries of the mapping, as torch allocates
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for key in order:
                f.write(fill_tensor(seed, key, shapes[key]).contiguous().numpy().tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Inputs:
    portrait: Portrait
    audio: AudioWindows
    emotion: Emotion


def make_inputs(cfg: NetConfig, size: int, frames: int, clips: int, seed: int = 2001) -> Inputs:
    """Random inputs with the shapes of the preprocessing outputs (one emotion prompt)."""
    g = torch.Generator().manual_seed(seed)
    h = size // 8
    masks = {r: [torch.rand((h >> lvl) ** 2, generator=g) for lvl in range(len(cfg.unet.block_out_channels))]
             for r in REGIONS}
    portrait = Portrait(torch.rand(3, size, size, generator=g) * 2 - 1,
                        torch.randn(cfg.image_proj.embedding_dim, generator=g), torch.rand(3, size, size, generator=g),
                        masks)
    ap, d = cfg.audio_proj, cfg.unet.cross_attention_dim
    audio = AudioWindows(torch.randn(clips * frames, ap.window, ap.layers, ap.channels, generator=g), clips * frames)
    return Inputs(portrait, audio, Emotion(torch.randn(1, 77, d, generator=g), torch.randn(1, 77, d, generator=g)))


# ----------------------------------------------------------------------------------------------- timing

def time_clips(net: EmoCASTNet, vae: Vae, inp: Inputs, settings: SamplingConfig,
               sync: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """The real generator, consumed and dropped clip by clip: per clip seconds (wall, CPU), seconds per
    stage, the denoising-UNet call of every step, and RSS after the clip."""
    sw = Stopwatch(sync)
    clips = []
    wall, cpu = time.perf_counter(), time.process_time()
    seen: dict[str, float] = {}
    seen_cpu: dict[str, float] = {}
    calls = 0
    for result in iter_clips(timed_net(net, sw), timed_vae(vae, sw), inp.portrait, inp.audio, inp.emotion, settings):
        frames = int(result.frames.shape[0])
        del result  # a consumer that writes frames out keeps nothing of the clip
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        stages = {k: sw.wall[k] - seen.get(k, 0.0) for k in STAGES}
        stages["conditioning"] = sum(stages[k] for k in CONDITIONING)
        stages["other"] = now_wall - wall - sum(stages[k] for k in STAGES)
        stages_cpu = {k: sw.cpu[k] - seen_cpu.get(k, 0.0) for k in STAGES}
        stages_cpu["conditioning"] = sum(stages_cpu[k] for k in CONDITIONING)
        stages_cpu["other"] = now_cpu - cpu - sum(stages_cpu[k] for k in STAGES)
        clips.append({"total": now_wall - wall, "cpu": now_cpu - cpu, "stages": stages, "stages_cpu": stages_cpu,
                      "frames": frames, "steps": sw.calls["denoising_unet"][calls:],
                      "steps_cpu": sw.calls_cpu["denoising_unet"][calls:], "rss": rss_bytes()})
        seen, seen_cpu = {k: sw.wall[k] for k in STAGES}, {k: sw.cpu[k] for k in STAGES}
        calls = len(sw.calls["denoising_unet"])
        wall, cpu = time.perf_counter(), time.process_time()
    return clips


# ----------------------------------------------------------------------------------------------- floor

# (rows, inner, outer): a large product, and the small-row products of real64's deep levels with cold weights.
GEMM_SHAPES = {"large": (4096, 1024, 1024), "real64 32 rows": (32, 1280, 10240), "real64 8 rows": (8, 1280, 1280)}


def gemm_rates(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
               seconds: float = 1.0) -> dict[str, dict[str, float]]:
    """This machine's GEMM rate (GFLOP/s, wall and CPU) in `dtype` on `device` at the current thread
    count, as the model's linear layers compute: `F.linear(x, W)`. Small-row products cycle through
    256 MB of weights, so that each call reads its weight from memory as the network's deep layers do."""
    sync = device_sync(device)
    out = {}
    for name, (m, k, n) in GEMM_SHAPES.items():
        count = 1 if m >= 1024 else max(2, 256_000_000 // (4 * k * n))
        g = torch.Generator().manual_seed(0)
        weights = [torch.randn(n, k, generator=g).to(device, dtype) for _ in range(count)]
        x = torch.randn(m, k, generator=g).to(device, dtype)
        torch.nn.functional.linear(x, weights[0])
        best_wall, best_cpu, calls = float("inf"), float("inf"), 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or calls < 3:
            sync()
            w, c = time.perf_counter(), time.process_time()
            torch.nn.functional.linear(x, weights[calls % count])
            sync()
            best_wall, best_cpu = min(best_wall, time.perf_counter() - w), min(best_cpu, time.process_time() - c)
            calls += 1
        flop = 2 * m * k * n
        out[name] = {"wall": flop / best_wall / 1e9, "cpu": flop / max(best_cpu, 1e-9) / 1e9}
    return out


def count_flops(net: EmoCASTNet, vae: Vae, inp: Inputs, settings: SamplingConfig, clips: int) -> list[float]:
    """FLOPs of each of the first `clips` clips (matrix products, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    generator = iter_clips(net, vae, inp.portrait, inp.audio, inp.emotion, settings)
    for _ in range(clips):
        with FlopCounterMode(display=False) as counter:
            next(generator)
        counts.append(float(counter.get_total_flops()))
    generator.close()
    return counts


# ----------------------------------------------------------------------------------------------- profile

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
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    fn()
    plain = time.perf_counter() - start
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


def clip0_calls(net: EmoCASTNet, vae: Vae, inp: Inputs, settings: SamplingConfig) -> dict[str, Callable[[], Any]]:
    """The network calls clip 0 of the real pipeline made, each replayable with the arguments it used, and
    the VAE decode of one batch of frames."""
    capture: dict[str, tuple] = {}
    clip0 = iter_clips(timed_net(net, Stopwatch(), capture), vae, inp.portrait, inp.audio, inp.emotion, settings)
    next(clip0)
    clip0.close()
    h = inp.portrait.pixels.shape[-1] // 8
    latents = torch.randn(min(settings.frames_per_clip, vae.decode_batch), 4, h, h)

    def replay(stage: str) -> Callable[[], Any]:
        fn, args, kwargs = capture[stage]
        return lambda: fn(*args, **kwargs)

    size = inp.portrait.pixels.shape[-1]
    pixels = torch.rand(1 + settings.motion_frames, 3, size, size) * 2 - 1  # the reference frames of a clip
    return {"denoising_step": replay("denoising_unet"), "reference_unet": replay("reference_unet"),
            "prepare": replay("prepare"), "vae_encode": lambda: vae.encode(pixels),
            "vae_decode": lambda: decode_frames(vae, latents)}


def profiles(net: EmoCASTNet, vae: Vae, inp: Inputs, settings: SamplingConfig) -> dict[str, Any]:
    """Profile the calls clip 0 of the real pipeline made, replayed with the arguments it used."""
    calls = clip0_calls(net, vae, inp, settings)
    with torch.no_grad():
        return {name: profile_call(fn) for name, fn in calls.items()}


class TensorMemory(TorchDispatchMode):
    """Bytes of the tensors the operations inside the mode allocate: live now, and the peak. A storage
    counts from the operation that makes it until it is freed (views and in-place results add nothing),
    so the figure is the call's own tensors whatever the allocator caches, on the CPU as on CUDA;
    workspace that kernels take outside the dispatcher (e.g. cuDNN's) is not included."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if storage is not None and id(storage) not in inputs and storage not in self.seen:
                self.seen[storage] = True
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, storage.nbytes())
        return out


DATA_DEPENDENT = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                  torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default)


class DataDependentRecord(TorchDispatchMode):
    """The results of the operations whose output depends on values (`.item()`, `bool()`, `nonzero`), in
    order, from a real run."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[tuple[Any, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in DATA_DEPENDENT:
            self.answers.append((func, tuple(out.shape) if isinstance(out, torch.Tensor) else out))
        return out


class MetaRun(TorchDispatchMode):
    """Runs on the meta device what needs values: the data-dependent operations get the answers a real run
    of the same calls gave (`DataDependentRecord`), copies to the CPU come back uninitialised."""

    def __init__(self, answers: list[tuple[Any, Any]]) -> None:
        super().__init__()
        self.answers = list(answers)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DATA_DEPENDENT:
            recorded, answer = self.answers.pop(0)
            if recorded is not func:
                raise RuntimeError(f"the meta run took another path than the recorded one: {func}, not {recorded}")
            return torch.empty(answer, dtype=torch.long, device="meta") if isinstance(answer, tuple) else answer
        if func is torch.ops.aten._to_copy.default and args[0].is_meta and kwargs.get("device") == torch.device("cpu"):
            return torch.empty(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        return func(*args, **kwargs)


class FusedAttention(TorchFunctionMode):
    """Attention on the meta device as the fused kernel CUDA runs (flash / memory-efficient): only its output
    is allocated, not the (L, L) weights of the math fallback that meta tensors would take."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].is_meta:
            q, v = args[0], args[2]
            return q.new_empty(*q.shape[:-1], v.shape[-1])
        return func(*args, **(kwargs or {}))


def tensor_memory_meta(bc: BenchConfig, settings: SamplingConfig, dtype: torch.dtype) -> dict[str, Any]:
    """`tensor_memory` of the configuration's network on the meta device, where nothing is computed, at any
    size. The values its data-dependent operations need come from a real run of the same calls at 64 px
    (they depend on the frames and the structure of the inputs only); for the released network that run
    takes the released layout at narrow widths."""
    from diffusers import AutoencoderKL

    config, vae_config = (TINY_NET, TINY_VAE) if bc.model == "tiny" else (NetConfig(), SD_VAE)
    narrow = config if bc.model == "tiny" else NetConfig(
        unet=replace(UNetConfig(), block_out_channels=(32, 64, 128, 128)),
        face_locator=replace(FaceLocatorConfig(), out_channels=32))
    record = DataDependentRecord()
    with record:
        tensor_memory(filled_net(narrow, TINY_SEED), diffusers_vae(filled_vae(vae_config, TINY_SEED)),
                      make_inputs(narrow, 64, bc.frames, 1), settings)
    net = EmoCASTNet(config, device="meta", dtype=dtype).eval()
    with torch.device("meta"):
        vae = diffusers_vae(AutoencoderKL(**vae_config).to(dtype))
    with MetaRun(record.answers), FusedAttention():
        return tensor_memory(net, vae, make_inputs(config, bc.size, bc.frames, 1), settings)


def tensor_memory(net: EmoCASTNet, vae: Vae, inp: Inputs, settings: SamplingConfig) -> dict[str, Any]:
    """Peak tensor bytes of each call of clip 0 (replayed under `TensorMemory`), and the bytes its result
    keeps (the reference features, the clip context, the denoising output)."""
    out: dict[str, Any] = {"weights": sum(p.numel() * p.element_size() for p in net.parameters()),
                           "decode_batch": min(settings.frames_per_clip, vae.decode_batch)}
    with torch.no_grad():
        for name, fn in clip0_calls(net, vae, inp, settings).items():
            with TensorMemory() as mem:
                result = fn()
            out[name] = {"peak": mem.peak, "kept": mem.live}
            del result
    return out


# ----------------------------------------------------------------------------------------------- child

def run_child(bc: BenchConfig, clips: int, runs: int, threads: int, profile: bool, device: str = "cpu",
              dtype: str = "fp32", memory: bool = False, checkpoint: Path | None = None) -> dict[str, Any]:
    torch.set_num_threads(threads)  # the benchmark's own process: the library never sets it
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    settings = bc.sampling()
    if dev.type == "meta":  # nothing runs there to be timed: tensor memory only
        return {"config": asdict(bc) | {"clips": clips}, "threads": threads, "runs": [], "device": "meta",
                "dtype": dtype, "fps": settings.fps, "motion_frames": settings.motion_frames,
                "tensor_memory": tensor_memory_meta(bc, settings, PRECISIONS[dtype])}
    rss_start = rss_bytes()
    t0 = time.perf_counter()
    net, vae, weights = build_models(bc.model, dev, PRECISIONS[dtype], checkpoint)
    build = time.perf_counter() - t0
    rss_built = rss_bytes()
    inp = make_inputs(net.config, bc.size, bc.frames, clips)
    build_peak = peak_rss_bytes()
    hwm_reset = reset_peak_rss()
    if cuda:
        vram_built = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    done = []
    for r in range(runs):
        done.append(time_clips(net, vae, inp, settings, device_sync(dev)))
        print(f"[bench] {bc.name} x{clips} run {r + 1}/{runs}: {[round(c['total'], 2) for c in done[-1]]} s/clip",
              file=sys.stderr, flush=True)
    net_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    out = {"config": asdict(bc) | {"clips": clips}, "threads": torch.get_num_threads(), "runs": done,
           "weights": weights, "build_s": build, "net_bytes": net_bytes,
           "rss_start": rss_start, "rss_built": rss_built, "peak_rss": peak_rss_bytes(), "peak_rss_build": build_peak,
           "peak_rss_inference": hwm_bytes() if hwm_reset else None, "device": str(dev), "dtype": dtype,
           "fps": settings.fps, "motion_frames": settings.motion_frames, "load_average_child": os.getloadavg()}
    if cuda:
        out |= {"gpu": torch.cuda.get_device_name(dev), "vram_built": vram_built,
                "peak_vram": torch.cuda.max_memory_allocated(dev)}
    # After the peak-RSS reading: neither the counter nor the GEMM operands belong to the pipeline.
    out["flops_per_clip"] = count_flops(net, vae, inp, settings, min(clips, 2))
    out["gemm_gflops"] = gemm_rates(dev, PRECISIONS[dtype])
    if profile:
        out["profile"] = profiles(net, vae, inp, settings)
    if memory:
        out["tensor_memory"] = tensor_memory(net, vae, inp, settings)
    return out


# ----------------------------------------------------------------------------------------------- summary

def _mm(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values)}


def summarize(child: dict[str, Any]) -> dict[str, Any]:
    """Min/median over every clip of every run: seconds per clip, per stage and per step; per clip of a
    run (the first clip of a video does less than the later ones), the best over runs; the compute
    floor of a clip at the measured GEMM rate."""
    clips = [c for run in child["runs"] for c in run]
    by_position = [[run[i] for run in child["runs"]] for i in range(len(child["runs"][0]))]
    best = [min(c["total"] for c in position) for position in by_position]
    s = {"seconds_per_clip": _mm([c["total"] for c in clips]), "cpu_seconds_per_clip": _mm([c["cpu"] for c in clips]),
         "best_seconds_by_clip": best, "best_cpu_seconds_by_clip": [min(c["cpu"] for c in p) for p in by_position],
         "mean_best_seconds_per_clip": statistics.fmean(best),
         "stages": {k: _mm([c["stages"][k] for c in clips]) for k in clips[0]["stages"]},
         "stages_cpu": {k: _mm([c["stages_cpu"][k] for c in clips]) for k in clips[0]["stages_cpu"]},
         "step": _mm([t for c in clips for t in c["steps"]]),
         "step_cpu": _mm([t for c in clips for t in c["steps_cpu"]]),
         "peak_rss_gb": child["peak_rss"] / GB, "net_gb": child["net_bytes"] / GB,
         "peak_rss_inference_gb": child["peak_rss_inference"] / GB if child.get("peak_rss_inference") else None,
         "rss_start_gb": (child["rss_start"] or 0) / GB, "rss_built_gb": (child["rss_built"] or 0) / GB,
         "build_s": child["build_s"],
         # A clip shows frames / fps seconds of video.
         "seconds_per_video_second": _mm([c["total"] * child["fps"] / c["frames"] for c in clips]),
         "vram_built_gb": child["vram_built"] / GB if "vram_built" in child else None,
         "peak_vram_gb": child["peak_vram"] / GB if "peak_vram" in child else None,
         "per_clip_seconds_last_run": [c["total"] for c in child["runs"][-1]],
         "rss_after_clip_gb": [c["rss"] / GB for c in child["runs"][-1] if c["rss"] is not None]}
    rate = child["gemm_gflops"]["large"]["wall"] * 1e9
    s["gemm_gflops"] = child["gemm_gflops"]
    s["gflop_by_clip"] = [f / 1e9 for f in child["flops_per_clip"]]
    s["floor_seconds_by_clip"] = [f / rate for f in child["flops_per_clip"]]
    name = child["config"]["name"]
    if name in ISSUE_GFLOP:
        s["floor_seconds_issue"] = ISSUE_GFLOP[name] * 1e9 / rate
    same_run = {k: v for k, v in child["config"].items() if k != "clips"} == {
        k: v for k, v in asdict(CONFIGS[name]).items() if k != "clips"} and child["threads"] == 1
    if name in REFERENCE and same_run and (child["device"], child["dtype"]) == ("cpu", "fp32"):
        # The reference costs the same for every clip; ours: the mean of a run's clips (each at its best run).
        s["reference"] = REFERENCE[name]
        s["speedup_vs_reference"] = REFERENCE[name]["s_per_clip"] / s["mean_best_seconds_per_clip"]
    return s


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


def table(results: list[dict[str, Any]]) -> str:
    cols = [("config", 10, "s"), ("on", 10, "s"), ("px", 5, "d"), ("f", 3, "d"), ("st", 3, "d"), ("clips", 6, "d"),
            ("thr", 4, "d"), ("time", 5, "s"), ("s/clip", 8, ".3f"), ("s/vsec", 8, ".3f"), ("refUNet", 8, ".3f"),
            ("step", 7, ".3f"), ("steps", 7, ".3f"), ("VAEenc", 7, ".3f"), ("VAEdec", 7, ".3f"), ("cond", 7, ".3f"),
            ("other", 7, ".3f"), ("peakGB", 7, ".2f"), ("infGB", 6, ".2f"), ("netGB", 6, ".2f"), ("VRAM", 6, ".2f"),
            ("vs ref", 7, "s")]
    lines = ["".join(f"{n:>{w}}" if i else f"{n:<{w}}" for i, (n, w, _) in enumerate(cols))]
    lines.append("-" * len(lines[0]))
    for r in results:
        c, s = r["config"], r["summary"]
        for kind, per_clip, stages, step, stat in (("wall", "seconds_per_clip", "stages", "step", "min"),
                                                   ("cpu", "cpu_seconds_per_clip", "stages_cpu", "step_cpu", "median")):
            st = {k: v[stat] for k, v in s[stages].items()}
            ratio = f"{s['speedup_vs_reference']:.2f}x" if kind == "wall" and "speedup_vs_reference" in s else ""
            seconds = s["mean_best_seconds_per_clip"] if kind == "wall" else s[per_clip][stat]
            per_vsec = seconds * r["fps"] / c["frames"]
            row = [c["name"], f"{r['device']} {r['dtype']}", c["size"], c["frames"], c["steps"], c["clips"],
                   r["threads"], kind, seconds, per_vsec, st["reference_unet"], s[step][stat],
                   st["denoising_unet"], st["vae_encode"], st["vae_decode"], st["conditioning"], st["other"],
                   s["peak_rss_gb"], s["peak_rss_inference_gb"] or float("nan"), s["net_gb"],
                   s["peak_vram_gb"] or float("nan"), ratio]
            lines.append("".join(f"{v:{'<' if i == 0 else '>'}{w}{fmt}}"
                                 for i, (v, (_, w, fmt)) in enumerate(zip(row, cols))))
    lines.append("(wall: s/clip is the mean over a run's clips of each clip's best run, stages and step the min over "
                 "clips and runs; cpu: median process CPU seconds. Stages are per clip, `step` is one "
                 "denoising-UNet call, `cond` = audio/image projections + face locator + prepare, `other` = the rest "
                 "of the clip: guidance, scheduler, glue. s/vsec: seconds per second of video (frames / fps per "
                 "clip). peakGB: process peak RSS (build included); infGB: peak RSS while generating (high-water "
                 "mark reset after the build); netGB: the network's weights; VRAM: torch.cuda.max_memory_allocated "
                 "while generating, weights included)")
    for r in results:
        levers = BenchConfig(**{**r["config"], "clips": tuple(CONFIGS[r["config"]["name"]].clips)}).levers()
        s, label = r["summary"], f"{r['config']['name']} x{r['config']['clips']} {r['threads']} thr"
        label += f" [{levers}]" if levers else ""
        if r["config"]["clips"] > 1:
            lines.append(f"{label}: s/clip, each clip's best run: "
                         + " ".join(f"{t:.2f}" for t in s["best_seconds_by_clip"]) + "; CPU s: "
                         + " ".join(f"{t:.2f}" for t in s["best_cpu_seconds_by_clip"]))
            lines.append(f"{'':>{len(label)}}  RSS GB after each clip (last run) "
                         + " ".join(f"{g:.3f}" for g in s["rss_after_clip_gb"]))
        rates = ", ".join(f"{k} {v['wall']:.0f} (CPU {v['cpu']:.0f})" for k, v in s["gemm_gflops"].items())
        floor = " ".join(f"{g:.1f} GFLOP -> {t:.2f} s" for g, t in zip(s["gflop_by_clip"], s["floor_seconds_by_clip"]))
        lines.append(f"{label}: float32 GEMM GFLOP/s {rates}; floor per clip at the large rate: {floor}"
                     + (f"; issue-12 clip ({ISSUE_GFLOP[r['config']['name']]:.0f} GFLOP) -> "
                        f"{s['floor_seconds_issue']:.2f} s" if "floor_seconds_issue" in s else ""))
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


# ----------------------------------------------------------------------------------------------- cli

def _configs(names: list[str]) -> list[str]:
    out = [n.strip() for arg in names for n in arg.split(",") if n.strip()]
    bad = [n for n in out if n not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown configuration {bad}; choose from {', '.join(CONFIGS)}")
    return out


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
    p.add_argument("--steps", type=int, help="override the denoising steps of every configuration")
    p.add_argument("--scheduler", choices=SCHEDULERS, help="experimental lever: the sampler (default ddim, released)")
    p.add_argument("--cfg-end", type=float, help="experimental lever: guidance for this fraction of the steps only")
    p.add_argument("--cache-interval", type=int,
                   help="experimental lever: a full UNet pass every N steps, shallow passes in between (DeepCache)")
    p.add_argument("--frames", type=int, help="override the frames per clip")
    p.add_argument("--size", type=int, help="override the pixel size (multiple of 64)")
    p.add_argument("--clips", help="override the clip counts of `long`, comma-separated (e.g. 1,4,16)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one denoising step, reference pass, prepare and VAE decode (torch.profiler)")
    p.add_argument("--tensor-memory", action="store_true",
                   help="also measure the peak tensor bytes of each call of clip 0 (with --runs 0: only that)")
    p.add_argument("--json", type=Path, default=Path("bench_results.json"), help="where to write the results")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-clips", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size is not None and args.size % 64:
        p.error(f"--size {args.size} is not a multiple of 64 (the latent grid must halve three times)")
    try:
        args.threads = [int(t) for t in str(args.threads).split(",")]
    except ValueError:
        p.error(f"--threads {args.threads}: give thread counts such as 1 or 1,2")
    try:
        check_settings(SamplingConfig(**{k: getattr(args, k) for k in ("scheduler", "cfg_end", "cache_interval")
                                         if getattr(args, k) is not None}))
    except ValueError as e:
        p.error(str(e))
    if args.checkpoint is not None and not args.checkpoint.is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file (write one with --write-checkpoint PATH)")
    try:
        torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device name; use cpu, cuda or cuda:N")
    if args.device == "meta" and not args.tensor_memory:
        p.error("--device meta computes nothing and only counts tensor memory: add --tensor-memory")
    return args


# BenchConfig fields the command line can set.
LEVERS = ("steps", "frames", "size", "scheduler", "cfg_end", "cache_interval")


def resolve(name: str, args: argparse.Namespace) -> BenchConfig:
    bc = CONFIGS[name]
    over = {k: getattr(args, k) for k in LEVERS if getattr(args, k) is not None}
    if args.clips and bc.clips != (1,):
        over["clips"] = tuple(int(c) for c in args.clips.split(","))
    return replace(bc, **over)


def spawn(name: str, clips: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in a fresh interpreter, so its peak RSS is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, "-m", "emocast_lib.bench", "--child", "--config", name, "--child-clips", str(clips),
               "--runs", str(args.runs), "--threads", str(threads), "--device", args.device, "--dtype",
               args.dtype, "--json", str(out)]
        for flag in LEVERS:
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if args.checkpoint is not None and CONFIGS[name].model == "real":
            cmd += ["--checkpoint", str(args.checkpoint.resolve())]
        cmd += ["--profile"] * args.profile + ["--tensor-memory"] * args.tensor_memory
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        load_before = os.getloadavg()
        done = subprocess.run(cmd, cwd=root, env=env)
        if done.returncode:
            raise SystemExit(f"benchmark child for {name} x{clips} failed with exit code {done.returncode}")
        child = json.loads(out.read_text())
    child["load_average"] = {"before": load_before, "after": os.getloadavg()}
    return child


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.write_checkpoint is not None:
        write_checkpoint(args.write_checkpoint, NetConfig())
        print(f"wrote {args.write_checkpoint}: the fill rule's released-width network (a benchmark stand-in)")
        return
    names = _configs(args.config or ["tiny"])
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: this PyTorch ({torch.__version__}) sees no CUDA GPU; run the GPU "
              "benchmark on a machine with an NVIDIA GPU and a CUDA build of PyTorch, or use --device cpu",
              file=sys.stderr)
        raise SystemExit(2)
    if args.child:
        bc = resolve(names[0], args)
        args.json.write_text(json.dumps(run_child(bc, args.child_clips, args.runs, args.threads[0], args.profile,
                                                  args.device, args.dtype, args.tensor_memory, args.checkpoint)))
        return
    results = []
    for name in names:
        for clips in resolve(name, args).clips:
            for threads in args.threads:
                child = spawn(name, clips, threads, args)
                child["summary"] = summarize(child) if child["runs"] else None
                results.append(child)
    report = {"machine": machine_info() | {"threads": args.threads, "device": args.device, "dtype": args.dtype},
              "code": code_version(), "command": sys.argv, "results": results,
              "thread_scaling": thread_scaling([r for r in results if r["summary"]])}
    args.json.write_text(json.dumps(report, indent=1))
    if any(r["summary"] for r in results):
        print(table([r for r in results if r["summary"]]))
    if args.profile:
        print(profile_table(results))
    if args.tensor_memory:
        print(memory_table(results))
    load = ", ".join(f"{x:.1f}" for x in report["machine"]["load_average"])
    gpu = f", GPU {report['machine']['gpu']}" if torch.device(args.device).type == "cuda" else ""
    threads = ",".join(map(str, args.threads))
    print(f"\ncode {report['code']}; {report['machine']['cpu_count']} CPUs{gpu}, torch {torch.__version__}, "
          f"{threads} thread(s), load average {load} (wall times are inflated when it exceeds the threads); "
          f"results in {args.json}")

