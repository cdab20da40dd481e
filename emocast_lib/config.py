"""Network and sampling settings. Defaults are the released EmoCAST checkpoint; the tiny test
model is just another instance (checkpoints of other sizes carry theirs, `NetConfig.to_json`)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# The three face regions of the audio modules, in the order of their attentions (`attn2_0/1/2`) and of
# `motion_scale`: full (pose, background mask), face (face minus lips), lip.
REGIONS = ("full", "face", "lip")
# Weight precisions a user can choose (nodes, CLI, converter).
PRECISIONS: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Formats the linear/conv weights can be stored in instead (nodes, CLI, converter: models/ops.py casts them to the
# precision per call), by the names of ComfyUI's diffusion-model loader. e4m3fn keeps 3 mantissa bits within
# +-448, e5m2 2 bits within +-57344; both halve fp16's bytes.
STORAGE_FORMATS: dict[str, torch.dtype] = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# EmoCAST latents are VAE latents times this, hard-coded by the reference whatever the VAE's own factor.
LATENT_SCALE = 0.18215
DEFAULT_EMOTION = "The portrait is watching a horror movie with jump scares."
# The most faces looked for in one photo (MediaPipe's num_faces): a conversation's face index runs to MAX_FACES - 1.
MAX_FACES = 8


@dataclass(frozen=True)
class UNetConfig:
    """Both UNets share the SD1.5 layout; the denoising UNet adds motion and audio modules."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    heads: int = 8  # SD1.5's `attention_head_dim: 8` is the number of heads
    cross_attention_dim: int = 768  # text width = identity-token width
    in_channels: int = 4
    out_channels: int = 4
    audio_attention_dim: int = 768  # kv width of the masked audio attentions (= emotion width)
    audio_token_dim: int = 768  # kv width of the emotive-audio attention (audio-token width)
    emotive_head_dim: int = 80
    motion_heads: int = 8
    motion_max_len: int = 32
    motion_norm_groups: int = 32

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4


@dataclass(frozen=True)
class FaceLocatorConfig:
    out_channels: int = 320
    channels: tuple[int, ...] = (16, 32, 64, 128)
    in_channels: int = 3


@dataclass(frozen=True)
class ImageProjConfig:
    embedding_dim: int = 512
    tokens: int = 4
    width: int = 768


@dataclass(frozen=True)
class AudioProjConfig:
    window: int = 5
    layers: int = 12
    channels: int = 768
    hidden: int = 512
    tokens: int = 32
    width: int = 768


@dataclass(frozen=True)
class NetConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    face_locator: FaceLocatorConfig = field(default_factory=FaceLocatorConfig)
    image_proj: ImageProjConfig = field(default_factory=ImageProjConfig)
    audio_proj: AudioProjConfig = field(default_factory=AudioProjConfig)
    # Pixel size the network was trained at; the portrait is resized to it as the reference does.
    sample_size: int = 512

    def to_json(self) -> str:
        """This config as JSON (`from_json_text` reads it back); checkpoints can carry it."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json_text(cls, text: str) -> "NetConfig":
        d = json.loads(text)
        return cls(unet=UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["unet"].items()}),
                   face_locator=FaceLocatorConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in d["face_locator"].items()}),
                   image_proj=ImageProjConfig(**d["image_proj"]), audio_proj=AudioProjConfig(**d["audio_proj"]),
                   sample_size=d["sample_size"])


@dataclass(frozen=True)
class SamplingConfig:
    """The released inference settings (DDIM, v-prediction, zero-SNR, trailing timesteps)."""

    steps: int = 40
    cfg_scale: float = 3.5
    frames_per_clip: int = 16
    motion_frames: int = 2
    fps: int = 25
    motion_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # full (pose), face, lip
    latent_scale: float = LATENT_SCALE
    seed: int = 42
    # Experimental speed levers, off by default (they change the numerics; emocast_lib/sampling.py):
    scheduler: str = "ddim"  # "ddim" (released), "dpmpp_2m", "uni_pc"
    cfg_end: float = 1.0  # guidance for this fraction of the steps, then the conditional half alone
    cache_interval: int = 1  # a full UNet pass every this many steps, shallow passes reusing its deep features between
    # Guidance of the emotion prompt alone (emotion_cfg in sampling.py); None: cfg_scale, the released joint
    # guidance, whose third half is then never computed.
    emotion_cfg: float | None = None


# The samplers `SamplingConfig.scheduler` names (emocast_lib/sampling.py): the released DDIM, then the levers.
SCHEDULERS = ("ddim", "dpmpp_2m", "uni_pc")
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "set_alpha_to_one": True,
}


# The companion models' architectures (diffusers AutoencoderKL / transformers CLIPTextConfig kwargs):
# sd-vae-ft-mse and the CLIP ViT-L/14 text tower, the only ones ComfyUI's loaders and the reference use.
SD_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "act_fn": "silu", "sample_size": 512, "scaling_factor": 0.18215,
}
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
    "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}
