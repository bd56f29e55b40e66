#!/usr/bin/env bash
# simile-train on Font-ID with the documented default config, against the zero-shot baselines.
#
#   bench/train_fontid.sh [--set key=value ...]      (extra arguments go to simile-train)
#
# Builds the release binaries, prepares Font-ID into work/fontid (once), trains
# pipelines/configs/fontid.toml into work/fontid/model-bench (timed), then embeds, searches and
# scores the validation split with the trained model and with the two baselines of the embed
# issue (the untrained zoo `smallcnn`, and `efficientnet-lite0-imagenet`), through the stage
# binaries, and prints CMC@1 / MAP@5 side by side with the learning curve (val_metrics).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=/dev/null
. scripts/env.sh
cargo build --release --quiet --bins
BIN="$ROOT/target/release"
WORK="${WORK:-$ROOT/work/fontid}"
[ -f "$WORK/dataset.parquet" ] || "$BIN/simile-prepare" fonts --out "$WORK" >/dev/null
DS="$WORK/dataset.parquet"
OUT="$WORK/model-bench"
rm -rf "$OUT"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s.%N)
"$BIN/simile-train" --dataset "$DS" --config pipelines/configs/fontid.toml --out "$OUT" --device cpu "$@"
end=$(date +%s.%N)
echo "train wall time: $(echo "$end - $start" | bc) s"
score() { # model name
    local m="$1" tag="$2"
    "$BIN/simile-embed" --dataset "$DS" --model "$m" --split validation --out "$WORK/bench-$tag.npy" --device cpu >/dev/null 2>&1
    "$BIN/simile-distance" --dataset "$DS" --embeddings "$WORK/bench-$tag.npy" --out "$WORK/bench-$tag.nb.parquet" --device cpu >/dev/null 2>&1
    "$BIN/simile-score" --dataset "$DS" --neighbors "$WORK/bench-$tag.nb.parquet" --out "$WORK/bench-$tag.metrics.json" >/dev/null 2>&1
    python3 - "$WORK/bench-$tag.metrics.json" "$tag" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m = m.get("metrics", m)
print(f"{sys.argv[2]:<28} CMC@1 {m['OVERALL/cmc/1']:.4f}  MAP@5 {m['OVERALL/map/5']:.4f}")
PY
}
echo "validation split, L2, simile-embed + simile-distance + simile-score:"
score smallcnn "untrained-smallcnn"
score efficientnet-lite0-imagenet "efficientnet-lite0-imagenet" || echo "efficientnet-lite0-imagenet: unavailable"
score "$OUT" "trained (fontid.toml)"
echo "learning curve (val_metrics.parquet): epoch step CMC@1"
python3 - "$OUT/train_log.parquet" "$OUT/val_metrics.parquet" <<'PY' || true
import sys
try:
    import pyarrow.parquet as pq
except ImportError:
    print("(pyarrow not installed: read val_metrics.parquet with any Parquet reader)"); sys.exit(0)
v = pq.read_table(sys.argv[2]).to_pydict()
for e, s, c in zip(v["epoch"], v["step"], v["OVERALL/cmc/1"]):
    print(f"  {e:3d} {s:5d} {c:.4f}")
PY
