#!/usr/bin/env bash
# simile-distance vs FAISS (IndexFlatL2 / IndexFlatIP) on identical random inputs, in one run.
#
#   bench/distance_vs_faiss.sh [--quick] [--skip-large] [--threads N] [--json out.json]
#
# Creates (once) a virtualenv with faiss-cpu, numpy and pyarrow from PyPI in
# ${XDG_CACHE_HOME:-$HOME/.cache}/simile/bench-faiss, builds simile-distance (release), and
# prints markdown tables: seconds, GFLOP/s (2*Q*G*D/t), the throughput ratio, recall of the
# exact top-k, and for the 2M-row gallery the peak anonymous and file-backed memory.
# Data goes to ${TMPDIR:-/tmp}/simile-bench-distance (about 2 GB for the large case).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
VENV="$CACHE/bench-faiss"
if [ ! -f "$VENV/.simile-complete" ]; then
    echo "bench: installing faiss-cpu, numpy, pyarrow into $VENV (once)" >&2
    mkdir -p "$CACHE"
    TMP="$VENV.tmp.$$"
    rm -rf "$TMP"
    python3 -m venv "$TMP"
    "$TMP/bin/python" -m pip install --quiet faiss-cpu numpy pyarrow
    rm -rf "$VENV"
    mv "$TMP" "$VENV"
    touch "$VENV/.simile-complete"
fi
(
    cd "$ROOT"
    # shellcheck source=/dev/null
    . scripts/env.sh
    cargo build --release --quiet --bin simile-distance
)
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo uncommitted)"
exec "$VENV/bin/python" "$ROOT/bench/distance_bench.py" --simile "$ROOT/target/release/simile-distance" "$@"
