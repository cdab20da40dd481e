"""The pack's custom socket types (links between them are type-checked by name)."""
from comfy_api.latest import io

Model = io.Custom("EMOCAST_MODEL")
Audio = io.Custom("EMOCAST_AUDIO")
Emotion = io.Custom("EMOCAST_EMOTION")
Face = io.Custom("EMOCAST_FACE")
CropInfo = io.Custom("EMOCAST_CROP_INFO")
