#!/usr/bin/env bash
# simile-train vs OML 4.0 on Font-ID: the same CSV, network (the small CNN), sampler, miner,
# loss, optimiser, schedule and number of steps; validation CMC@1 / MAP@5 and training
# images/s for both, per seed.
#
#   bench/train_vs_oml.sh [--seeds "0 1 2"] [--epochs N] [--config pipelines/configs/fontid.toml]
#
# OML runs from bench/train_vs_oml.py: OML's BalanceSampler, miners, TripletLossWithMiner /
# ArcFaceLoss and metrics in a plain PyTorch loop (its Lightning pipeline wraps the same calls),
# the network a PyTorch copy of simile's smallcnn. OML goes (once) into its own virtualenv,
# ${XDG_CACHE_HOME:-$HOME/.cache}/simile/bench-oml-train, that reuses the torch wheel of
# simile's torch virtualenv (a .pth file) instead of downloading another: open-metric-learning
# ==4.0.0 without its dependency resolver (it pins numpy < 2; the modules used here import and
# run with the venv's numpy 2) plus the modules it imports, and pyarrow to read simile's logs. Threads: both sides get the same
# 2 intra-op threads (torch.set_num_threads / simile's libtorch default on 2 cores).
#
# Data: work/fontid
# (simile-prepare fonts, once). The comparison is at equal steps; compare throughput on an idle
# machine only (the load average is printed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SEEDS="0 1 2"
CONFIG=pipelines/configs/fontid.toml
EPOCHS=
while [ $# -gt 0 ]; do
    case "$1" in
    --seeds) SEEDS="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
# shellcheck source=/dev/null
. scripts/env.sh
TORCH_VENV="$(scripts/bootstrap-torch.sh)"
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
VENV="$CACHE/bench-oml-train"
if [ ! -f "$VENV/.simile-complete" ]; then
    echo "bench: installing open-metric-learning==4.0.0 into $VENV (once)" >&2
    TMP="$VENV.tmp.$$"
    rm -rf "$TMP"
    "$TORCH_VENV/bin/python" -m venv "$TMP"
    py="$(ls -d "$TMP"/lib/python3*/site-packages)"
    echo "$(ls -d "$TORCH_VENV"/lib/python3*/site-packages)" >"$py/simile-torch.pth"
    "$TMP/bin/python" -m pip install --quiet --no-deps "open-metric-learning==4.0.0"
    "$TMP/bin/python" -m pip install --quiet pandas pyarrow gdown omegaconf validators matplotlib albumentations
    rm -rf "$VENV"
    mv "$TMP" "$VENV"
    touch "$VENV/.simile-complete"
fi
cargo build --release --quiet --bin simile-train --bin simile-prepare
BIN="$ROOT/target/release"
WORK="${WORK:-$ROOT/work/fontid}"
[ -f "$WORK/dataset.parquet" ] || "$BIN/simile-prepare" fonts --out "$WORK" >/dev/null
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit: $(git rev-parse --short HEAD 2>/dev/null || echo uncommitted)"
# simile trains the shipped config (its epochs unless --epochs); the OML side reads the
# resolved config.toml of that run, so both train the same recipe.
SETS=(--set valid_period=0 --set valid_at_start=false)
[ -n "$EPOCHS" ] && SETS+=(--set "epochs=$EPOCHS")
for seed in $SEEDS; do
    echo "== seed $seed, load $(cut -d' ' -f1-3 /proc/loadavg)"
    out="$WORK/bench-oml-simile-$seed"
    rm -rf "$out"
    "$BIN/simile-train" --dataset "$WORK/dataset.parquet" --config "$CONFIG" \
        --out "$out" --device cpu --set "seed=$seed" "${SETS[@]}" 2>/dev/null
    "$VENV/bin/python" - "$out" <<'PY'
import json, sys
import pyarrow.parquet as pq
out = sys.argv[1]
log = pq.read_table(f"{out}/train_log.parquet").to_pydict()
val = pq.read_table(f"{out}/val_metrics.parquet").to_pydict()
ips = log["images_per_s"]
secs = sum(128 / x for x in ips if x)
keys = ["OVERALL/cmc/1", "OVERALL/cmc/5", "OVERALL/precision/5", "OVERALL/map/5"]
print(json.dumps({"framework": "simile", "steps": len(ips), "train_seconds": round(secs, 2),
                  "images_per_s": round(128 * len(ips) / secs, 1),
                  "metrics": {k: val[k][-1] for k in keys}}))
PY
    echo "  load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$VENV/bin/python" bench/train_vs_oml.py --csv "$WORK/df.csv" --seed "$seed" \
        --simile-config "$out/config.toml"
done
