"""Peak tensor bytes of each call of clip 0 (`--tensor-memory`), counted by a dispatch mode, on the CPU, on
CUDA, or on the meta device (which computes nothing, so any size fits here)."""
from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..config import SD_VAE, FaceLocatorConfig, NetConfig, SamplingConfig, UNetConfig
from ..models import EmoCASTNet
from ..pipeline import Vae, diffusers_vae
from .configs import BenchConfig
from .stages import clip0_calls
from .tiny import TINY_NET, TINY_SEED, TINY_VAE, filled_net, filled_vae
from .workload import Inputs, make_inputs


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
