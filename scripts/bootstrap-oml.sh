#!/usr/bin/env bash
# Prints the path of the virtualenv with open-metric-learning==4.0.0 that the OML parity test
# (tests/it/train_parity.rs) and the OML benchmarks (bench/train_vs_oml.sh,
# bench/pairwise_vs_oml.sh) run, creating it once: ${SIMILE_CACHE:-~/.cache/simile}/oml-4.0.0.
# It reuses the torch wheel and torchvision of simile's torch virtualenv (a .pth file; installed
# first by scripts/bootstrap-pyextras.sh) instead of downloading another, and installs OML
# without its dependency resolver (it pins numpy < 2; the modules used import and run with
# numpy 2), plus the modules they import. OML_VENV=DIR uses another (already complete) one.
# OML_TORCH=latest: instead, a virtualenv with what `pip install open-metric-learning==4.0.0`
# brings today, its own dependency resolution included (torch 2.15.0 on 2026-12-06), for the
# benchmarks that compare with OML at its newest (bench/train_speed.sh):
# ${SIMILE_CACHE:-~/.cache/simile}/oml-4.0.0-pip.
# Safe to run from parallel tests (flock); quick when done.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
LATEST="${OML_TORCH:-}"
case "$LATEST" in
"" | latest) ;;
*) echo "OML_TORCH: 'latest' or unset, not '$LATEST'" >&2; exit 2 ;;
esac
VENV="${OML_VENV:-$CACHE/oml-4.0.0${LATEST:+-pip}}"
# The installs, into $TMP (a new virtualenv made here).
install_latest() {
    python3 -m venv "$TMP"
    "$TMP/bin/python" -m pip install --quiet --upgrade pip >&2
    # OML imports modules its package metadata does not list (omegaconf and others); it pins
    # numpy < 2, which pyarrow 18 is the last to support.
    "$TMP/bin/python" -m pip install --quiet "open-metric-learning==4.0.0" "pyarrow==18.1.0" \
        omegaconf validators gdown matplotlib albumentations opencv-python-headless >&2
}
install_bundled() {
    "$TORCH_VENV/bin/python" -m venv "$TMP"
    py="$(ls -d "$TMP"/lib/python3*/site-packages)"
    echo "$(ls -d "$TORCH_VENV"/lib/python3*/site-packages)" >"$py/simile-torch.pth"
    "$TMP/bin/python" -m pip install --quiet --no-deps "open-metric-learning==4.0.0" >&2
    "$TMP/bin/python" -m pip install --quiet pandas pyarrow gdown omegaconf validators \
        matplotlib albumentations opencv-python-headless >&2
}
if [ ! -f "$VENV/.simile-complete" ]; then
    if [ -z "$LATEST" ]; then
        PY="$(scripts/bootstrap-pyextras.sh)"
        TORCH_VENV="$(dirname "$(dirname "$PY")")"
    fi
    mkdir -p "$CACHE"
    exec 9>"$VENV.lock"
    flock 9
    if [ ! -f "$VENV/.simile-complete" ]; then
        echo "simile: installing open-metric-learning==4.0.0 into $VENV (once${LATEST:+, as pip resolves it: about 5 GB})" >&2
        TMP="$VENV.tmp.$$"
        rm -rf "$TMP"
        if [ -n "$LATEST" ]; then install_latest; else install_bundled; fi
        "$TMP/bin/python" -c "import oml.models, oml.losses.triplet, oml.miners.inbatch_hard_tri, torchvision" >&2
        rm -rf "$VENV"
        mv "$TMP" "$VENV"
        # A venv's scripts hard-code their folder: fix the shebangs after the move.
        grep -rl "$TMP" "$VENV/bin" 2>/dev/null | xargs -r sed -i "s#$TMP#$VENV#g"
        touch "$VENV/.simile-complete"
    fi
fi
echo "$VENV"
