#!/usr/bin/env bash
# simile-score vs OML 4.0's calc_retrieval_metrics on the same neighbours, in one run.
#
#   bench/score_vs_oml.sh [--queries 1000000] [--k 100] [--repeats 3] [--json out.json]
#
# Creates (once) a virtualenv with open-metric-learning==4.0.0 from PyPI (it pulls torch:
# a few minutes, ~6 GB), pyarrow and xxhash in ${XDG_CACHE_HOME:-$HOME/.cache}/simile/bench-oml,
# builds simile-score (release), generates a dataset and 1,000,000 queries x k = 100
# neighbours (written as simile's Parquet files and as OML's tensors), times simile's whole
# process and OML's metric call alone, checks the numbers agree within 1e-6 and prints the
# ratio and simile's peak memory. Data goes to ${TMPDIR:-/tmp}/simile-bench-score (~1 GB);
# the Python process needs about 8 GB of memory at the default size.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
VENV="$CACHE/bench-oml"
if [ ! -f "$VENV/.simile-complete" ]; then
    echo "bench: installing open-metric-learning==4.0.0, pyarrow, xxhash into $VENV (once)" >&2
    mkdir -p "$CACHE"
    TMP="$VENV.tmp.$$"
    rm -rf "$TMP"
    python3 -m venv "$TMP"
    # OML 4.0 pins numpy < 2 (pyarrow 18+ needs numpy 2); oml.const imports omegaconf, which
    # only its "pipelines" extra declares.
    "$TMP/bin/python" -m pip install --quiet "open-metric-learning==4.0.0" omegaconf "pyarrow<18" xxhash
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
exec "$VENV/bin/python" "$ROOT/bench/score_vs_oml.py" --simile "$ROOT/target/release/simile-score" "$@"
