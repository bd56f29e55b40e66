#!/usr/bin/env bash
# The pairwise re-ranker against OML's postprocessor pipeline on Font-ID: the same data, the
# same starting extractor (the demo's trained small CNN), the same backbone, sampler, miner and
# schedule; both re-rank the extractor's top-5 on the whole validation split. Prints CMC@1 and
# MAP@5 before (the extractor alone) and after re-ranking for both, and the training times.
#
#   bench/pairwise_vs_oml.sh            # WORK=work/fontid, needs $WORK/trained (make demo)
#
# OML 4.0.0 runs from the virtualenv scripts/bootstrap-oml.sh creates once (shared with
# bench/train_vs_oml.sh; it sees the torch wheel simile builds against, so torch is not
# downloaded again). OML's Lightning/Hydra wrapper is not used (bench/pairwise_oml.py runs OML's classes in a
# plain loop), so its "pipelines" extra is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-work/fontid}
BIN=${BIN:-target/release}
EPOCHS=${EPOCHS:-12}
DS=$WORK/dataset.parquet
EXT=$WORK/trained
[ -f "$DS" ] && [ -f "$EXT/model.json" ] || {
  echo "needs $DS and the trained extractor $EXT (run make demo first)" >&2
  exit 2
}

OML_VENV=$(scripts/bootstrap-oml.sh)

echo "== simile (simile-train, pairwise mode, siamese fusion; validation = the whole validation split)" >&2
OUT=$WORK/bench_pairwise
rm -rf "$OUT"
t0=$(date +%s)
"$BIN/simile-train" --dataset "$DS" --config pipelines/configs/fontid_pairwise.toml --out "$OUT" \
  --set "pairwise.extractor=$EXT" --set "model.init=$EXT" --set "epochs=$EPOCHS" \
  --set pairwise.val_queries=0 --device cpu
t1=$(date +%s)
"$OML_VENV/bin/python" - "$OUT" "$((t1 - t0))" <<'EOF'
import json, sys
import pyarrow.parquet as pq
out = sys.argv[1]
before = json.load(open(out + "/model.json"))["provenance"]["extractor_validation"]
after = pq.read_table(out + "/val_metrics.parquet").to_pylist()[-1]
keys = ["OVERALL/cmc/1", "OVERALL/cmc/5", "OVERALL/precision/5", "OVERALL/map/5"]
print(json.dumps({"side": "simile", "extractor": {k: before.get(k) for k in keys},
                  "reranked": {k: after.get(k) for k in keys},
                  "wall_seconds": int(sys.argv[2])}))
EOF

# simile's side uses the siamese fusion (its default for CNNs); OML has only ConcatSiamese,
# which stacks the pair. Same learning rates as fontid_pairwise.toml.
echo "== OML 4.0.0 (ConcatSiamese: stacked pair; PairsMiner, PairwiseReranker)" >&2
"$OML_VENV/bin/python" bench/pairwise_oml.py --dataset "$DS" --extractor "$EXT" --epochs "$EPOCHS" \
  --lr 2e-3 --lr-backbone 5e-4
