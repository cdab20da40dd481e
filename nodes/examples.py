"""The example inputs the templates name (example_workflows/inputs/), copied into ComfyUI's input folder
when ComfyUI loads the pack, so a template opened from the template browser runs as it is: Load Image
and Load Audio only list files in that folder. A file of the same name already there is left alone (it
may be the user's); a copy is written under a temporary name and renamed, so no half file is left."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import folder_paths

INPUTS = Path(__file__).resolve().parents[1] / "example_workflows" / "inputs"


def install_inputs() -> list[Path]:
    """Copy the example inputs that are missing from ComfyUI's input folder; returns the files written."""
    target = Path(folder_paths.get_input_directory())
    written = []
    for source in sorted(INPUTS.glob("*.*")):
        dest = target / source.name
        if dest.exists():
            continue
        part = dest.with_name(f".{dest.name}.part")
        try:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, part)
            os.replace(part, dest)
        except OSError as e:  # a read-only input folder must not stop the nodes from loading
            part.unlink(missing_ok=True)
            logging.warning(f"EmoCAST: could not copy the example input {source.name} to {target}: {e}")
            continue
        written.append(dest)
    return written
