#!/usr/bin/env bash
# Install the pack's Python dependencies into the current Python (a fresh machine or a venv).
# `--dev` adds the test requirements. Inside ComfyUI use ComfyUI's own torch instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
reqs=(-r requirements.txt -r requirements-identity.txt)
[ "${1:-}" = "--dev" ] && reqs+=(-r requirements-dev.txt)
# CPU torch first and pinned for the whole install: an unpinned resolve would pull a CUDA build.
python3 -m pip install --quiet torch==2.13.0
python3 -m pip install --quiet -c <(echo torch==2.13.0) "${reqs[@]}"
# insightface without its declared opencv-python (a second OpenCV next to mediapipe's contrib build).
python3 -m pip install --quiet --no-deps insightface==2.1
