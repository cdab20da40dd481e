"""Post-install step of ComfyUI-EmoCAST: what `pip install -r requirements.txt` cannot do on its own.

ComfyUI-Manager runs it after installing requirements.txt (its convention: `python install.py` in this
folder, with ComfyUI's own python); after a manual `git clone` run it the same way. It is idempotent
(a second run changes nothing) and prints every step. It never replaces the installed torch,
torchvision, torchaudio or numpy: every pip call is constrained to their installed versions.

1. face identity: insightface 2.1's dependencies (requirements-identity.txt; onnxruntime only when no
   onnxruntime build such as onnxruntime-gpu is installed), then insightface itself with --no-deps,
   because it declares opencv-python, a second OpenCV next to mediapipe's opencv-contrib-python;
2. vocal separation (optional node): audio-separator, a release that fits the installed numpy and torch;
   if none does, the step says so and the other nodes still work;
3. one OpenCV: every OpenCV wheel writes the same cv2/ folder, so other variants are uninstalled and
   opencv-contrib-python (what mediapipe requires, a superset of the others) is reinstalled intact.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPENCV = "opencv-contrib-python"
OTHER_OPENCV = ("opencv-python", "opencv-python-headless", "opencv-contrib-python-headless")
INSIGHTFACE = "2.1"
SEPARATOR = "audio-separator>=0.17.2"
PINNED = ("torch", "torchvision", "torchaudio", "numpy")  # the user's builds: never changed here


def say(message: str) -> None:
    print(f"[ComfyUI-EmoCAST install] {message}", flush=True)


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip(*args: str) -> None:
    """pip of the running interpreter (`-s` for the portable build's embedded python, as the Manager does)."""
    if importlib.util.find_spec("pip") is None:
        raise SystemExit("ComfyUI-EmoCAST: this python has no pip; install pip, then run install.py again")
    command = [sys.executable, *(["-s"] if "python_embeded" in sys.executable else []), "-m", "pip", *args,
               "--disable-pip-version-check"]
    say("running: " + " ".join(command))
    subprocess.check_call(command)


def unmet(lines: list[str]) -> list[str]:
    """Requirement lines whose package is missing or at a version outside the specifier."""
    from packaging.requirements import Requirement

    missing = []
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = version(req.name)
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            missing.append(line)
    return missing


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def has_onnxruntime() -> bool:
    return any((d.metadata["Name"] or "").lower().startswith("onnxruntime") for d in importlib.metadata.distributions())


def install_identity(constraints: str) -> None:
    deps = requirement_lines(HERE / "requirements-identity.txt")
    if has_onnxruntime():
        deps = [d for d in deps if not d.lower().startswith("onnxruntime")]
    todo = unmet(deps)
    if todo:
        say(f"face identity: installing insightface's dependencies {todo}")
        pip("install", "-c", constraints, *todo)
    else:
        say("face identity: insightface's dependencies are installed")
    if version("insightface") != INSIGHTFACE:
        say(f"face identity: installing insightface {INSIGHTFACE} without its declared opencv-python")
        pip("install", "-c", constraints, "--no-deps", f"insightface=={INSIGHTFACE}")
    else:
        say(f"face identity: insightface {INSIGHTFACE} is installed")


def install_separator(constraints: str) -> None:
    if not unmet([SEPARATOR]):
        say("vocal separation: audio-separator is installed")
        return
    say("vocal separation: installing audio-separator (a release that fits the installed torch and numpy)")
    try:
        pip("install", "-c", constraints, SEPARATOR)
    except subprocess.CalledProcessError:  # optional node: the rest of the pack still works
        say("vocal separation: audio-separator did not install (see pip's message above); every other node works")


def one_opencv() -> None:
    others = [d for d in OTHER_OPENCV if version(d)]
    have = version(OPENCV)
    if not others and have:
        say(f"OpenCV: only {OPENCV} {have} is installed")
        return
    if others:
        say(f"OpenCV: uninstalling {others}: they share the cv2 folder with {OPENCV}, which mediapipe needs")
        pip("uninstall", "-y", *others)
    # The uninstall removed cv2 files that both wheels wrote: put the kept one back whole, same version.
    say(f"OpenCV: (re)installing {OPENCV}{' ' + have if have else ''}")
    pip("install", "--force-reinstall", "--no-deps", f"{OPENCV}=={have}" if have else OPENCV)


def main() -> None:
    say(f"python {sys.executable}")
    pins = [f"{name}=={version(name)}" for name in PINNED if version(name)]
    say(f"keeping {', '.join(pins) or 'no torch/numpy (none installed)'} as installed")
    with tempfile.TemporaryDirectory() as tmp:
        constraints = str(Path(tmp) / "constraints.txt")
        Path(constraints).write_text("\n".join(pins) + "\n")
        install_identity(constraints)
        install_separator(constraints)
        one_opencv()
    say("done")


if __name__ == "__main__":
    main()
