#!/usr/bin/env bash
# Installs the PyPI wheel torch==2.13.0 (libtorch for tch 0.26) into a cached
# virtualenv keyed by version, reused across clones. Prints the venv path.
# Idempotent and quick when the venv is already complete.
set -euo pipefail
TORCH_VERSION=2.13.0
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
VENV="$CACHE/torch-$TORCH_VERSION"
STAMP="$VENV/.simile-complete"
if [ -f "$STAMP" ]; then echo "$VENV"; exit 0; fi
mkdir -p "$CACHE"
echo "simile: installing torch==$TORCH_VERSION into $VENV (once; about 4.7 GB)" >&2
# Build in a temp folder then rename, so a killed install never looks complete.
TMP="$VENV.tmp.$$"
rm -rf "$TMP"
python3 -m venv "$TMP" >&2
"$TMP/bin/python" -m pip install --quiet --upgrade pip >&2
"$TMP/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" numpy >&2
rm -rf "$VENV"
mv "$TMP" "$VENV"
# A venv's scripts hard-code their folder: fix the shebangs after the move.
grep -rl "$TMP" "$VENV/bin" 2>/dev/null | xargs -r sed -i "s#$TMP#$VENV#g"
touch "$STAMP"
echo "$VENV"
