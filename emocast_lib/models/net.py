"""The container whose state dict is the released `net.pth`."""
from __future__ import annotations

from torch import nn

from ..config import NetConfig
from .projections import AudioProj, FaceLocator, ImageProj
from .unet import DenoisingUNet, ReferenceUNet


class EmoCASTNet(nn.Module):
    def __init__(self, config: NetConfig | None = None):
        super().__init__()
        self.config = config = config or NetConfig()
        self.reference_unet = ReferenceUNet(config.unet)
        self.denoising_unet = DenoisingUNet(config.unet)
        self.face_locator = FaceLocator(config.face_locator)
        self.imageproj = ImageProj(config.image_proj)
        self.audioproj = AudioProj(config.audio_proj)
