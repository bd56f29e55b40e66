#!/usr/bin/env bash
# The generated glyph set of issue 24, once: 64 px grey PNGs of 600 train and 600 validation
# DejaVu characters, 23 samples each (tests/fixtures_py/oml_run.py gen, seed 0), prepared into
# DIR/dataset.parquet. Shared by bench/train_vs_oml.sh --data glyphs and bench/init_vs_oml.sh.
#
#   bench/glyphs.sh DIR PYTHON BIN     (PYTHON: the OML virtualenv's; BIN: simile's binaries)
set -euo pipefail
DIR="$1" PY="$2" BIN="$3"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -f "$DIR/dataset.parquet" ]; then
    "$PY" "$ROOT/tests/fixtures_py/oml_run.py" gen "$DIR" --train-labels 600 \
        --val-labels 600 --samples 23 --seed 0 >&2
    "$BIN/simile-prepare" csv --csv "$DIR/df.csv" --out "$DIR/dataset.parquet" >/dev/null
fi
