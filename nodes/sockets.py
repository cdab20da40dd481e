"""The pack's custom socket types (links between them are type-checked by the type name). Each socket
object is named after its type, so none shadows an `io.*` socket or a library class."""
from comfy_api.latest import io

EmoCASTModel = io.Custom("EMOCAST_MODEL")
EmoCASTAudio = io.Custom("EMOCAST_AUDIO")
EmoCASTEmotion = io.Custom("EMOCAST_EMOTION")
EmoCASTFace = io.Custom("EMOCAST_FACE")
EmoCASTCropInfo = io.Custom("EMOCAST_CROP_INFO")  # carries emocast_lib.face.PortraitCrop
