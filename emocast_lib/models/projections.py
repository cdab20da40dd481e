"""Small conditioning networks: face locator, identity tokens, audio tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AudioProjConfig, FaceLocatorConfig, ImageProjConfig
from .ops import TorchOps


class FaceLocator(nn.Module):
    """hallo/models/face_locator.py `FaceLocator`: face-region image -> features added to the denoising
    UNet's `conv_in` output (per frame)."""

    def __init__(self, cfg: FaceLocatorConfig, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        dd = {"dtype": dtype, "device": device}
        ch = cfg.channels
        self.conv_in = operations.Conv2d(cfg.in_channels, ch[0], 3, padding=1, **dd)
        blocks = []
        for cin, cout in zip(ch[:-1], ch[1:]):
            blocks += [operations.Conv2d(cin, cin, 3, padding=1, **dd),
                       operations.Conv2d(cin, cout, 3, padding=1, stride=2, **dd)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = operations.Conv2d(ch[-1], cfg.out_channels, 3, padding=1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


class ImageProj(nn.Module):
    """hallo/models/image_proj.py `ImageProjModel`: 512-d identity embedding -> 4 tokens of the text width."""

    def __init__(self, cfg: ImageProjConfig, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.tokens = cfg.tokens
        self.proj = operations.Linear(cfg.embedding_dim, cfg.tokens * cfg.width, dtype=dtype, device=device)
        self.norm = operations.LayerNorm(cfg.width, dtype=dtype, device=device)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(emb).reshape(emb.shape[0], self.tokens, -1))


class AudioProj(nn.Module):
    """hallo/models/audio_proj.py `AudioProjModel`: windowed wav2vec features (B, f, 5, layers, C) ->
    audio tokens (B, f, tokens, width)."""

    def __init__(self, cfg: AudioProjConfig, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        dd = {"dtype": dtype, "device": device}
        self.cfg = cfg
        self.proj1 = operations.Linear(cfg.window * cfg.layers * cfg.channels, cfg.hidden, **dd)
        self.proj2 = operations.Linear(cfg.hidden, cfg.hidden, **dd)
        self.proj3 = operations.Linear(cfg.hidden, cfg.tokens * cfg.width, **dd)
        self.norm = operations.LayerNorm(cfg.width, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f = x.shape[:2]
        x = F.relu(self.proj2(F.relu(self.proj1(x.reshape(b * f, -1)))))
        tokens = self.norm(self.proj3(x).reshape(b * f, self.cfg.tokens, self.cfg.width))
        return tokens.reshape(b, f, self.cfg.tokens, -1)
