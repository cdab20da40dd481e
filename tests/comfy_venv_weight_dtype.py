"""EmoCAST Model Loader's `weight_dtype` inside a real ComfyUI: the linear/conv weights stored in fp8 in
ComfyUI's own casting layers, computed in the model's compute dtype, sampled through the nodes, whole and
partially loaded. On tiny stand-in models (`make-tiny-models`, NOT a real model). Runs in the ComfyUI venv with
COMFY_DIR set, as tests/comfy_venv_nodes.py (tests/test_comfy_venv.py launches it); skipped otherwise.
"""
from __future__ import annotations

import logging

import comfy_venv_nodes
import pytest
import torch

# Importing comfy_venv_nodes puts ComfyUI on sys.path, or skips this module where it is not importable. Its
# fixtures: comfy_executor runs every node under inference mode as ComfyUI's executor does; `inputs` are what the
# shipped workflow feeds the sampler (the model: precision auto, weight_dtype default).
comfy_executor, models, inputs = comfy_venv_nodes.comfy_executor, comfy_venv_nodes.models, comfy_venv_nodes.inputs

import comfy.model_management as mm
import comfy.ops
from comfy_venv_models import with_free_gpu_memory

import nodes as comfy_nodes  # ComfyUI's own nodes.py (the pack's are imported as emocast_pack_nodes)
from emocast_lib.config import STORAGE_FORMATS
from emocast_lib.jobs.schema import ModelSettings, widget
from emocast_lib.models.ops import large_weights
from packimport import pack_module

nodes_loaders, nodes_sampler = pack_module("loaders"), pack_module("sampler")
FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def load(weight_dtype: str, precision: str = "auto"):
    return nodes_loaders.ModelLoader.execute("net.pth", precision, weight_dtype)[0]


def state_bytes(model, keys) -> int:
    state = model.model.state_dict()
    return sum(state[k].nbytes for k in keys)


def test_weight_dtype_is_cores_choice_as_an_optional_last_input():
    """The choices of core's Load Diffusion Model, after the inputs a saved workflow already has values for."""
    schema = nodes_loaders.ModelLoader.define_schema()
    last = schema.inputs[-1]
    assert [i.id for i in schema.inputs] == ["checkpoint", "precision", "weight_dtype"]
    assert last.optional and last.default == "default" and last.tooltip
    core = comfy_nodes.UNETLoader.INPUT_TYPES()["required"]["weight_dtype"][0]
    assert list(last.options) == list(core) == ["default", *FP8]
    library = widget("weight_dtype", ModelSettings)  # the CLI's and batch's choices: all but ComfyUI's fp8 matmul
    assert library["options"] == [o for o in last.options if o != "fp8_e4m3fn_fast"]
    assert last.default == library["default"]


def test_fp8_on_a_device_without_fp8_is_one_line(models, monkeypatch):
    """ComfyUI's own answer decides (model_management.supports_cast: no fp8 on Apple's MPS or DirectML); no such
    device here, so that answer stands in for one."""
    monkeypatch.setattr(mm, "supports_cast", lambda device, dtype: dtype not in FP8.values())
    with pytest.raises(nodes_loaders.EmoCASTInputError, match="^weight_dtype: fp8_e5m2 weights cannot be used on "
                                                              r"cpu \(no fp8 there\); choose default$"):
        load("fp8_e5m2")
    assert next(load("default").model.parameters()).dtype == torch.float32  # default weights still load


@pytest.mark.parametrize("weight_dtype", list(FP8))
def test_fp8_weights_in_comfyuis_casting_layers(inputs, weight_dtype, caplog):
    """Linear/conv weights in fp8 (a quarter of the fp32 bytes: precision auto is fp32 on the CPU), norms and
    biases in fp32, every layer one of ComfyUI's casting layers (fp8_e4m3fn_fast: its manual-cast ones here,
    with a warning, as the CPU has no fp8 matrix multiply), computing in fp32. The frames equal those of the
    fp32 model whose weights were rounded to fp8 (both cast in the same layers, so bit for bit)."""
    with caplog.at_level(logging.WARNING, logger="emocast"):
        model = load(weight_dtype)
    assert ("no fp8 matrix multiply" in caplog.text) == (weight_dtype == "fp8_e4m3fn_fast")
    net, default = model.model, inputs["model"].model
    large = large_weights(net)
    state = net.state_dict()
    assert {state[k].dtype for k in large} == {FP8[weight_dtype]}
    assert {v.dtype for k, v in state.items() if k not in large} == {torch.float32}
    assert state_bytes(model, large) * 4 == state_bytes(inputs["model"], large)
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert all(isinstance(m, (comfy.ops.manual_cast.Linear, comfy.ops.manual_cast.Conv2d)) for m in layers)
    assert not any(isinstance(m, comfy.ops.fp8_ops.Linear) for m in layers)
    assert nodes_loaders.compute_dtype(model) == torch.float32

    mm.unload_all_models()
    frames = nodes_sampler.Sampler.execute(**{**inputs, "model": model})[0]
    rounded = load("default")
    for k in large:
        rounded.model.state_dict()[k].copy_(default.state_dict()[k].to(FP8[weight_dtype]).float())
    expected = nodes_sampler.Sampler.execute(**{**inputs, "model": rounded})[0]
    full = nodes_sampler.Sampler.execute(**inputs)[0]
    mm.unload_all_models()
    assert frames.dtype == torch.float32 and frames.shape == full.shape
    assert torch.equal(frames, expected)
    assert not torch.equal(frames, full)


def test_fp8_weights_partially_loaded_make_the_same_clip(inputs, monkeypatch):
    """ComfyUI's partial loading (part of the weights on the load device, the rest cast on use from the offload
    device) with fp8 weights gives the whole load's frames. The budget leaves room for ComfyUI 0.33's cast
    buffers: it reserves the compute-dtype (fp32) copy of offloaded fp8 weights, 4x their size, so with a third
    of the model's bytes it would load none of it."""
    model = load("fp8_e4m3fn")
    mm.unload_all_models()
    whole = nodes_sampler.Sampler.execute(**{**inputs, "model": model})[0]
    mm.unload_all_models()
    budget = model.model_size() * 3 // 4
    with_free_gpu_memory(model, budget, monkeypatch)
    try:
        partial = nodes_sampler.Sampler.execute(**{**inputs, "model": model})[0]
        assert model.model.model_lowvram and 0 < model.loaded_size() <= budget < model.model_size()
    finally:
        mm.unload_all_models()
    assert torch.equal(partial, whole)


def test_fp8_weights_with_fp16_computation(inputs):
    """precision fp16 + fp8 weights (what a GPU runs): norms and biases in fp16, linear/conv weights in fp8 at
    half of the fp16 model's bytes, computation in fp16, frames close to fp32's."""
    half, model = load("default", "fp16"), load("fp8_e4m3fn", "fp16")
    large = large_weights(model.model)
    state = model.model.state_dict()
    assert {v.dtype for k, v in state.items() if k not in large} == {torch.float16}
    assert {state[k].dtype for k in large} == {STORAGE_FORMATS["fp8_e4m3fn"]}
    assert state_bytes(model, large) * 2 == state_bytes(half, large)
    assert nodes_loaders.compute_dtype(model) == torch.float16
    mm.unload_all_models()
    frames = nodes_sampler.Sampler.execute(**{**inputs, "model": model})[0]
    full = nodes_sampler.Sampler.execute(**inputs)[0]
    mm.unload_all_models()
    assert frames.dtype == torch.float32 and bool(torch.isfinite(frames).all())
    # frames in [0, 1]; measured (both ComfyUI versions): mean |difference| 0.030 (fp8_e4m3fn weights in fp32:
    # 0.030, fp8_e5m2: 0.046); fp8 rounding dominates and is the same on every CPU, so the bound is 1.5x
    assert (frames - full).abs().mean() <= 0.045
