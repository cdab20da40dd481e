"""The library pipeline in fp16 and bf16, and on a second device, on the CPU.

fp16/bf16: the tiny pipeline runs with the network and the VAE in that dtype, every module of the
network computes in it (no tensor silently promoted to fp32 by an fp32 one it meets), and the video
stays close to the fp32 run's.

Second device: no accelerator exists here, so the `meta` device stands in for one (`StandInDevice`):
the network's weights live there, a real CPU copy of every tensor on it does the arithmetic, and an
operation that mixes a CPU tensor with one on the stand-in fails as it does on CUDA. The pipeline
must move everything it creates to the network's device itself.
"""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from tiny_run import run_tiny
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from emocast_lib.bench.tiny import filled_net, filled_vae
from emocast_lib.pipeline import diffusers_vae


@pytest.fixture(scope="module")
def fp32_run() -> tuple[torch.Tensor, torch.Tensor]:
    return run_tiny(filled_net(), diffusers_vae(filled_vae()))


def _rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


def _output_dtypes(net: torch.nn.Module) -> tuple[set[torch.dtype], list]:
    """Every floating dtype the network's modules return while hooked (forward hooks)."""
    seen: set[torch.dtype] = set()

    def record(module, args, output):
        seen.update(t.dtype for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point())

    return seen, [m.register_forward_hook(record) for m in net.modules()]


# Measured on this CPU (2 clips of 2 steps at 64 px; the fp32 latents' std is 1.51, the frames' 0.28;
# an uncorrelated video would differ by about 2.1 and 0.4 rms). The random fill-rule network amplifies
# rounding strongly: fp32 alone differs by 6.8e-4 between two orders of the same sums (test_models).
#   bf16: latents max 1.12, rms 0.188; frames max 0.357, rms 0.039
#   fp16: latents max 0.206, rms 0.046; frames max 0.130, rms 0.011
# Tolerances are twice the measured values (other CPUs round some kernels differently).
@pytest.mark.parametrize("dtype,latents_tol,frames_tol", [
    (torch.bfloat16, (2.24, 0.38), (0.72, 0.078)),
    (torch.float16, (0.42, 0.092), (0.26, 0.022)),
], ids=["bf16", "fp16"])
def test_low_precision_pipeline_close_to_fp32(fp32_run, dtype: torch.dtype, latents_tol: tuple[float, float],
                                              frames_tol: tuple[float, float]):
    net = filled_net().to(dtype)
    with warnings.catch_warnings():  # diffusers suggests from_pretrained(torch_dtype=...), which needs files
        warnings.filterwarnings("ignore", message="There are modules in AutoencoderKL")
        vae = diffusers_vae(filled_vae().to(dtype))
    seen, hooks = _output_dtypes(net)
    latents, frames = run_tiny(net, vae)
    for hook in hooks:
        hook.remove()
    assert seen == {dtype}, f"modules of the {dtype} network returned {seen}"
    assert latents.dtype == frames.dtype == torch.float32  # results are handed out in fp32 on the CPU
    for name, ours, ref, (max_tol, rms_tol) in (("latents", latents, fp32_run[0], latents_tol),
                                                ("frames", frames, fp32_run[1], frames_tol)):
        d = (ours - ref).abs()
        assert d.max().item() <= max_tol and _rms(d) <= rms_tol, \
            f"{dtype} {name}: max {d.max().item():.3g} (tol {max_tol}), rms {_rms(d):.3g} (tol {rms_tol})"


class StandInDevice(TorchDispatchMode):
    """The `meta` device as a stand-in accelerator, for the tensors created or moved there inside the mode.

    Each meta storage is paired with a real CPU storage that the operations actually run on, so data-
    dependent code (`.item()`, `nonzero`) works and results can be compared. As on CUDA, a CPU tensor
    may meet a stand-in tensor only as a 0-d scalar or as the index of an indexing operation; anything
    else raises. Moving a stand-in tensor to the CPU (`.cpu()`, `.to("cpu")`) returns its real data.
    """

    META, CPU = torch.device("meta"), torch.device("cpu")
    INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)

    def __init__(self) -> None:
        super().__init__()
        self.storage = WeakIdKeyDictionary()  # meta storage -> CPU storage holding its data

    def _real(self, t: Any) -> Any:
        if not (isinstance(t, torch.Tensor) and t.is_meta):
            return t
        real = self.storage.get(t.untyped_storage())
        if real is None:
            raise RuntimeError(f"a {tuple(t.shape)} tensor on the stand-in device was made outside it")
        return torch.empty(0, dtype=t.dtype).set_(real, t.storage_offset(), t.shape, t.stride())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        remote = [t for t in tensors if t.is_meta]
        if not remote and kwargs.get("device") != self.META:
            return func(*args, **kwargs)
        local = [t for t in tensors if not t.is_meta and t.dim() > 0]
        indices_only = func in self.INDEXING and args[0].is_meta and all(t is not args[0] for t in local)
        if remote and local and not indices_only:
            raise RuntimeError(f"{func}: CPU tensors {[tuple(t.shape) for t in local]} meet tensors on the "
                               f"network's device {[tuple(t.shape) for t in remote]}")
        real_args, real_kwargs = tree_map(self._real, (args, kwargs))
        if kwargs.get("device") == self.META:
            real_kwargs["device"] = self.CPU
        out = func(*real_args, **real_kwargs)
        if kwargs.get("device") == self.CPU or not isinstance(out, (torch.Tensor, tuple, list)):
            return out  # moved to the CPU, or a Python number
        if any(r.alias_info is not None for r in func._schema.returns):
            meta_out = func(*args, **kwargs)  # a view or an in-place result: the meta kernel keeps the aliasing
        else:
            meta_out = tree_map(lambda r: torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=self.META)
                                if isinstance(r, torch.Tensor) else r, out)
        for m, r in zip(tree_flatten(meta_out)[0], tree_flatten(out)[0]):
            if isinstance(m, torch.Tensor) and m.untyped_storage() not in self.storage:
                self.storage[m.untyped_storage()] = r.untyped_storage()
        return meta_out


def test_stand_in_device_rejects_mixed_devices():
    with StandInDevice():
        weight = torch.ones(3, 3).to("meta")
        assert torch.equal((weight * 2).sum(0).cpu(), torch.full((3,), 6.0))  # real arithmetic
        assert (weight * torch.tensor(2.0)).cpu().sum().item() == 18  # a 0-d CPU tensor is a scalar
        with pytest.raises(RuntimeError, match="CPU tensors"):
            weight + torch.ones(3, 3)
        with pytest.raises(RuntimeError, match="CPU tensors"):
            torch.cat([weight, torch.zeros(1, 3)])


@pytest.mark.slow
def test_pipeline_on_a_stand_in_device():
    """The network on the stand-in device (the VAE stays on the CPU, as the adapters allow), with an emotion
    per frame: every tensor the pipeline, the sampler and the network create meets the weights on their
    device, and the video equals the CPU run's (the stand-in takes the network's non-CPU paths: library
    convolutions instead of the small-grid GEMMs, the attention's math kernel; measured max difference 7.8e-4)."""
    vae = diffusers_vae(filled_vae())
    expected_latents, expected_frames = run_tiny(filled_net(), vae, steps=1, per_frame_emotion=True)
    net = filled_net()
    with StandInDevice():
        net.to("meta")
        assert all(p.is_meta for p in net.parameters())
        latents, frames = run_tiny(net, vae, steps=1, per_frame_emotion=True)
    torch.testing.assert_close(latents, expected_latents, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(frames, expected_frames, rtol=2e-3, atol=2e-3)
