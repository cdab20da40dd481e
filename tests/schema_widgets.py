"""Prints the widgets of the pack's nodes as JSON: {node_id: {input_id: {default, min, max, options}}}.

Run by tests/test_schema.py with a ComfyUI venv's python and COMFY_DIR (the nodes' V3 schema objects need
ComfyUI); it reads each node class's own `define_schema()`, nothing else of ComfyUI.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.environ["COMFY_DIR"])
import torch  # noqa: E402
from comfy.cli_args import args  # noqa: E402

args.cpu = args.cpu or not torch.cuda.is_available()  # what `main.py --cpu` sets on a CPU-only machine
import folder_paths  # noqa: E402

from packimport import pack_module  # noqa: E402

folder_paths.set_input_directory(tempfile.mkdtemp(prefix="emocast_input_"))  # never the user's input folder
pack_module("paths").register()  # the model combos list models/emocast (in memory only)
KEYS = ("default", "min", "max", "options")
widgets = {}
for module in ("audio", "emotion", "face", "loaders", "sampler"):
    for node in vars(pack_module(module)).values():
        if isinstance(node, type) and hasattr(node, "define_schema") and node.__module__.endswith(module):
            schema = node.define_schema()
            widgets[schema.node_id] = {i.id: {k: getattr(i, k) for k in KEYS if getattr(i, k, None) is not None}
                                       for i in schema.inputs}
sys.stdout.write(json.dumps(widgets) + "\n")
