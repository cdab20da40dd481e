"""EmoCAST Model Loader (wav2vec2 comes from core's Load Audio Encoder, see nodes/audio.py)."""
from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import torch
from comfy_api.latest import io

from emocast_lib import layout
from emocast_lib.config import PRECISIONS, STORAGE_FORMATS
from emocast_lib.jobs.schema import ModelSettings, widget

from . import paths
from .sockets import EmoCASTModel
from .types import EmoCASTInputError


def weight_and_compute_dtypes(precision: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """fp16/bf16/fp32: weights and computation in that precision. auto: ComfyUI's choice for a diffusion model
    on `device` (its --fp16-unet/--bf16-unet/--fp32-unet flags included), where weights stored in one dtype may
    be cast to another per layer to compute."""
    if precision != "auto":
        return PRECISIONS[precision], PRECISIONS[precision]
    supported = list(PRECISIONS.values())
    weight = mm.unet_dtype(device, supported_dtypes=supported)
    if weight not in supported:
        raise EmoCASTInputError(f"precision: ComfyUI's diffusion-model flags ask for {weight}, which EmoCAST does "
                                f"not run in; choose {', '.join(PRECISIONS)} instead of auto")
    return weight, mm.unet_manual_cast(weight, device, supported) or weight


# The weight_dtype choices of core's Load Diffusion Model -> the library's storage format for the linear/conv weights
# (ModelSettings.weight_dtype, the CLI's choices); fp8_e4m3fn_fast is ComfyUI's fp8 matrix multiply on top.
WEIGHT_DTYPES = {"default": "default", "fp8_e4m3fn": "fp8_e4m3fn", "fp8_e4m3fn_fast": "fp8_e4m3fn",
                 "fp8_e5m2": "fp8_e5m2"}


def storage_format(weight_dtype: str, device: torch.device) -> str:
    """The library's storage format for a weight_dtype choice; refused where ComfyUI says `device` cannot cast it
    (Apple's MPS and DirectML have no fp8)."""
    stored = WEIGHT_DTYPES[weight_dtype]
    if stored != "default" and not mm.supports_cast(device, STORAGE_FORMATS[stored]):
        raise EmoCASTInputError(f"weight_dtype: {weight_dtype} weights cannot be used on {device} (no fp8 there); "
                                "choose default")
    return stored


def casting_operations(weight_dtype: str, device: torch.device) -> type:
    """ComfyUI's casting layers; for fp8_e4m3fn_fast its fp8 ones (linear layers multiply in fp8, input clamped to
    +-448) where `device` has fp8 matrix units, as core's loader picks them."""
    if weight_dtype != "fp8_e4m3fn_fast":
        return comfy.ops.manual_cast
    if mm.supports_fp8_compute(device):
        return comfy.ops.fp8_ops
    logging.getLogger("emocast").warning("EmoCAST Model Loader: %s has no fp8 matrix multiply, so fp8_e4m3fn_fast "
                                         "runs as fp8_e4m3fn (weights cast per layer)", device)
    return comfy.ops.manual_cast


def compute_dtype(model: comfy.model_patcher.ModelPatcher) -> torch.dtype:
    """The dtype the network computes in: the manual-cast dtype the loader set where it differs from the
    weights' (ComfyUI's convention), else that of the weights."""
    return model.object_patches.get("manual_cast_dtype") or next(model.model.parameters()).dtype


class ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EmoCASTModelLoader",
            display_name="EmoCAST Model Loader",
            category="EmoCAST",
            description="Loads the EmoCAST network (both UNets, face locator, identity and audio projections) "
                        "from models/emocast. Pickled .pth files are read without running code from them.",
            inputs=[
                io.Combo.Input("checkpoint", options=paths.checkpoints(),
                               tooltip=f"EmoCAST network in models/{paths.FOLDER}: the released net.pth or a "
                                       f".safetensors made by `python -m emocast_lib convert`. Download: "
                                       f"{layout.NET.source}"),
                io.Combo.Input("precision", **widget("precision", ModelSettings),
                               tooltip="auto: what ComfyUI picks for diffusion models on this device (fp16 or "
                                       "bf16 on most GPUs, fp32 on the CPU; --fp16-unet/--bf16-unet/--fp32-unet "
                                       "apply). fp16/bf16/fp32: weights and computation in that precision."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), optional=True,
                               default=widget("weight_dtype", ModelSettings)["default"],
                               tooltip="How the linear and convolution weights (all but 0.1% of the network) are "
                                       "kept. default: in the precision above. fp8_e4m3fn / fp8_e5m2: 8-bit floats, "
                                       "half of fp16's memory (2.5 GB of weights instead of 5 GB, so the whole "
                                       "network fits an 8 GB card), each layer computing with its weights cast to "
                                       "the precision above; e4m3fn is the closer, e5m2 has the wider range. "
                                       "fp8_e4m3fn_fast: fp8_e4m3fn multiplied in fp8 on GPUs with fp8 matrix "
                                       "units (NVIDIA Ada, Hopper and newer), faster and slightly less exact; "
                                       "elsewhere the same as fp8_e4m3fn. Norms and biases keep the precision above."),
            ],
            outputs=[EmoCASTModel.Output("model", display_name="model",
                                         tooltip="The EmoCAST network, managed by ComfyUI like its own models: "
                                                 "loaded to the GPU for sampling, partly kept in RAM and streamed "
                                                 "when VRAM is short, offloaded when other models need the "
                                                 "memory.")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint: str) -> bool | str:
        if checkpoint not in paths.checkpoints():
            return paths.missing_checkpoint(checkpoint)
        return True

    @classmethod
    def execute(cls, checkpoint: str, precision: str, weight_dtype: str = "default") -> io.NodeOutput:
        from emocast_lib.checkpoint import STEPS_KEY, load_net, read_metadata

        path = paths.checkpoint_path(checkpoint)
        load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
        stored = storage_format(weight_dtype, load_device)
        weight, compute = weight_and_compute_dtypes(precision, load_device)
        # ComfyUI's casting layers, casting on every call as the dynamic VRAM patcher makes every layer do: the
        # weights may stay in RAM (partial loading) or in another dtype, and a layer whose weight already is
        # where and what its input is takes it as it is. A network that always casts computes the same whether
        # ComfyUI loads it whole or in part (the library's own-weight fast paths are for plain torch layers).
        net = load_net(path, dtype=weight, device=offload_device, weight_dtype=stored,
                       operations=casting_operations(weight_dtype, load_device))
        net.requires_grad_(False)
        # As on core's models (BaseModel): the patcher's compute-dtype patch replaces it (ComfyUI 0.3.64 requires the
        # attribute to exist), and newer loaders size the cast buffers of offloaded fp8 weights by it.
        net.manual_cast_dtype = None
        # The newest patcher this ComfyUI has: main.py rebinds CoreModelPatcher to the dynamic VRAM patcher at
        # start-up, so it is looked up now; ComfyUI 0.3.64 has only ModelPatcher.
        patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
        model = patcher_class(net, load_device=load_device, offload_device=offload_device)
        if compute != weight or weight_dtype != "default":  # (fp8 weights: the compute dtype is the norms')
            model.set_model_compute_dtype(compute)
        declared = read_metadata(path).get(STEPS_KEY, "")
        if declared.isdigit() and int(declared) > 0:  # the sampler's steps 0 means this count
            model.model_options[STEPS_KEY] = int(declared)
        return io.NodeOutput(model)
