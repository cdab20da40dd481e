"""The `emocast` model folder in ComfyUI's folder_paths, and the combos listed from it.

Combos only ever hold names relative to a registered model folder; a name is resolved back to a
path inside one of those folders, so a workflow cannot point the pack at an arbitrary file.
"""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from emocast_lib import layout

FOLDER = "emocast"
# Sub-folders of models/emocast that hold the companion models, not network checkpoints.
COMPANION_DIRS = ("face_analysis", "audio_separator")
LANDMARKER_NAME = Path(layout.LANDMARKER.name).name
SEPARATOR_DIR = Path(layout.SEPARATOR.name).parent.as_posix()


def register() -> None:
    """Add models/emocast, merged with whatever extra_model_paths.yaml already registered."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    if default not in paths:
        paths.insert(0, default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | set(folder_paths.supported_pt_extensions))


def roots() -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(FOLDER)]


def where() -> str:
    return " or ".join(str(p) for p in roots())


def checkpoints() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.split("/")[0] not in COMPANION_DIRS]


def missing_checkpoint(name: str) -> str:
    return (f"checkpoint: '{name}' is not in {where()}. Download the {layout.NET.what} from {layout.NET.source}, "
            f"put it in models/{FOLDER}/ (a .safetensors made by `python -m emocast_lib convert` works too), then "
            "refresh the browser page")


def checkpoint_path(name: str) -> Path:
    if name not in checkpoints():
        raise FileNotFoundError(missing_checkpoint(name))
    return Path(folder_paths.get_full_path_or_raise(FOLDER, name))


def _found(pattern: str, parent: bool) -> dict[str, Path]:
    """Name relative to an emocast root -> path, for files matching `pattern` (or their folders with
    `parent`); the first root wins on equal names."""
    found: dict[str, Path] = {}
    for root in roots():
        for match in sorted(root.glob(pattern)):
            path = match.parent if parent else match
            found.setdefault(path.relative_to(root).as_posix(), path)
    return found


def face_model_folders() -> dict[str, Path]:
    return _found(f"**/{LANDMARKER_NAME}", parent=True)


def separator_models() -> dict[str, Path]:
    return _found(f"{SEPARATOR_DIR}/*.onnx", parent=False)


def missing_folder(kind: str, name: str, file: layout.ModelFile) -> str:
    return (f"{kind}: '{name}' not found in {where()}. Put the {file.what} at models/{FOLDER}/{file.name} "
            f"(download: {file.source}), then refresh the browser page")


def missing_face_models(name: str) -> str:
    files = "; ".join(f"models/{f.folder}/{f.name} from {f.source}" for f in (*layout.IDENTITY, layout.LANDMARKER))
    return (f"face_models: '{name}' not found in {where()}: no folder with {LANDMARKER_NAME}. Download {files}, "
            "then refresh the browser page")
