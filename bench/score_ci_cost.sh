#!/usr/bin/env bash
# What simile-score's confidence intervals cost at scale, in one run: the same 1,000,000
# queries x k = 100 neighbours (bench/score_vs_oml.py's generator: classes of 2 to 12 items)
# scored with --ci off, with the default bootstrap over labels and with --ci-by query; prints
# each whole-process time (median of --repeats), the manifest's `intervals` step, the share it
# adds, and checks that the means are the same with and without intervals.
#
#   bench/score_ci_cost.sh [--queries 1000000] [--k 100] [--repeats 3] [--reuse]
#
# The generator's Python needs numpy, pyarrow and xxhash: a small virtualenv made once in
# ${XDG_CACHE_HOME:-$HOME/.cache}/simile/bench-score-data. Data in ${TMPDIR:-/tmp}/simile-bench-score.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
VENV="$CACHE/bench-score-data"
if [ ! -f "$VENV/.simile-complete" ]; then
    echo "bench: installing numpy, pyarrow, xxhash into $VENV (once)" >&2
    mkdir -p "$CACHE"
    TMP="$VENV.tmp.$$"
    rm -rf "$TMP"
    python3 -m venv "$TMP"
    "$TMP/bin/python" -m pip install --quiet numpy pyarrow xxhash
    rm -rf "$VENV"
    mv "$TMP" "$VENV"
    touch "$VENV/.simile-complete"
fi
(
    cd "$ROOT"
    # shellcheck source=/dev/null
    . scripts/env.sh
    cargo build --release --quiet --bin simile-score
)
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo uncommitted)"
exec "$VENV/bin/python" "$ROOT/bench/score_vs_oml.py" --simile "$ROOT/target/release/simile-score" --ci-cost "$@"
