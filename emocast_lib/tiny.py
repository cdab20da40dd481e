"""Tiny stand-in models made by the deterministic fill rule: NOT a real model, they produce noise.

They exist so that the code paths of the pack (loading, sampling, ComfyUI workflows, CLI) can be run
end to end on a CPU without the multi-GB released weights. The sizes are those of the parity fixtures.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import AudioProjConfig, FaceLocatorConfig, ImageProjConfig, NetConfig, UNetConfig
from .fill import fill_state_dict
from .models import EmoCASTNet

TINY_SEED = 1001
TINY_NET = NetConfig(
    unet=UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=16, heads=4,
                    cross_attention_dim=48, audio_attention_dim=48, audio_token_dim=40, emotive_head_dim=12),
    face_locator=FaceLocatorConfig(out_channels=32),
    image_proj=ImageProjConfig(embedding_dim=24, tokens=4, width=48),
    audio_proj=AudioProjConfig(window=5, layers=3, channels=16, hidden=32, tokens=8, width=40),
)
TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
    "block_out_channels": [16, 16, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "act_fn": "silu", "sample_size": 128, "scaling_factor": 0.18215,
}
TINY_CLIP_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 48, "intermediate_size": 96, "projection_dim": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
    "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}


def fill_module(module: nn.Module, seed: int, prefix: str = "") -> nn.Module:
    """Replace every parameter and buffer with the fill rule's tensor for its (prefixed) key."""
    shapes = {prefix + k: v.shape for k, v in module.state_dict().items()}
    filled = fill_state_dict(seed, shapes)
    module.load_state_dict({k[len(prefix):]: v for k, v in filled.items()}, assign=True)
    return module


def filled_net(config: NetConfig = TINY_NET, seed: int = TINY_SEED) -> EmoCASTNet:
    with torch.device("meta"):
        net = EmoCASTNet(config)
    return fill_module(net, seed).eval()


def filled_vae(config: dict[str, Any] = TINY_VAE, seed: int = TINY_SEED):
    from diffusers import AutoencoderKL

    return fill_module(AutoencoderKL(**config), seed).eval()


def filled_text_encoder(config: dict[str, Any] = TINY_CLIP_TEXT, seed: int = TINY_SEED):
    """A transformers CLIPTextModel whose weights are filled under the `text_model.*` key names of
    the checkpoint files (transformers 5 drops that prefix from `state_dict()`, 4.x keeps it)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**config))
    prefix = "" if next(iter(model.state_dict())).startswith("text_model.") else "text_model."
    return fill_module(model, seed, prefix).eval()
