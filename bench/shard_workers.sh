#!/usr/bin/env bash
# A gallery-shard worker pays for its shard, not for the gallery (docs/large_gallery.md): one
# worker of simile-distance with a fixed shard of --shard-rows catalogue rows, run on generated
# catalogues of each --sizes rows x 128 (bench/gen_gallery.py, as pipelines/large_gallery.sh
# makes them, cached under --work), searching a batch of --queries queries. Prints a table of
# the worker's peak anonymous memory (RssAnon: its own, not the mapped gallery's pages), peak
# RSS, wall time, the search's own seconds (from its manifest) and the rest (start-up: reading
# its rows of the datasets and ids, fingerprinting its blocks, writing), for each size; with
# --before DIR, also for the binaries in DIR (an older build), in the same run.
#
#   bench/shard_workers.sh [--sizes "1000000 5000000 20000000"] [--shard-rows 1000000]
#       [--queries 1000] [--work DIR] [--before DIR]
# SIMILE_BIN=DIR runs prebuilt binaries (default: target/release, built first).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIZES="1000000 5000000 20000000" SHARD_ROWS=1000000 QUERIES=1000
WORK="${TMPDIR:-/tmp}/simile-shard-workers" BEFORE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --sizes) SIZES="$2"; shift 2 ;;
        --shard-rows) SHARD_ROWS="$2"; shift 2 ;;
        --queries) QUERIES="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        --before) BEFORE="$2"; shift 2 ;;
        *) echo "shard_workers.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
BIN="${SIMILE_BIN:-}"
if [ -z "$BIN" ]; then
    (cd "$ROOT" && . scripts/env.sh && cargo build --release --quiet --bins)
    BIN="$ROOT/target/release"
fi
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
VENV="$CACHE/bench-gallery"
if [ ! -f "$VENV/.simile-complete" ]; then
    echo "shard_workers: installing numpy and pyarrow into $VENV (once)" >&2
    mkdir -p "$CACHE"; TMP="$VENV.tmp.$$"; rm -rf "$TMP"
    python3 -m venv "$TMP"; "$TMP/bin/python" -m pip install --quiet numpy pyarrow
    rm -rf "$VENV"; mv "$TMP" "$VENV"; touch "$VENV/.simile-complete"
fi
PY="$VENV/bin/python"
mkdir -p "$WORK"
echo "shard_workers: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git -C "$ROOT" rev-parse --short HEAD)" >&2
echo "| build | catalogue rows | shard | peak anon MiB | peak RSS MiB | wall s | search s | rest s |"
echo "|---|---|---|---|---|---|---|---|"
for n in $SIZES; do
    GAL="$WORK/gallery-$n"
    if [ ! -f "$GAL/gen.json" ]; then
        echo "shard_workers: generating a $n x 128 catalogue in $GAL" >&2
        "$PY" "$ROOT/bench/gen_gallery.py" gallery --out "$GAL" --rows "$n" --dim 128 >&2
    fi
    [ -f "$GAL/catalog.parquet" ] || "$BIN/simile-prepare" csv --csv "$GAL/catalog.csv" \
        --skip-file-check --out "$GAL/catalog.parquet" >/dev/null
    B="$GAL/batch"
    if [ ! -f "$B/batch.parquet" ]; then
        "$PY" "$ROOT/bench/gen_gallery.py" batch --out "$B" --gallery "$GAL" --queries "$QUERIES" >&2
        "$BIN/simile-prepare" csv --csv "$B/batch.csv" --unlabeled --skip-file-check \
            --out "$B/batch.parquet" >/dev/null
    fi
    shards=$(( (n + SHARD_ROWS - 1) / SHARD_ROWS ))
    for build in ${BEFORE:+before} now; do
        bin="$BIN"; [ "$build" = before ] && bin="$BEFORE"
        out="$WORK/nn-$build-$n.parquet"
        rm -f "$WORK"/nn-"$build"-"$n".part-*
        m=$("$PY" "$ROOT/bench/peak_rss.py" "$bin/simile-distance" \
            --query-dataset "$B/batch.parquet" --query-embeddings "$B/emb.npy" \
            --gallery-dataset "$GAL/catalog.parquet" --gallery-embeddings "$GAL/emb.npy" \
            --top-k 10 --device cpu --out "$out" --gallery-shard "0/$shards")
        part="$WORK/nn-$build-$n.part-0-of-$shards.parquet"
        "$PY" - "$m" "$part.manifest.json" "$build" "$n" "0/$shards" <<'PY'
import json, sys
m = json.loads(sys.argv[1])
assert m["exit"] == 0, m
t = json.load(open(sys.argv[2]))["timings_s"]
s = t.get("search", 0.0)
print(f"| {sys.argv[3]} | {int(sys.argv[4]):,} | {sys.argv[5]} | {m['peak_anon_mib']:.0f} | {m['peak_rss_mib']:.0f} | {m['wall_s']:.2f} | {s:.2f} | {m['wall_s'] - s:.2f} |")
PY
    done
done
echo "shard_workers: load after $(cut -d' ' -f1-3 /proc/loadavg)" >&2
