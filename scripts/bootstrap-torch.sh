#!/usr/bin/env bash
# Installs the PyPI wheel torch==2.13.0 (libtorch for tch 0.26) into a cached
# virtualenv keyed by version, reused across clones. Prints the venv path.
# Idempotent and quick when the venv is already complete.
set -euo pipefail
TORCH_VERSION=2.13.0
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
VENV="$CACHE/torch-$TORCH_VERSION"
STAMP="$VENV/.simile-complete"
# The CUDA headers simile's NCCL backend compiles against (build.rs) that torch does not pull
# in: the versions of torch 2.13.0's CUDA 13.0.3 (cuda-toolkit[crt,cccl]==13.0.3); small.
CUDA_HEADER_WHEELS=("nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85")
cuda_headers() {
  # Only for a torch with CUDA: a CPU-only torch has no NCCL backend to build.
  if ls "$1"/lib/python3*/site-packages/torch/lib/libtorch_cuda.so >/dev/null 2>&1 &&
    ! ls "$1"/lib/python3*/site-packages/nvidia/cu13/include/crt/host_config.h >/dev/null 2>&1; then
    echo "simile: installing the CUDA headers for the NCCL backend (${CUDA_HEADER_WHEELS[*]})" >&2
    "$1/bin/python" -m pip install --quiet --no-deps "${CUDA_HEADER_WHEELS[@]}" >&2
  fi
}
if [ -f "$STAMP" ]; then
  # Venvs made before the NCCL backend lack the headers: add them once.
  cuda_headers "$VENV"
  echo "$VENV"
  exit 0
fi
mkdir -p "$CACHE"
echo "simile: installing torch==$TORCH_VERSION into $VENV (once; about 4.7 GB)" >&2
# Build in a temp folder then rename, so a killed install never looks complete.
TMP="$VENV.tmp.$$"
rm -rf "$TMP"
python3 -m venv "$TMP" >&2
"$TMP/bin/python" -m pip install --quiet --upgrade pip >&2
"$TMP/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" numpy >&2
cuda_headers "$TMP"
rm -rf "$VENV"
mv "$TMP" "$VENV"
# A venv's scripts hard-code their folder: fix the shebangs after the move.
grep -rl "$TMP" "$VENV/bin" 2>/dev/null | xargs -r sed -i "s#$TMP#$VENV#g"
touch "$STAMP"
echo "$VENV"
