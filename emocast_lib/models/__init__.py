from .net import EmoCASTNet
from .unet import ClipConditioning, ClipContext, DeepFeatures, DenoisingUNet, ReferenceUNet

__all__ = ["EmoCASTNet", "ClipConditioning", "ClipContext", "DeepFeatures", "DenoisingUNet", "ReferenceUNet"]
