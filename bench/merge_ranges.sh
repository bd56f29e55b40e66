#!/usr/bin/env bash
# Merging gallery-shard parts per query range (docs/conventions.md, Shards): the S parts of a
# two-sided search of --queries unlabelled queries against a labelled --gallery catalogue
# (bench/gen_gallery.py, as pipelines/large_gallery.sh makes them; cached under --work) are
# merged once by one process (`simile-distance merge --out X`) and then, for each R of
# --ranges, by R range merges (`merge --out X --query-shard r/R`, r = 0..R-1) joined by
# `merge --out X --query-parts`. The range merges run here one after another; the slowest of
# them is what R parallel workers would take, their sum is the CPU cost. Every joined result
# is checked against the single-process one (pyarrow: the same rows in the same order, the
# same Parquet metadata, the same manifest params and inputs). Prints a Markdown table; the
# gallery-shard searches that make the parts are run once and only their total is reported.
#
#   bench/merge_ranges.sh [--gallery 200000] [--queries 100000] [--dim 32] [--top-k 100]
#       [--shards 4] [--ranges "1 2 4"] [--work DIR]
# SIMILE_BIN=DIR runs prebuilt binaries (default: target/release, built first).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GALLERY=200000 QUERIES=100000 DIM=32 TOPK=100 SHARDS=4 RANGES="1 2 4"
WORK="${TMPDIR:-/tmp}/simile-merge-ranges"
while [ $# -gt 0 ]; do
    case "$1" in
        --gallery) GALLERY="$2"; shift 2 ;;
        --queries) QUERIES="$2"; shift 2 ;;
        --dim) DIM="$2"; shift 2 ;;
        --top-k) TOPK="$2"; shift 2 ;;
        --shards) SHARDS="$2"; shift 2 ;;
        --ranges) RANGES="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "merge_ranges.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "merge_ranges.sh: $1 must be a positive integer, got '$2'" >&2; exit 2; }; }
posint --gallery "$GALLERY"; posint --queries "$QUERIES"; posint --dim "$DIM"
posint --top-k "$TOPK"; posint --shards "$SHARDS"
[ -n "${RANGES// /}" ] || { echo "merge_ranges.sh: --ranges is empty" >&2; exit 2; }
for r in $RANGES; do posint "--ranges (each)" "$r"; done
if [ "$SHARDS" -gt "$GALLERY" ]; then
    echo "merge_ranges.sh: --shards $SHARDS is more than --gallery $GALLERY" >&2
    exit 2
fi

BIN="${SIMILE_BIN:-}"
if [ -z "$BIN" ]; then
    # shellcheck source=/dev/null
    (cd "$ROOT" && . scripts/env.sh && cargo build --release --quiet --bins)
    BIN="$ROOT/target/release"
fi
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
VENV="$CACHE/bench-gallery"
if [ ! -f "$VENV/.simile-complete" ]; then
    echo "merge_ranges: installing numpy and pyarrow into $VENV (once)" >&2
    mkdir -p "$CACHE"; TMP="$VENV.tmp.$$"; rm -rf "$TMP"
    python3 -m venv "$TMP"; "$TMP/bin/python" -m pip install --quiet numpy pyarrow
    rm -rf "$VENV"; mv "$TMP" "$VENV"; touch "$VENV/.simile-complete"
fi
PY="$VENV/bin/python"
GEN="$ROOT/bench/gen_gallery.py"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
ERR="$WORK/last.err"
# Wall seconds of a command (its stderr kept in $ERR, shown when it fails).
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>"$ERR" || { cat "$ERR" >&2; return 1; }; t1=$(date +%s.%N); awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'; }

echo "merge_ranges: machine $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git -C "$ROOT" rev-parse --short HEAD); $QUERIES queries x $GALLERY gallery x $DIM, k = $TOPK, $SHARDS gallery shards, ranges $RANGES, bin $BIN" >&2

# 1. The labelled catalogue and the unlabelled query batch (embeddings + datasets), cached.
GAL="$WORK/gallery-$GALLERY-$DIM"
if [ ! -f "$GAL/gen.json" ]; then
    echo "merge_ranges: generating a $GALLERY x $DIM catalogue in $GAL" >&2
    "$PY" "$GEN" gallery --out "$GAL" --rows "$GALLERY" --dim "$DIM" >&2
fi
if [ ! -f "$GAL/catalog.parquet" ] || [ "$GAL/catalog.csv" -nt "$GAL/catalog.parquet" ]; then
    "$BIN/simile-prepare" csv --csv "$GAL/catalog.csv" --skip-file-check \
        --out "$GAL/catalog.parquet" >/dev/null
fi
B="$GAL/batch-$QUERIES"
if [ ! -f "$B/emb.npy" ] || [ "$GAL/gen.json" -nt "$B/emb.npy" ]; then
    echo "merge_ranges: generating $QUERIES queries in $B" >&2
    "$PY" "$GEN" batch --out "$B" --gallery "$GAL" --queries "$QUERIES" >&2
fi
if [ ! -f "$B/batch.parquet" ] || [ "$B/batch.csv" -nt "$B/batch.parquet" ]; then
    "$BIN/simile-prepare" csv --csv "$B/batch.csv" --unlabeled --skip-file-check \
        --out "$B/batch.parquet" >/dev/null
fi

# 2. The S gallery-shard parts (simile skips a part that is up to date). The output's name
#    carries k and S, so parts of other shardings never lie beside it.
X="$B/nn-k$TOPK-s$SHARDS.parquet"
STEM="${X%.parquet}"
search_s=0 cached=0
for ((i = 0; i < SHARDS; i++)); do
    s=$(secs "$BIN/simile-distance" \
        --query-dataset "$B/batch.parquet" --query-embeddings "$B/emb.npy" \
        --gallery-dataset "$GAL/catalog.parquet" --gallery-embeddings "$GAL/emb.npy" \
        --top-k "$TOPK" --device cpu --out "$X" --gallery-shard "$i/$SHARDS")
    if grep -q "up to date" "$ERR"; then cached=$((cached + 1)); fi
    search_s=$(awk -v a="$search_s" -v b="$s" 'BEGIN { printf "%.3f", a + b }')
done
echo "merge_ranges: $SHARDS gallery-shard searches: $search_s s in all ($cached of them up to date, skipped)" >&2

# A process's fixed start-up (the binaries load libtorch): the fastest of 3 `--version` runs.
startup=$( { for _ in 1 2 3; do secs "$BIN/simile-distance" --version; echo; done; } | sort -n | head -1)
# The merge's own seconds, from its output's manifest (timings_s.total): wall s less start-up.
own() { "$PY" -c 'import json, sys; print("%.3f" % json.load(open(sys.argv[1] + ".manifest.json"))["timings_s"]["total"])' "$1"; }
# Rows of a Parquet file.
nrows() { "$PY" -c 'import sys, pyarrow.parquet as pq; print(pq.ParquetFile(sys.argv[1]).metadata.num_rows)' "$1"; }
clear_out() { rm -f "$X" "$X.manifest.json" "$STEM".qpart-*-of-*.parquet "$STEM".qpart-*-of-*.parquet.manifest.json; }

# 3. One process merges the S parts; its result (and manifest) is kept as the reference.
clear_out
single=$(secs "$BIN/simile-distance" merge --out "$X" --force)
REF="$WORK/reference.parquet"
cp "$X" "$REF"; cp "$X.manifest.json" "$REF.manifest.json"
rows=$(nrows "$X")
echo "merge_ranges: one-process merge $single s wall, $(own "$X") s its own (manifest); start-up of a process $startup s" >&2

check_equal() {
    "$PY" - "$REF" "$X" <<'PY'
import json, sys
import pyarrow.parquet as pq
ref, got = sys.argv[1], sys.argv[2]
a, b = pq.read_table(ref), pq.read_table(got)
problems = []
if a.schema.remove_metadata() != b.schema.remove_metadata():
    problems.append("schemas differ: " + ", ".join(f"{f.name} {f.type}{'' if f.nullable else ' not null'}" for f in a.schema)
                    + " vs " + ", ".join(f"{f.name} {f.type}{'' if f.nullable else ' not null'}" for f in b.schema))
elif not a.equals(b):
    for c in a.column_names:
        if not a.column(c).equals(b.column(c)):
            x, y = a.column(c).to_numpy(), b.column(c).to_numpy()
            n = min(len(x), len(y))
            first = next((i for i in range(n) if x[i] != y[i]), n)
            problems.append(f"column {c} differs (first at row {first})")
    if a.num_rows != b.num_rows:
        problems.append(f"{a.num_rows} rows vs {b.num_rows}")
# simile's key-value metadata is the file footer's (pyarrow's schema.metadata does not show it).
ma = pq.ParquetFile(ref).metadata.metadata or {}
mb = pq.ParquetFile(got).metadata.metadata or {}
if not any(k.startswith(b"simile.") for k in ma):
    problems.append(f"{ref} has no simile.* footer metadata")
for k in sorted((set(ma) | set(mb)) - {b"ARROW:schema"}):  # the schema is compared above
    if ma.get(k) != mb.get(k):
        problems.append(f"Parquet metadata {k.decode()}: {ma.get(k)!r:.80} vs {mb.get(k)!r:.80}")
fa, fb = json.load(open(ref + ".manifest.json")), json.load(open(got + ".manifest.json"))
for k in ("params", "inputs"):
    if fa.get(k) != fb.get(k):
        problems.append(f"manifest {k} differ")
if problems:
    sys.exit(f"merge_ranges: {got} differs from the single-process merge: " + "; ".join(problems))
PY
}

echo "| merge | processes | wall s per process (max) | sum s | join s | rows merged |"
echo "|---|---|---|---|---|---|"
awk -v w="$single" -v n="$rows" 'BEGIN { printf "| one process (`merge --out`) | 1 | %.2f | %.2f | | %d |\n", w, w, n }'
best_r="" best_t=""
for R in $RANGES; do
    clear_out
    max=0 sum=0 each="" owns=""
    for ((r = 0; r < R; r++)); do
        s=$(secs "$BIN/simile-distance" merge --out "$X" --query-shard "$r/$R" --force)
        max=$(awk -v a="$max" -v b="$s" 'BEGIN { printf "%.3f", (b > a) ? b : a }')
        sum=$(awk -v a="$sum" -v b="$s" 'BEGIN { printf "%.3f", a + b }')
        each="$each $s"
        owns="$owns $(own "$STEM.qpart-$r-of-$R.parquet")"
    done
    join=$(secs "$BIN/simile-distance" merge --out "$X" --query-parts --force)
    echo "merge_ranges: R = $R: range merges$each s wall (own:$owns s), join $join s wall (own: $(own "$X") s)" >&2
    check_equal
    got=$(nrows "$X")
    awk -v r="$R" -v m="$max" -v s="$sum" -v j="$join" -v n="$got" \
        'BEGIN { printf "| per query range (`--query-shard r/%d` + `--query-parts`) | %d | %.2f | %.2f | %.2f | %d |\n", r, r, m, s, j, n }'
    t=$(awk -v m="$max" -v j="$join" 'BEGIN { printf "%.3f", m + j }')
    if [ -z "$best_t" ] || awk -v a="$t" -v b="$best_t" 'BEGIN { exit !(a < b) }'; then
        best_r="$R" best_t="$t"
    fi
done
clear_out
awk -v n="$rows" -v w="$single" -v r="$best_r" -v t="$best_t" -v g="$search_s" -v s="$SHARDS" -v u="$startup" 'BEGIN {
    printf "\nrows/s: one process %.0f; per query range, best R = %d with R parallel workers (slowest range + join, %.2f s) %.0f. Every joined result equals the one-process merge. Each process pays a fixed start-up of %.2f s (`simile-distance --version`), in every figure above. (The %d gallery-shard searches, not in the table: %.2f s in all.)\n", n / w, r, t, n / t, u, s, g }'
echo "merge_ranges: load after $(cut -d' ' -f1-3 /proc/loadavg)" >&2
