"""The node list. Importing this registers models/emocast with folder_paths and puts the templates'
example inputs into ComfyUI's input folder (where missing)."""
from __future__ import annotations

from comfy_api.latest import io

from . import examples, paths
from .audio import AudioEncode, MixAudio, VocalSeparator
from .emotion import EmotionEncode, EmotionSchedule
from .face import CropPortrait, FaceAnalysis, PasteBack
from .loaders import ModelLoader
from .sampler import Sampler, SamplerToVideo

paths.register()
examples.install_inputs()

NODES: list[type[io.ComfyNode]] = [ModelLoader, VocalSeparator, AudioEncode, MixAudio, EmotionEncode,
                                   EmotionSchedule, FaceAnalysis, CropPortrait, PasteBack, Sampler, SamplerToVideo]
