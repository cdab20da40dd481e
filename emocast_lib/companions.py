"""The companion models outside `net.pth`, read from the single files ComfyUI uses: the SD VAE
(sd-vae-ft-mse in the original or diffusers key layout, or a TAESD-format tiny VAE, which ComfyUI's
Load VAE also takes) and the CLIP-L text encoder with its BPE tokenizer. The CLI and the bench use these;
ComfyUI has its own loaders. Only safetensors files are read (no pickle).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch

from .config import CLIP_L_TEXT, LATENT_SCALE, SD_VAE

LDM_VAE_KEY = "encoder.down.0.block.0.conv1.weight"  # the original (CompVis) layout
DIFFUSERS_VAE_KEY = "encoder.down_blocks.0.resnets.0.conv1.weight"
TAESD_KEY = "taesd_decoder.1.weight"  # ComfyUI's TAESD layout (comfy/taesd/taesd.py)


def vae_format(keys: Iterable[str]) -> str | None:
    """"ldm", "diffusers" or "taesd" from a VAE file's key names, None for anything else."""
    keys = set(keys)
    for name, key in (("ldm", LDM_VAE_KEY), ("diffusers", DIFFUSERS_VAE_KEY), ("taesd", TAESD_KEY)):
        if key in keys:
            return name
    return None


class ClipBpeTokenizer:
    """CLIP's BPE tokenizer from the `instant-clip-tokenizer` wheel, which carries the vocabulary, so
    the CLI needs no tokenizer download. Called like a transformers tokenizer by `HFTextEncoder`."""

    def __init__(self):
        from instant_clip_tokenizer import Tokenizer

        self.bpe = Tokenizer()

    def __call__(self, prompt: str, truncation: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self.bpe.start_of_text(), *self.bpe.encode(prompt), self.bpe.end_of_text()]}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_clip_l(path: Path, device: torch.device):
    """CLIP-L text encoder (`HFTextEncoder`) from a single ComfyUI-style file (`text_model.*` keys)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from .emotion import HFTextEncoder

    sd = {k.removeprefix("text_model."): v.float() for k, v in _read(path)[0].items() if k.startswith("text_model.")}
    with torch.device("meta"):  # no random init of 123 M parameters that are replaced at once
        model = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
    inner = getattr(model, "text_model", model)  # transformers 5 flattened the text model
    expected = set(inner.state_dict())
    missing = sorted(k for k in expected - set(sd) if not k.endswith("position_ids"))
    if missing or not sd:
        raise ValueError(f"{path} is not a CLIP-L text encoder ({len(missing)} of its weights missing, e.g. "
                         f"{missing[:3]}): put clip_l.safetensors there")
    wrong = [k for k, v in inner.state_dict().items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{path} is not CLIP-L (ViT-L/14): {len(wrong)} weights have other shapes, e.g. {wrong[0]} "
                         f"{tuple(sd[wrong[0]].shape)}; put clip_l.safetensors there")
    if "embeddings.position_ids" in expected and "embeddings.position_ids" not in sd:
        sd["embeddings.position_ids"] = torch.arange(CLIP_L_TEXT["max_position_embeddings"])[None]
    inner.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=True, assign=True)
    # position ids are a non-persistent buffer in recent transformers: not in the file, still on meta
    embeddings = inner.embeddings
    if embeddings.position_ids.is_meta:
        embeddings.register_buffer("position_ids", torch.arange(CLIP_L_TEXT["max_position_embeddings"])[None],
                                   persistent=False)
    return HFTextEncoder(ClipBpeTokenizer(), model.to(device).eval())


def load_vae(path: Path, device: torch.device, dtype: torch.dtype):
    """The pipeline's VAE (pipeline.Vae) from one file: sd-vae-ft-mse (original or diffusers keys) or a TAESD."""
    from diffusers import AutoencoderKL

    from .pipeline import diffusers_vae

    sd, _ = _read(path)
    kind = vae_format(sd)
    if kind == "taesd":
        return _taesd(path, sd, device, dtype)
    if kind == "ldm":
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        sd = convert_ldm_vae_checkpoint(sd, SD_VAE)
    if kind is None:
        raise ValueError(f"{path} is not an SD VAE (sd-vae-ft-mse) nor a TAESD: put "
                         "vae-ft-mse-840000-ema-pruned.safetensors there")
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
    try:
        vae.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not an SD VAE (sd-vae-ft-mse): {str(e).splitlines()[0][:200]}") from e
    return diffusers_vae(_placed(vae, device, dtype).eval())


def _taesd(path: Path, sd: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    """diffusers' AutoencoderTiny with a ComfyUI TAESD file's weights. The file's `vae_scale` (0.18215 for
    SD1) maps the pipeline's unscaled latents to TAESD's scaled ones, as ComfyUI's TAESD does."""
    from diffusers import AutoencoderTiny

    from .pipeline import Vae

    scale = float(sd["vae_scale"]) if "vae_scale" in sd else LATENT_SCALE
    shift = float(sd["vae_shift"]) if "vae_shift" in sd else 0.0
    # ComfyUI's decoder starts with a parameter-free Clamp module that diffusers applies in forward().
    renamed = {}
    for key, value in sd.items():
        if m := re.match(r"taesd_encoder\.(\d+)\.(.*)", key):
            renamed[f"encoder.layers.{m[1]}.{m[2]}"] = value.float()
        elif m := re.match(r"taesd_decoder\.(\d+)\.(.*)", key):
            renamed[f"decoder.layers.{int(m[1]) - 1}.{m[2]}"] = value.float()
    with torch.device("meta"):
        model = AutoencoderTiny(latent_channels=sd[TAESD_KEY].shape[1])
    try:
        model.load_state_dict(renamed, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not a TAESD (tiny SD VAE): {str(e).splitlines()[0][:200]}") from e
    model = _placed(model, device, dtype).eval()

    def encode(x: torch.Tensor) -> torch.Tensor:  # [-1, 1] pixels -> unscaled latents
        return model.encoder(x.to(device, dtype)) / scale + shift

    def decode(z: torch.Tensor) -> torch.Tensor:  # unscaled latents -> [0, 1] pixels
        return model.decoder((z.to(device, dtype) - shift) * scale) / 2 + 0.5

    return Vae(encode, decode)


def _placed(model, device: torch.device, dtype: torch.dtype):
    """Move a freshly loaded fp32 diffusers model; passing fp32 again only makes diffusers warn."""
    model = model.to(device)
    return model if dtype == torch.float32 else model.to(dtype)
