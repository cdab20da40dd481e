"""ComfyUI-EmoCAST: emotional talking portraits from a photo, speech and a free-text emotion
(EmoCAST, arXiv 2508.20615).

The nodes are V3 (`comfy_api.latest`) classes registered through NODE_CLASS_MAPPINGS: ComfyUI's
custom-node loader (`nodes.load_custom_node`, in 0.3.64 and in the newest source) reads
NODE_CLASS_MAPPINGS first and only looks for a V3 `comfy_entrypoint` when a pack has none, and a V3
class carries the whole V1 interface that route uses. So this is the one route, and the pack exports no
`comfy_entrypoint` that ComfyUI would never call.
"""
import os
import sys

try:
    from comfy_api.latest import io  # noqa: F401  (the V3 API the nodes are written in)
except ImportError as e:
    raise ImportError("ComfyUI-EmoCAST needs ComfyUI 0.3.64 or newer (V3 node API `comfy_api.latest`): "
                      "update ComfyUI") from e

# emocast_lib is also a standalone package (`python -m emocast_lib`); make it importable by that name.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.insert(0, _PACK_DIR)

from .nodes.extension import NODES  # noqa: E402

WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS = {node.GET_SCHEMA().node_id: node for node in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node.GET_SCHEMA().node_id: node.GET_SCHEMA().display_name for node in NODES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
