"""What the bench runs on: the models of a configuration (fill-rule weights, or a checkpoint read by the
library's loader) and random inputs of the shapes the preprocessing produces."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CONFIG_KEY, NOTE_KEY, load_net, net_shapes
from ..config import REGIONS, SD_VAE, NetConfig
from ..models import EmoCASTNet
from ..pipeline import AudioWindows, Emotion, Portrait, Vae, diffusers_vae
from .fill import fill_tensor
from .tiny import TINY_NET, TINY_SEED, TINY_VAE, filled_net, filled_vae


def build_models(model: str, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                 checkpoint: Path | None = None) -> tuple[EmoCASTNet, Vae, str]:
    """The network and the VAE on `device` in `dtype`: fill-rule weights, or the network read from
    `checkpoint` by the library's loader (a float32 .safetensors is memory-mapped on the CPU: its pages
    are read, and counted in RSS, as they are used)."""
    vae = filled_vae(TINY_VAE if model == "tiny" else SD_VAE, TINY_SEED)
    if (device.type, dtype) != ("cpu", torch.float32):  # (diffusers logs a warning on every .to())
        vae = vae.to(device, dtype)
    vae = diffusers_vae(vae)
    if checkpoint is not None:
        return load_net(checkpoint, dtype=dtype, device=device), vae, f"{checkpoint} (load_net)"
    if model == "tiny":
        return filled_net(TINY_NET, TINY_SEED).to(device, dtype), vae, "fill rule, seed 1001"
    # Filled one tensor at a time straight into `dtype` on `device`: the released network in fp32
    # would need 10 GB of host memory first.
    net = EmoCASTNet(NetConfig(), device="meta")
    net.load_state_dict({k: fill_tensor(TINY_SEED, k, v.shape).to(device, dtype)
                         for k, v in net.state_dict().items()}, assign=True)
    return net.eval(), vae, "fill rule, seed 1001, meta-device build; sd-vae-ft-mse-shaped VAE"


def write_checkpoint(path: Path, config: NetConfig, seed: int = TINY_SEED) -> None:
    """The fill rule's network of `config` as a float32 .safetensors, one tensor in memory at a time
    (so the released size needs no 10 GB of RAM); written to a temporary name, then renamed."""
    shapes = net_shapes(config)
    header: dict[str, Any] = {"__metadata__": {CONFIG_KEY: config.to_json(), NOTE_KEY: (
        f"fill rule, seed {seed}: a benchmark stand-in, NOT EmoCAST (its output is noise)")}}
    sizes = {key: 4 * int(torch.Size(shape).numel()) for key, shape in shapes.items()}
    order = sorted(shapes, key=lambda key: (sizes[key] % 64 != 0, key))  # odd sizes last: the rest stays aligned
    offset = 0
    for key in order:
        header[key] = {"dtype": "F32", "shape": list(shapes[key]), "data_offsets": [offset, offset + sizes[key]]}
        offset += sizes[key]
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 64)  # tensors on 64-byte boundaries of the mapping, as torch allocates
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for key in order:
                f.write(fill_tensor(seed, key, shapes[key]).contiguous().numpy().tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Inputs:
    portrait: Portrait
    audio: AudioWindows
    emotion: Emotion


def make_inputs(cfg: NetConfig, size: int, frames: int, clips: int, seed: int = 2001) -> Inputs:
    """Random inputs with the shapes of the preprocessing outputs (one emotion prompt)."""
    g = torch.Generator().manual_seed(seed)
    h = size // 8
    masks = {r: [torch.rand((h >> lvl) ** 2, generator=g) for lvl in range(len(cfg.unet.block_out_channels))]
             for r in REGIONS}
    portrait = Portrait(torch.rand(3, size, size, generator=g) * 2 - 1,
                        torch.randn(cfg.image_proj.embedding_dim, generator=g), torch.rand(3, size, size, generator=g),
                        masks)
    ap, d = cfg.audio_proj, cfg.unet.cross_attention_dim
    audio = AudioWindows(torch.randn(clips * frames, ap.window, ap.layers, ap.channels, generator=g), clips * frames)
    return Inputs(portrait, audio, Emotion(torch.randn(1, 77, d, generator=g), torch.randn(1, 77, d, generator=g)))
