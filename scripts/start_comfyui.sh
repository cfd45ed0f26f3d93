#!/usr/bin/env bash
# The README's main command: start ComfyUI with the Kosmos-G pack, the small default models and
# the example workflows ready.
#   bash scripts/start_comfyui.sh [--dir DATA] [--port 8188] [--smoke] [--cpu] [--threads N] [-- COMFYUI FLAGS]
# First run: installs ComfyUI 0.30.0 + torch into ~/.cache/kosmosg/comfy (about 4 min, ~7 GB;
# set KOSMOSG_CACHE to put it elsewhere); later runs reuse it and start in ~15 s.
# Details: scripts/start_comfyui.py (--help).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for arg in "$@"; do  # --help needs no environment: the script's parser is plain Python
  [ "$arg" = "--" ] && break
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
    exec "${PYTHON:-python3}" "$HERE/scripts/start_comfyui.py" --help
  fi
done
echo "[start_comfyui] preparing the environment under ${KOSMOSG_CACHE:-$HOME/.cache/kosmosg}/comfy (first run takes minutes)" >&2
PY="$(bash "$HERE/.ci/setup_env.sh" | tail -n 1)"
export KOSMOSG_COMFY_DIR="$(dirname "$(dirname "$(dirname "$PY")")")"
exec "$PY" "$HERE/scripts/start_comfyui.py" "$@"
