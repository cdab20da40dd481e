"""The parity fixtures' network configs (`tiny_config.json`, `real_model_config.json`: the reference's
`denoising_unet_base_config` / `denoising_unet_additional_kwargs` / ... layout) as a `NetConfig`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emocast_lib.config import AudioProjConfig, FaceLocatorConfig, ImageProjConfig, NetConfig, UNetConfig


def net_config(cfg: dict[str, Any]) -> NetConfig:
    base = cfg["denoising_unet_base_config"]
    extra = cfg["denoising_unet_additional_kwargs"]
    motion = extra["motion_module_kwargs"]
    emo = cfg["emotive_audio_attention"]
    fl, ip, ap = cfg["face_locator"], cfg["image_proj"], cfg["audio_proj"]
    return NetConfig(
        unet=UNetConfig(
            block_out_channels=tuple(base["block_out_channels"]),
            layers_per_block=base["layers_per_block"],
            norm_num_groups=base["norm_num_groups"],
            heads=base["attention_head_dim"],
            cross_attention_dim=base["cross_attention_dim"],
            in_channels=base["in_channels"],
            out_channels=base["out_channels"],
            audio_attention_dim=extra["audio_attention_dim"],
            audio_token_dim=emo["audio_cross_attention_dim"],
            emotive_head_dim=emo["audio_attention_head_dim"],
            motion_heads=motion["num_attention_heads"],
            motion_max_len=motion["temporal_position_encoding_max_len"],
        ),
        face_locator=FaceLocatorConfig(fl["conditioning_embedding_channels"], tuple(fl["block_out_channels"]),
                                       fl["conditioning_channels"]),
        image_proj=ImageProjConfig(ip["clip_embeddings_dim"], ip["clip_extra_context_tokens"],
                                   ip["cross_attention_dim"]),
        audio_proj=AudioProjConfig(ap["seq_len"], ap["blocks"], ap["channels"], ap["intermediate_dim"],
                                   ap["context_tokens"], ap["output_dim"]),
        sample_size=base["sample_size"] * 8,
    )


def read_net_config(path: str | Path) -> NetConfig:
    return net_config(json.loads(Path(path).read_text()))
