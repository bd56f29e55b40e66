#!/usr/bin/env bash
# Start-up cost of each stage binary: wall time (median of --runs) and peak memory of
# `simile-<stage> --version`, which loads the binary and every library it links and does
# nothing else, for the binaries in BIN_DIR (default target/release) and, with --before DIR,
# an older build, in the same run (bench/peak_rss.py: RssAnon and VmHWM).
#
#   bench/startup.sh [--runs 7] [--before DIR] [BIN_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS=7 BEFORE="" BIN=""
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --before) BEFORE="$2"; shift 2 ;;
        *) BIN="$1"; shift ;;
    esac
done
BIN="${BIN:-$ROOT/target/release}"
echo "startup: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git -C "$ROOT" rev-parse --short HEAD)" >&2
echo "| binary | build | start-up s (median of $RUNS) | peak anon MiB | peak RSS MiB | loads libtorch_cuda |"
echo "|---|---|---|---|---|---|"
for stage in prepare train embed distance rerank score; do
    for build in ${BEFORE:+before} now; do
        dir="$BIN"; [ "$build" = before ] && dir="$BEFORE"
        b="$dir/simile-$stage"
        cuda=$(ldd "$b" | grep -q libtorch_cuda && echo yes || echo no)
        for _ in $(seq "$RUNS"); do python3 "$ROOT/bench/peak_rss.py" "$b" --version; done | python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin]
w = statistics.median(r["wall_s"] for r in rows)
a = max(r["peak_anon_mib"] for r in rows); h = max(r["peak_rss_mib"] for r in rows)
print(f"| simile-{sys.argv[1]} | {sys.argv[2]} | {w:.2f} | {a:.0f} | {h:.0f} | {sys.argv[3]} |")' "$stage" "$build" "$cuda"
    done
done
