"""ComfyUI core's AUDIO_ENCODER (comfy.audio_encoders), as Load Audio Encoder gives it, for the in-ComfyUI tests.

A single `.safetensors` goes through core's own Load Audio Encoder node. A wav2vec2 folder with a config.json
(the fixtures' tiny wav2vec2 is 32 wide) cannot: core's file loader only knows the 768- and 1024-wide models
and fixes the conv width (512) and feed-forward ratio (4). For a folder, core's own classes are built at the
folder's sizes (AudioEncoderModel, its wav2vec2 submodules, its ModelPatcher) and filled through core's
state-dict path. That construction is the one deviation from what a user runs; the computation is core's.
Needs ComfyUI importable (COMFY_DIR on sys.path).
"""
from __future__ import annotations

import json
from pathlib import Path

import comfy.model_management as mm
import comfy.ops
import comfy.utils
import folder_paths
from comfy.audio_encoders import wav2vec2
from comfy.audio_encoders.audio_encoders import AudioEncoderModel
from comfy.model_patcher import ModelPatcher
from safetensors.torch import load_file

# What core hard-codes for wav2vec2-base and what a folder must therefore match.
CORE_FIXED = {"feat_extract_norm": "group", "conv_bias": False, "do_stable_layer_norm": False,
              "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
              "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16}


def core_audio_encoder(path: Path) -> AudioEncoderModel:
    """Core's AUDIO_ENCODER for a wav2vec2 `.safetensors` file (through Load Audio Encoder) or folder."""
    if path.is_file():
        from comfy_extras.nodes_audio_encoder import AudioEncoderLoader

        # first in the list: another test's file of the same name in an earlier folder must not be the one read
        folder_paths.add_model_folder_path("audio_encoders", str(path.parent), is_default=True)
        return AudioEncoderLoader.execute(path.name)[0]
    return _core_classes_at_folder_sizes(path)


def _core_classes_at_folder_sizes(folder: Path) -> AudioEncoderModel:
    cfg = json.loads((folder / "config.json").read_text())
    other = {k: cfg.get(k) for k, v in CORE_FIXED.items() if cfg.get(k) != v}
    if other or len(set(cfg["conv_dim"])) != 1:
        raise ValueError(f"{folder}: core's wav2vec2 cannot take {other or cfg['conv_dim']}")
    width, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    encoder = AudioEncoderModel({"model_type": "wav2vec2", "embed_dim": width, "num_heads": heads,
                                 "num_layers": layers, "conv_norm": False, "conv_bias": False, "do_normalize": False,
                                 "do_stable_layer_norm": False})
    offload = mm.text_encoder_offload_device()
    kw = dict(dtype=encoder.dtype, device=offload, operations=comfy.ops.manual_cast)
    conv = cfg["conv_dim"][0]
    model = encoder.model
    model.feature_extractor = wav2vec2.ConvFeatureEncoder(conv, conv_norm=False, conv_bias=False, **kw)
    model.feature_projection = wav2vec2.FeatureProjection(conv, width, **kw)
    model.encoder = wav2vec2.TransformerEncoder(width, heads, layers, cfg["intermediate_size"] / width,
                                                do_stable_layer_norm=False, **kw)
    encoder.patcher = ModelPatcher(model, load_device=encoder.load_device, offload_device=offload)  # new size
    sd = comfy.utils.state_dict_prefix_replace(load_file(folder / "model.safetensors"), {"wav2vec2.": ""})
    missing, unexpected = encoder.load_sd(sd)
    if missing or any(not k.startswith("lm_head.") for k in unexpected):
        raise ValueError(f"{folder}: core's wav2vec2 did not take the weights: missing {missing}, "
                         f"unexpected {unexpected}")
    return encoder
