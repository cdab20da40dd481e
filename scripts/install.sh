#!/usr/bin/env bash
# Install the pack's Python dependencies into the current Python (a fresh machine or a venv); `--dev` adds
# the test requirements. Inside ComfyUI, ComfyUI's own torch is kept (see README).
#
# torch: an installed torch is kept and pinned for everything else. Without one, torch==$TORCH_VERSION is
# installed from $TORCH_INDEX_URL when set, else from PyPI, where on Linux it is the CUDA build (about 3 GB
# with its CUDA libraries). For a CPU-only machine:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
files=(requirements.txt requirements-identity.txt)
[ "${1:-}" = "--dev" ] && files+=(requirements-dev.txt)
reqs=()
for f in "${files[@]}"; do reqs+=(-r "$f"); done

installed_torch() { "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true; }

have=$(installed_torch)
if [ -n "$have" ] && [ -z "${TORCH_INDEX_URL:-}" ]; then
    echo "[1/3] torch: keeping the installed torch $have"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "[1/3] torch: installing torch==$TORCH_VERSION from $TORCH_INDEX_URL"
    "$PY" -m pip install --quiet "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
else
    echo "[1/3] torch: installing torch==$TORCH_VERSION from PyPI (on Linux the CUDA build, ~3 GB;" \
         "for the CPU build set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)"
    "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
fi
torch_now=$(installed_torch)
pin="torch==${torch_now%%+*}"  # the public version: any local build (+cpu, +cu126) satisfies it

echo "[2/3] requirements: ${files[*]} (with $pin kept)"
"$PY" -m pip install --quiet -c <(echo "$pin") "${reqs[@]}"

# insightface without its declared opencv-python (a second OpenCV next to mediapipe's contrib build).
echo "[3/3] insightface==2.1 (without its opencv-python dependency)"
"$PY" -m pip install --quiet -c <(echo "$pin") --no-deps insightface==2.1
echo "done: torch $(installed_torch) ($("$PY" -c 'import torch; print("CUDA " + torch.version.cuda if torch.version.cuda else "CPU only")'))"
