#!/usr/bin/env bash
# Prints the path of the virtualenv with open-metric-learning==4.0.0 that the OML training
# benchmarks (bench/train_vs_oml.sh, bench/pairwise_vs_oml.sh) run, creating it once:
# ${SIMILE_CACHE:-~/.cache/simile}/bench-oml-train. It reuses the torch wheel of simile's torch
# virtualenv (a .pth file) instead of downloading another, and installs OML without its
# dependency resolver (it pins numpy < 2; the modules used import and run with numpy 2), plus
# the modules they import. OML_VENV=DIR uses another (already complete) one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
VENV="${OML_VENV:-$CACHE/bench-oml-train}"
if [ ! -f "$VENV/.simile-complete" ]; then
    TORCH_VENV="$(scripts/bootstrap-torch.sh)"
    echo "bench: installing open-metric-learning==4.0.0 into $VENV (once)" >&2
    TMP="$VENV.tmp.$$"
    rm -rf "$TMP"
    "$TORCH_VENV/bin/python" -m venv "$TMP"
    py="$(ls -d "$TMP"/lib/python3*/site-packages)"
    echo "$(ls -d "$TORCH_VENV"/lib/python3*/site-packages)" >"$py/simile-torch.pth"
    "$TMP/bin/python" -m pip install --quiet --no-deps "open-metric-learning==4.0.0" >&2
    "$TMP/bin/python" -m pip install --quiet pandas pyarrow gdown omegaconf validators \
        matplotlib albumentations opencv-python-headless >&2
    rm -rf "$VENV"
    mv "$TMP" "$VENV"
    touch "$VENV/.simile-complete"
fi
echo "$VENV"
