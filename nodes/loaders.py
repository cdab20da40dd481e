"""EmoCAST Model Loader (wav2vec2 comes from core's Load Audio Encoder, see nodes/audio.py)."""
from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from emocast_lib import layout

from . import paths
from .sockets import Model

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision != "auto":
        return PRECISIONS[precision]
    if mm.should_use_fp16(device):
        return torch.float16
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


def managed(module: torch.nn.Module) -> ModelPatcher:
    """Hand a plain torch module to ComfyUI's memory manager (loaded whole: no low-VRAM casting)."""
    return ModelPatcher(module, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


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
                io.Combo.Input("precision", options=["auto", *PRECISIONS], default="auto",
                               tooltip="Weight precision. auto: fp16 (or bf16) where the GPU supports it, "
                                       "fp32 on the CPU."),
            ],
            outputs=[Model.Output("model", display_name="model",
                                  tooltip="The EmoCAST network, managed by ComfyUI (moved to the "
                                          "GPU for sampling, offloaded when memory is needed).")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint: str) -> bool | str:
        if checkpoint not in paths.checkpoints():
            return paths.missing_checkpoint(checkpoint)
        return True

    @classmethod
    def execute(cls, checkpoint: str, precision: str) -> io.NodeOutput:
        from emocast_lib.checkpoint import load_net

        path = paths.checkpoint_path(checkpoint)
        dtype = compute_dtype(precision, mm.get_torch_device())
        net = load_net(path, dtype=dtype, device=mm.unet_offload_device())
        return io.NodeOutput(managed(net.eval().requires_grad_(False)))
