from .net import EmoCASTNet
from .unet import ClipConditioning, ClipContext, DenoisingUNet, ReferenceUNet

__all__ = ["EmoCASTNet", "ClipConditioning", "ClipContext", "DenoisingUNet", "ReferenceUNet"]
