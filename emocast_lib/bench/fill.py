"""Deterministic weight fill used for the tiny test models and the parity fixtures.

A tensor depends only on (seed, state-dict key, shape), so any model with the released key layout
can be filled reproducibly without shipping weights. The rule is the one of the parity fixtures
(`tests/fixtures/parity/README.md` §2); `tensor_sha256` lets tests compare fills key by key.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Mapping

import torch

from ..models.motion import sinusoidal_pe

__all__ = ["fill_tensor", "fill_state_dict", "tensor_sha256"]


def _key_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def fill_tensor(seed: int, key: str, shape: Iterable[int]) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    if key.endswith("pos_encoder.pe"):
        return sinusoidal_pe(shape[1], shape[2])
    g = torch.Generator(device="cpu").manual_seed(_key_seed(seed, key))
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) >= 2:
        # The scale is rounded to float32 before the multiply, as in the fixtures.
        return noise * torch.tensor(1.0 / math.sqrt(noise.numel() // shape[0]), dtype=torch.float32)
    if len(shape) == 1 and key.endswith(".weight"):
        return noise * 0.1 + 1.0
    if len(shape) == 1:
        # Biases; also other 1-D tensors such as wav2vec2's `masked_spec_embed` (as the preprocess fixtures).
        return noise * 0.1
    raise ValueError(f"the fill rule has no case for {key} with shape {shape}")


def fill_state_dict(seed: int, shapes: Mapping[str, Iterable[int]]) -> dict[str, torch.Tensor]:
    return {k: fill_tensor(seed, k, s) for k, s in sorted(shapes.items())}


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()).hexdigest()
