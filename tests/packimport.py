"""Import the pack's `nodes/` package in tests (ComfyUI has a top-level `nodes` module of its own)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # emocast_lib, as the pack's __init__ does


def pack_module(name: str):
    """nodes/<name>.py under the private package name `emocast_pack_nodes`."""
    if "emocast_pack_nodes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("emocast_pack_nodes", ROOT / "nodes" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "nodes")])
        package = importlib.util.module_from_spec(spec)
        sys.modules["emocast_pack_nodes"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"emocast_pack_nodes.{name}")
