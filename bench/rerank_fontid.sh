#!/usr/bin/env bash
# Quality benchmark of simile-rerank's training-free methods on Font-ID: CMC@1, MAP@5 and
# Precision@5 of plain retrieval and after each method with its documented defaults, and the
# time each takes (wall clock of the simile-rerank process).
#
#   bench/rerank_fontid.sh                       # work/fontid/trained/emb.npy (make demo's)
#   MODEL=smallcnn bench/rerank_fontid.sh        # the untrained baseline's embeddings
#   BIN=target/debug WORK=/tmp/fontid bench/rerank_fontid.sh
#
# Needs make demo's $WORK/dataset.parquet and $WORK/$MODEL/emb.npy (for MODEL=smallcnn or
# another zoo key it embeds the validation split itself when emb.npy is missing).
set -euo pipefail
BIN=${BIN:-target/release}
WORK=${WORK:-work/fontid}
MODEL=${MODEL:-trained}
TOP_K=${TOP_K:-50}
OUT=${OUT:-$WORK/rerank_bench/$MODEL}
DS=$WORK/dataset.parquet
EMB=$WORK/$MODEL/emb.npy
THREADS=${THREADS:-}

[ -f "$DS" ] || { echo "no $DS: run make demo (or simile-prepare fonts --out $WORK) first" >&2; exit 2; }
if [ ! -f "$EMB" ]; then
    if [ "$MODEL" = trained ]; then
        echo "no $EMB: run make demo first, or MODEL=smallcnn $0" >&2
        exit 2
    fi
    "$BIN/simile-embed" --dataset "$DS" --model "$MODEL" --split validation --out "$EMB"
fi
mkdir -p "$OUT"
thr=()
[ -n "$THREADS" ] && thr=(--threads "$THREADS")

"$BIN/simile-distance" --dataset "$DS" --embeddings "$EMB" --split validation --top-k "$TOP_K" \
    "${thr[@]}" --out "$OUT/neighbors.parquet" --force >/dev/null 2>&1
"$BIN/simile-score" --dataset "$DS" --neighbors "$OUT/neighbors.parquet" --out "$OUT/plain.json" \
    --force >/dev/null 2>&1

rows=("plain 0 $OUT/plain.json")
run() {
    local name=$1; shift
    local t0 t1
    t0=$(date +%s.%N)
    "$BIN/simile-rerank" --dataset "$DS" --neighbors "$OUT/neighbors.parquet" \
        --out "$OUT/$name.parquet" --force "${thr[@]}" "$@" >/dev/null 2>"$OUT/$name.log" \
        || { cat "$OUT/$name.log" >&2; exit 1; }
    t1=$(date +%s.%N)
    "$BIN/simile-score" --dataset "$DS" --neighbors "$OUT/$name.parquet" --out "$OUT/$name.json" \
        --force >/dev/null 2>&1
    rows+=("$name $(python3 -c "print(f'{$t1 - $t0:.2f}')") $OUT/$name.json")
}
run aqe --method aqe --embeddings "$EMB"
run alpha-qe --method alpha-qe --embeddings "$EMB"
run dba --method dba --embeddings "$EMB"
run dba-qe --method dba --dba-qe --embeddings "$EMB"
run k-reciprocal --method k-reciprocal --embeddings "$EMB"

echo "Font-ID validation, $MODEL embeddings ($EMB), neighbours top-k $TOP_K:"
python3 - "${rows[@]}" <<'PY'
import json, sys
keys = ["OVERALL/cmc/1", "OVERALL/map/5", "OVERALL/precision/5"]
print("%-14s" % "method" + "".join("%22s" % k for k in keys) + "%10s" % "seconds")
for r in sys.argv[1:]:
    name, secs, path = r.split(" ")
    m = json.load(open(path))
    print("%-14s" % name + "".join("%22.4f" % m[k] for k in keys) + "%10s" % ("-" if name == "plain" else secs))
PY
