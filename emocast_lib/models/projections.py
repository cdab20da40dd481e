"""Small conditioning networks: face locator, identity tokens, audio tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AudioProjConfig, FaceLocatorConfig, ImageProjConfig


class FaceLocator(nn.Module):
    """Face-region image -> features added to the denoising UNet's `conv_in` output (per frame)."""

    def __init__(self, cfg: FaceLocatorConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        blocks = []
        for cin, cout in zip(ch[:-1], ch[1:]):
            blocks += [nn.Conv2d(cin, cin, 3, padding=1), nn.Conv2d(cin, cout, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


class ImageProj(nn.Module):
    """512-d identity embedding -> 4 tokens of the text width."""

    def __init__(self, cfg: ImageProjConfig):
        super().__init__()
        self.tokens = cfg.tokens
        self.proj = nn.Linear(cfg.embedding_dim, cfg.tokens * cfg.width)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(emb).reshape(emb.shape[0], self.tokens, -1))


class AudioProj(nn.Module):
    """Windowed wav2vec features (B, f, 5, layers, C) -> audio tokens (B, f, tokens, width)."""

    def __init__(self, cfg: AudioProjConfig):
        super().__init__()
        self.cfg = cfg
        self.proj1 = nn.Linear(cfg.window * cfg.layers * cfg.channels, cfg.hidden)
        self.proj2 = nn.Linear(cfg.hidden, cfg.hidden)
        self.proj3 = nn.Linear(cfg.hidden, cfg.tokens * cfg.width)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f = x.shape[:2]
        x = F.relu(self.proj2(F.relu(self.proj1(x.reshape(b * f, -1)))))
        return self.norm(self.proj3(x).reshape(b * f, self.cfg.tokens, self.cfg.width)).reshape(b, f, self.cfg.tokens, -1)
