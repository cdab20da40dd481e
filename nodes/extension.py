"""The node list and the V3 extension; importing this registers models/emocast with folder_paths."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import paths
from .audio import AudioEncode, VocalSeparator
from .emotion import EmotionEncode, EmotionSchedule
from .face import CropPortrait, FaceAnalysis
from .loaders import ModelLoader
from .sampler import Sampler, SamplerToVideo

paths.register()

NODES: list[type[io.ComfyNode]] = [ModelLoader, VocalSeparator, AudioEncode, EmotionEncode, EmotionSchedule,
                                   FaceAnalysis, CropPortrait, Sampler, SamplerToVideo]


class EmoCASTExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
