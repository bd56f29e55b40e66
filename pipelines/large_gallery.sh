#!/usr/bin/env bash
# Batch scoring of a large gallery (docs/large_gallery.md): a catalogue embedded once and
# cached, a new unlabelled query batch searched against it over gallery shards (one process
# per shard, as cluster workers would run them), the parts merged, the result shown and
# checked against a float64 brute force on a sample of queries.
#
#   pipelines/large_gallery.sh [--rows 5000000] [--queries 10000] [--dim 128] [--shards 4]
#       [--top-k 10] [--device auto] [--threads N] [--sample 100] [--batch-seed 1]
#       [--work DIR] [--cleanup]
#
# The catalogue's embeddings are generated (bench/gen_gallery.py: clustered Gaussian
# identities, streamed) in place of `simile-embed`, which could not embed 5M images on two
# cores; everything after them is the real stage binaries. A second run with the same
# --rows/--dim/--work reuses the cached catalogue (embeddings and catalog.parquet) and only
# scores the new batch (use another --batch-seed for a different batch).
# Prints a table of wall time, CPU time and peak RSS per stage (/usr/bin/time -v), the disk
# each artifact takes and the machine load. --cleanup deletes the work folder at the end.
# Needs python3 (a virtualenv with numpy and pyarrow is made once under ~/.cache/simile).
# SIMILE_BIN=DIR runs prebuilt binaries from DIR instead of `cargo build --release`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROWS=5000000 QUERIES=10000 DIM=128 SHARDS=4 TOPK=10 DEVICE=auto THREADS="" SAMPLE=100
BATCH_SEED=1 WORK="${TMPDIR:-/tmp}/simile-large-gallery" CLEANUP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rows) ROWS="$2"; shift 2 ;;
        --queries) QUERIES="$2"; shift 2 ;;
        --dim) DIM="$2"; shift 2 ;;
        --shards) SHARDS="$2"; shift 2 ;;
        --top-k) TOPK="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --sample) SAMPLE="$2"; shift 2 ;;
        --batch-seed) BATCH_SEED="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        --cleanup) CLEANUP=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "large_gallery.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

for v in ROWS QUERIES DIM SHARDS TOPK SAMPLE; do
    if ! [[ "${!v}" =~ ^[1-9][0-9]*$ ]]; then
        echo "large_gallery.sh: --$(echo "$v" | tr 'A-Z' 'a-z' | sed 's/topk/top-k/') must be a positive integer, got '${!v}'" >&2
        exit 2
    fi
done
if [ "$SHARDS" -gt "$ROWS" ]; then
    echo "large_gallery.sh: --shards $SHARDS is more than --rows $ROWS" >&2
    exit 2
fi

CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
VENV="$CACHE/bench-gallery"
if [ ! -f "$VENV/.simile-complete" ]; then
    echo "large_gallery: installing numpy and pyarrow into $VENV (once)" >&2
    mkdir -p "$CACHE"
    TMP="$VENV.tmp.$$"
    rm -rf "$TMP"
    python3 -m venv "$TMP"
    "$TMP/bin/python" -m pip install --quiet numpy pyarrow
    rm -rf "$VENV"
    mv "$TMP" "$VENV"
    touch "$VENV/.simile-complete"
fi
PY="$VENV/bin/python"
GEN="$ROOT/bench/gen_gallery.py"
BIN="${SIMILE_BIN:-}"
if [ -z "$BIN" ]; then
    (cd "$ROOT" && . scripts/env.sh && cargo build --release --quiet --bins)
    BIN="$ROOT/target/release"
fi

GAL="$WORK/gallery-$ROWS-$DIM"
BATCH="$WORK/batch-$BATCH_SEED-$QUERIES"
TIMES="$BATCH/times.tsv"
mkdir -p "$GAL" "$BATCH"
: >"$TIMES"

# Runs a stage under /usr/bin/time -v and appends "name wall_s cpu_s max_rss_kb" to $TIMES.
timed() {
    local name="$1"; shift
    local t="$BATCH/time.${name//\//-of-}.txt" rc=0
    echo "== $name: $*" >&2
    /usr/bin/time -v -o "$t" "$@" || rc=$?
    awk -v n="$name" -F': ' '
        /Elapsed \(wall clock\)/ { k = split($2, p, ":"); w = 0; for (i = 1; i <= k; i++) w = w * 60 + p[i] }
        /User time/ { u = $2 } /System time/ { s = $2 } /Maximum resident/ { r = $2 }
        END { printf "%s\t%.1f\t%.1f\t%d\n", n, w, u + s, r }' "$t" >>"$TIMES"
    return $rc
}

echo "large_gallery: $ROWS x $DIM catalogue, $QUERIES queries, k = $TOPK, $SHARDS gallery shards, work $WORK" >&2
echo "load before: $(uptime)" >&2

# 1. The catalogue, embedded once and cached: reused when its embeddings are complete
#    (gen.json is written last) and its dataset is newer than its CSV.
if [ -f "$GAL/gen.json" ] && [ -f "$GAL/emb.npy" ]; then
    echo "== catalogue embeddings: cached ($GAL/emb.npy)" >&2
else
    timed gen-catalogue "$PY" "$GEN" gallery --out "$GAL" --rows "$ROWS" --dim "$DIM"
fi
if [ -f "$GAL/catalog.parquet" ] && [ "$GAL/catalog.parquet" -nt "$GAL/catalog.csv" ]; then
    echo "== catalogue dataset: cached ($GAL/catalog.parquet)" >&2
else
    timed prepare-catalogue "$BIN/simile-prepare" csv --csv "$GAL/catalog.csv" \
        --skip-file-check --out "$GAL/catalog.parquet"
fi

# 2. A new unlabelled batch: its dataset (path column only: split `inference`) and embeddings.
timed gen-batch "$PY" "$GEN" batch --out "$BATCH" --gallery "$GAL" --queries "$QUERIES" --seed "$BATCH_SEED"
timed prepare-batch "$BIN/simile-prepare" csv --csv "$BATCH/batch.csv" --unlabeled \
    --skip-file-check --out "$BATCH/batch.parquet"

# 3. One process per gallery shard: each reads the whole (small) batch and 1/SHARDS of the
#    catalogue's embeddings. On a cluster each line is one worker; here they run in turn.
NN="$BATCH/neighbors.parquet"
rm -f "$BATCH"/neighbors.part-*-of-*.parquet*
for ((i = 0; i < SHARDS; i++)); do
    timed "distance-$i/$SHARDS" "$BIN/simile-distance" \
        --query-dataset "$BATCH/batch.parquet" --query-embeddings "$BATCH/emb.npy" \
        --gallery-dataset "$GAL/catalog.parquet" --gallery-embeddings "$GAL/emb.npy" \
        --out "$NN" --top-k "$TOPK" --device "$DEVICE" ${THREADS:+--threads "$THREADS"} \
        --gallery-shard "$i/$SHARDS"
done
PARTS_BYTES=$(cat "$BATCH"/neighbors.part-*-of-"$SHARDS".parquet | wc -c)
# The search's own seconds from each part's manifest: the rest of a worker's wall time is the
# fixed cost (start-up, reading both datasets, writing) that more shards do not shrink.
SEARCH="$BATCH/search.tsv"
for ((i = 0; i < SHARDS; i++)); do
    "$PY" -c 'import json, sys; t = json.load(open(sys.argv[1]))["timings_s"]["search"]
print("distance-" + sys.argv[2] + "\t" + format(t, ".1f"))' \
        "$BATCH/neighbors.part-$i-of-$SHARDS.parquet.manifest.json" "$i/$SHARDS"
done >"$SEARCH"

# 4. Merge the parts: per query, the k best of the SHARDS lists.
timed merge "$BIN/simile-distance" merge --out "$NN"

# 5. Show and check: top-1 identity on the whole batch, a float64 brute force on a sample.
CHECK_RC=0
timed check "$PY" "$GEN" check --gallery "$GAL" --batch "$BATCH" --neighbors "$NN" \
    --catalog "$GAL/catalog.parquet" --sample "$SAMPLE" || CHECK_RC=$?

echo "load after: $(uptime)" >&2
size() { du -b "$@" 2>/dev/null | awk '{ s += $1 } END { printf "%.1f MiB", s / 1048576 }'; }
{
    echo
    echo "| stage | wall s | of which search s | CPU s | peak RSS MiB |"
    echo "|---|---|---|---|---|"
    awk -F'\t' 'NR == FNR { s[$1] = $2; next }
        { printf "| %s | %s | %s | %s | %.0f |\n", $1, $2, ($1 in s) ? s[$1] : "", $3, $4 / 1024 }' \
        "$SEARCH" "$TIMES"
    echo
    echo "| artifact | size |"
    echo "|---|---|"
    echo "| catalogue embeddings (emb.npy + emb.ids.npy) | $(size "$GAL/emb.npy" "$GAL/emb.ids.npy") |"
    echo "| catalogue CSV | $(size "$GAL/catalog.csv") |"
    echo "| catalogue dataset (catalog.parquet) | $(size "$GAL/catalog.parquet") |"
    echo "| batch dataset + embeddings | $(size "$BATCH/batch.parquet" "$BATCH/emb.npy" "$BATCH/emb.ids.npy") |"
    echo "| $SHARDS shard parts (deleted after the merge) | $(echo "$PARTS_BYTES" | awk '{ printf "%.1f MiB", $1 / 1048576 }') |"
    echo "| neighbors.parquet | $(size "$NN") |"
} | tee "$BATCH/summary.md"
rm -f "$BATCH"/neighbors.part-*-of-*.parquet*
if [ "$CLEANUP" = 1 ]; then
    rm -rf "$WORK"
    echo "large_gallery: removed $WORK" >&2
fi
if [ "$CHECK_RC" != 0 ]; then
    echo "large_gallery: the brute-force check FAILED (see above)" >&2
    exit 1
fi
