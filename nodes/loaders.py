"""EmoCAST Model Loader and EmoCAST Audio Encoder Loader."""
from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from emocast_lib import layout

from . import paths
from .sockets import EmoCASTAudioEncoder, EmoCASTModel

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


class Wav2Vec2Holder(torch.nn.Module):
    """ModelPatcher records the device on its module as `.device`, which transformers models expose as
    a read-only property; this container takes the attribute instead."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder


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
            outputs=[EmoCASTModel.Output("model", display_name="model",
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


class AudioEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EmoCASTAudioEncoderLoader",
            display_name="EmoCAST Audio Encoder Loader",
            category="EmoCAST",
            description="Loads the wav2vec2-base-960h speech encoder EmoCAST was trained with (a folder with "
                        "config.json and model.safetensors under models/emocast/wav2vec/).",
            inputs=[
                io.Combo.Input("wav2vec", options=list(paths.wav2vec_folders()),
                               tooltip=f"wav2vec2 folder in models/{paths.FOLDER}/{paths.WAV2VEC_DIR}/ holding "
                                       f"config.json and model.safetensors. Download: {layout.WAV2VEC.source}"),
            ],
            outputs=[EmoCASTAudioEncoder.Output("audio_encoder", display_name="audio_encoder",
                                         tooltip="wav2vec2 encoder for EmoCAST Audio Encode.")],
        )

    @classmethod
    def validate_inputs(cls, wav2vec: str) -> bool | str:
        if wav2vec not in paths.wav2vec_folders():
            return paths.missing_folder("wav2vec", wav2vec, layout.WAV2VEC)
        return True

    @classmethod
    def execute(cls, wav2vec: str) -> io.NodeOutput:
        from emocast_lib.audio import load_wav2vec2

        folder = paths.wav2vec_folders().get(wav2vec)
        if folder is None:
            raise FileNotFoundError(paths.missing_folder("wav2vec", wav2vec, layout.WAV2VEC))
        return io.NodeOutput(managed(Wav2Vec2Holder(load_wav2vec2(folder).requires_grad_(False))))
