#!/usr/bin/env bash
# What the content-true up-to-date check costs (docs/conventions.md: every input byte hashed,
# the images a stage decodes included): for each stage, the wall time of a run that does the
# work and of the run after it, which only fingerprints its inputs, finds the output up to
# date and stops. Both measured here, in the same run, on
#   - Font-ID (prepared from Debian's fonts-aenigma): simile-embed of the validation split and
#     of all rows with the untrained small CNN (the images hashed: ~8,500 / ~28,000 PNGs);
#   - the 5,000,000 x 128 catalogue of pipelines/large_gallery.sh (2.56 GB of float32, made
#     once by that script): simile-distance of a 1,000-query batch against it.
#
#   bench/fingerprint_cost.sh [--rows 5000000] [--work DIR]
# SIMILE_BIN=DIR runs prebuilt binaries (default: target/release, built first).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROWS=5000000 WORK="${TMPDIR:-/tmp}/simile-fingerprint"
while [ $# -gt 0 ]; do
    case "$1" in
        --rows) ROWS="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        *) echo "fingerprint_cost.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
BIN="${SIMILE_BIN:-}"
if [ -z "$BIN" ]; then
    (cd "$ROOT" && . scripts/env.sh && cargo build --release --quiet --bins)
    BIN="$ROOT/target/release"
fi
mkdir -p "$WORK"
export SIMILE_CACHE="$WORK/cache"
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>"$WORK/last.err" || { cat "$WORK/last.err" >&2; return 1; }; t1=$(date +%s.%N); awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'; }
row() { awk -v s="$1" -v i="$2" -v w="$3" -v u="$4" 'BEGIN { printf "| %s | %s | %.2f | %.2f | %.1f%% |\n", s, i, w, u, 100 * u / w }'; }

echo "fingerprint_cost: machine $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git -C "$ROOT" rev-parse --short HEAD)" >&2
FONT="$WORK/fontid"
"$BIN/simile-prepare" fonts --out "$FONT" >/dev/null 2>&1
echo "| stage | input hashed | work run s | up-to-date run s | share |"
echo "|---|---|---|---|---|"
for split in validation all; do
    out="$FONT/emb-$split.npy"
    rm -f "$out" "$out.manifest.json"
    args=(--dataset "$FONT/dataset.parquet" --model smallcnn --split "$split" --device cpu --out "$out")
    w=$(secs "$BIN/simile-embed" "${args[@]}")
    u=$(secs "$BIN/simile-embed" "${args[@]}")
    grep -q "up to date" "$WORK/last.err" || { echo "the second embed was not up to date" >&2; exit 1; }
    n=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["inputs"]["images"]; print(r["path"], "(%.0f MiB)" % (r["fingerprint"]["size"] / 2**20))' "$out.manifest.json")
    row "simile-embed --split $split (Font-ID)" "$n" "$w" "$u"
done

# The large catalogue, made (and cached) by the large-gallery recipe with a small batch.
SIMILE_BIN="$BIN" "$ROOT/pipelines/large_gallery.sh" --rows "$ROWS" --queries 1000 --shards 1 \
    --work "$WORK/lg" >"$WORK/lg.log" 2>&1 || { tail -20 "$WORK/lg.log" >&2; exit 1; }
GAL="$WORK/lg/gallery-$ROWS-128"
BATCH="$WORK/lg/batch-1-1000"
out="$WORK/nn.parquet"
rm -f "$out" "$out.manifest.json"
args=(--query-dataset "$BATCH/batch.parquet" --query-embeddings "$BATCH/emb.npy"
    --gallery-dataset "$GAL/catalog.parquet" --gallery-embeddings "$GAL/emb.npy"
    --top-k 10 --device cpu --out "$out")
w=$(secs "$BIN/simile-distance" "${args[@]}")
u=$(secs "$BIN/simile-distance" "${args[@]}")
grep -q "up to date" "$WORK/last.err" || { echo "the second distance was not up to date" >&2; exit 1; }
bytes=$(du -cb "$GAL/emb.npy" "$GAL/emb.ids.npy" "$GAL/catalog.parquet" "$BATCH/emb.npy" "$BATCH/batch.parquet" | tail -1 | cut -f1)
row "simile-distance, 1,000 queries x $ROWS x 128" "$((bytes / 1048576)) MiB (both sides)" "$w" "$u"
echo "fingerprint_cost: load after $(cut -d' ' -f1-3 /proc/loadavg)" >&2
