"""The container whose state dict is the released `net.pth` (the `Net` module of EmoCAST's
scripts/inference.py, as in Hallo: two UNets, face locator, image and audio projections)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import NetConfig
from .ops import TorchOps
from .projections import AudioProj, FaceLocator, ImageProj
from .unet import DenoisingUNet, ReferenceUNet


class EmoCASTNet(nn.Module):
    """`operations` is the layer namespace (models/ops.py: plain torch by default, ComfyUI's casting ops in
    ComfyUI); `dtype`/`device` are those the layers are made with (e.g. "meta" to build without memory)."""

    def __init__(self, config: NetConfig | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, operations: type = TorchOps):
        super().__init__()
        self.config = config = config or NetConfig()
        dd = {"dtype": dtype, "device": device, "operations": operations}
        self.reference_unet = ReferenceUNet(config.unet, **dd)
        self.denoising_unet = DenoisingUNet(config.unet, **dd)
        self.face_locator = FaceLocator(config.face_locator, **dd)
        self.imageproj = ImageProj(config.image_proj, **dd)
        self.audioproj = AudioProj(config.audio_proj, **dd)
