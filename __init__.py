"""ComfyUI-EmoCAST: emotional talking portraits from a photo, speech and a free-text emotion
(EmoCAST, arXiv 2508.20615). The nodes are V3 (`comfy_api.latest`) classes; they are exported both
through `comfy_entrypoint` and through NODE_CLASS_MAPPINGS, which ComfyUI versions that predate
extension entry points (but have V3 classes) read instead."""
import os
import sys

try:
    from comfy_api.latest import ComfyExtension  # noqa: F401  (the V3 API the nodes are written in)
except ImportError as e:
    raise ImportError("ComfyUI-EmoCAST needs ComfyUI 0.3.64 or newer (V3 node API `comfy_api.latest`): "
                      "update ComfyUI") from e

# emocast_lib is also a standalone package (`python -m emocast_lib`); make it importable by that name.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.insert(0, _PACK_DIR)

from .nodes.extension import NODES, EmoCASTExtension  # noqa: E402

WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS = {node.GET_SCHEMA().node_id: node for node in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node.GET_SCHEMA().node_id: node.GET_SCHEMA().display_name for node in NODES}


async def comfy_entrypoint() -> EmoCASTExtension:
    return EmoCASTExtension()


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "comfy_entrypoint"]
