#!/usr/bin/env bash
# Issue 24's whole-run parity harness, long form (tests/it/train_run_parity.rs is the short one
# in `make test`): simile-train and OML 4.0 start from the same weights (OML's ResnetExtractor,
# seeded, imported with `simile-embed import`), read the same generated glyph images and train
# OML's recipe (resnet18 from scratch, balance 16 x 4, hard triplets margin 0.2, AdamW 1e-3 wd
# 0.01, constant LR, L2-normalised 512-d, ImageNet mean/std, 64 px grey PNGs, stretch) on the
# same batches: simile-train writes each step's dataset rows (SIMILE_TRAIN_TRACE) and
# tests/fixtures_py/oml_run.py trains OML on exactly those.
#
#   bench/train_run_vs_oml.sh [--steps 198] [--train-labels 300] [--val-labels 100] [--samples 20]
#                             [--seed 0] [--forced "0 1 18 50 108 197"] [--det-steps 20] [--work DIR] [--keep]
#   SIMILE_BIN=/work/frozen-bin nice -n 10 bench/train_run_vs_oml.sh --steps 198
#
# Prints:
# - free runs: per step at checkpoints (loss, active_tri, grad norm, both sides, differences) and
#   by step ranges, the first step where simile-vs-OML goes beyond OML-vs-OML, the final weights'
#   10 largest relative differences per tensor, BatchNorm buffers, validation-embedding cosines
#   and CMC@1 of both; the floor in the same run: OML again with the same threads (OML as
#   shipped is not deterministic with 2 threads, see oml_run.py) and OML with 1 thread; and
#   (--det-steps N, 0 to skip) OML twice with deterministic algorithms for N steps;
# - forced steps: at each k of --forced, OML's step k taken from simile's exact state after k
#   steps (simile's checkpoint: weights, BatchNorm statistics, AdamW moments and step counts)
#   against simile's own step k: the per-step map, free of the runs' accumulated divergence;
#   with its floor: the same forced steps of OML with 1 thread against 2;
# - the validation path: OML's extractor and metrics on simile's final weights against
#   simile's validation and simile-embed.
#
# The run is --steps rounded to whole epochs (train labels // 16 batches each), so that it ends
# with simile's validation and model folder. simile trains in segments (--stop-after-steps, then
# --resume: the same run, tested bit for bit) to keep its checkpoints after k and k + 1 steps.
# Both sides use 2 threads. Time: about 2.3 s a step per run on 2 shared cores (simile once, OML
# three times, the 1-thread run a little slower): 198 steps took 36 minutes at load 4 to 6
# (2026-12-06, AMD EPYC, 2 cores). Disk: about 5 GB at the peak (simile's checkpoints after k and
# k + 1 steps, 135 MB each, and OML's forced steps, 180 MB each); the checkpoints, forced steps
# and the floor's weights are deleted at the end unless --keep.
# SIMILE_BIN: a folder with frozen simile binaries (otherwise target/release, built here).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STEPS=198
TRAIN_LABELS=300
VAL_LABELS=100
SAMPLES=20
SEED=0
FORCED="0 1 18 50 108 197"
DET_STEPS=20
KEEP=
WORK=
while [ $# -gt 0 ]; do
    case "$1" in
    --steps) STEPS="$2"; shift 2 ;;
    --train-labels) TRAIN_LABELS="$2"; shift 2 ;;
    --val-labels) VAL_LABELS="$2"; shift 2 ;;
    --samples) SAMPLES="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --forced) FORCED="$2"; shift 2 ;;
    --det-steps) DET_STEPS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
if [ -z "${SIMILE_BIN:-}" ]; then
    # shellcheck source=/dev/null
    . scripts/env.sh
    cargo build --release --quiet --bin simile-train --bin simile-prepare --bin simile-embed
fi
BIN="${SIMILE_BIN:-$ROOT/target/release}"
PY="$(scripts/bootstrap-oml.sh)/bin/python"
RUN=tests/fixtures_py/oml_run.py
SET="glyphs-${TRAIN_LABELS}x${VAL_LABELS}x${SAMPLES}-s${SEED}"
WORK="${WORK:-$ROOT/work/train-run-vs-oml}"
DATA="$WORK/$SET"
SPE=$((TRAIN_LABELS / 16))
EPOCHS=$(((STEPS + SPE - 1) / SPE))
N=$((EPOCHS * SPE))
OUT="$WORK/$SET-n$N"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet 2>/dev/null || echo ' (uncommitted changes)'); simile binaries: $BIN"
echo "set: $TRAIN_LABELS train + $VAL_LABELS validation labels x $SAMPLES; $N steps ($EPOCHS epochs of $SPE)"
t0=$SECONDS
if [ ! -f "$DATA/df.csv" ]; then
    "$PY" "$RUN" gen "$DATA.tmp" --train-labels "$TRAIN_LABELS" --val-labels "$VAL_LABELS" --samples "$SAMPLES" --seed "$SEED"
    rm -rf "$DATA"
    mv "$DATA.tmp" "$DATA"
fi
[ -f "$DATA/dataset.parquet" ] || "$BIN/simile-prepare" csv --csv "$DATA/df.csv" --out "$DATA/dataset.parquet" >/dev/null
[ -d "$DATA/init-model" ] || "$BIN/simile-embed" import --arch resnet18 --weights "$DATA/init.pth" --size 64 \
    --resize stretch --normalise --out "$DATA/init-model" >/dev/null
rm -rf "$OUT"
mkdir -p "$OUT/ckpt"
cat >"$OUT/config.toml" <<TOML
seed = 0
epochs = $EPOCHS
valid_period = 0
valid_at_start = false

[model]
init = "$DATA/init-model"
arch = "resnet18"
pool = "avg"
normalise = true
size = 64
resize = "stretch"
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[sampler]
name = "balance"
n_labels = 16
n_instances = 4

[loss]
name = "triplet"
margin = 0.2

[loss.miner]
name = "hard_triplets"

[optimizer]
name = "adamw"
lr = 1e-3
weight_decay = 0.01

[schedule]
name = "constant"
TOML
# simile: stops after k and k + 1 steps of every forced k (k = 0: after 1), then to the end.
AT=
STOPS=()
for k in $FORCED; do
    [ "$k" -lt "$N" ] || continue
    AT="${AT:+$AT,}$k"
    [ "$k" -gt 0 ] && STOPS+=("$k")
    [ $((k + 1)) -lt "$N" ] && STOPS+=($((k + 1)))
done
mapfile -t STOPS < <(printf '%s\n' "${STOPS[@]}" | sort -n -u)
export SIMILE_TRAIN_TRACE="$OUT/trace.jsonl"
train() { # extra args
    "$BIN/simile-train" --dataset "$DATA/dataset.parquet" --config "$OUT/config.toml" --out "$OUT/simile" \
        --device cpu --threads 2 --cache-dir "$WORK/cache" --log-every 50 "$@" >>"$OUT/simile.log" 2>&1 || {
        tail -20 "$OUT/simile.log" >&2
        exit 1
    }
}
ts=$SECONDS
resume=()
for s in "${STOPS[@]}"; do
    train "${resume[@]}" --stop-after-steps "$s"
    cp -r "$OUT/simile/checkpoints/last" "$OUT/ckpt/$s"
    resume=(--resume)
done
train "${resume[@]}"
cp -r "$OUT/simile/checkpoints/last" "$OUT/ckpt/$N"
unset SIMILE_TRAIN_TRACE
"$BIN/simile-embed" --dataset "$DATA/dataset.parquet" --model "$OUT/simile" --split validation --device cpu \
    --threads 2 --out "$OUT/simile-val-emb.npy" >/dev/null 2>&1
echo "simile: $N steps in $((SECONDS - ts)) s ($((${#STOPS[@]} + 1)) segments)"
ts=$SECONDS
"$PY" "$RUN" train "$DATA" --trace "$OUT/trace.jsonl" --steps "$N" --dest "$OUT/oml"
echo "OML: $N steps in $((SECONDS - ts)) s"
ts=$SECONDS
"$PY" "$RUN" floor "$DATA" --trace "$OUT/trace.jsonl" --steps "$N" --dest "$OUT/floor" --a "$OUT/oml" >/dev/null
echo "floor (OML again, and with 1 thread): $((SECONDS - ts)) s"
if [ "$DET_STEPS" -gt 0 ]; then
    "$PY" "$RUN" floor "$DATA" --trace "$OUT/trace.jsonl" --steps "$((DET_STEPS < N ? DET_STEPS : N))" \
        --dest "$OUT/floor-det" --deterministic | sed 's/^floor/OML with deterministic algorithms, floor/'
fi
"$PY" "$RUN" forced "$DATA" --trace "$OUT/trace.jsonl" --ckpts "$OUT/ckpt" --at "$AT" --dest "$OUT/forced"
"$PY" "$RUN" forced "$DATA" --trace "$OUT/trace.jsonl" --ckpts "$OUT/ckpt" --at "$AT" --dest "$OUT/forced-t1" --threads 1
"$PY" "$RUN" evaluate "$DATA" --weights "$OUT/simile/model.safetensors" --dest "$OUT/oml-on-simile"
"$PY" "$RUN" compare --simile "$OUT/simile" --simile-emb "$OUT/simile-val-emb.npy" --oml "$OUT/oml" \
    --floor "$OUT/floor/floor.json" --floor-a "$OUT/oml" --floor-b "$OUT/floor/b" \
    --floor-emb "$OUT/floor/b/val_emb.npy" --floor-val "$OUT/floor/b/val.json" \
    --forced "$OUT/forced" --forced-floor "$OUT/forced-t1" --ckpts "$OUT/ckpt" --at "$AT" --evaluated "$OUT/oml-on-simile" --json "$OUT/compare.json"
[ -n "$KEEP" ] || rm -rf "$OUT/ckpt" "$OUT/forced" "$OUT/forced-t1" "$OUT/floor/b" "$OUT/floor/t1" "$OUT/floor-det" \
    "$OUT/simile/checkpoints"
echo "total $((SECONDS - t0)) s, load at the end $(cut -d' ' -f1-3 /proc/loadavg); outputs in $OUT"
