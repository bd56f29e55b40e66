#!/usr/bin/env bash
# simile-train vs OML 4.0 on Font-ID: the same CSV, network (the small CNN or resnet18), sampler,
# miner, loss, optimiser, schedule and number of steps; validation CMC@1 / MAP@5 and training
# images/s for both, per seed, then per-seed and mean tables (Markdown) with the ratios.
#
#   bench/train_vs_oml.sh [--seeds "0 1 2"] [--epochs N] [--config bench/configs/train_vs_oml_resnet18.toml]
#                         [--compute "fp32 bf16"] [--init torch|tch] [--results FILE] [--data fontid|glyphs]
#   bench/train_vs_oml.sh --data glyphs --seeds "0 1 2 3 4 5 6 7" --compute fp32 --epochs 3
#
# --data glyphs: instead of Font-ID, a held-out glyph set nobody tuned for (issue 24): 64 px grey
# PNGs of 600 train and 600 validation DejaVu characters, 23 samples each, generated once by
# bench/glyphs.sh (tests/fixtures_py/oml_run.py gen, seed 0) into work/glyphs. The summary
# gives each side's mean and standard deviation over the seeds and the difference of the means
# with its standard error (Welch): with seeds differing by up to 0.05 CMC@1, use 8 or more a
# side (8 seeds: about 70 minutes on 2 shared cores for glyphs, 45 for Font-ID).
#   bench/train_vs_oml.sh --config bench/configs/train_vs_oml_smallcnn.toml --compute fp32
#
# Per seed, interleaved so that the machine's load hits both alike: simile (the first
# --compute), OML, then simile in each further --compute (bf16: simile only). The load average
# is printed around each run and recorded in the results (one JSON line per run, by default
# work/fontid/bench-oml/<config name>.jsonl, rewritten each time).
#
# OML runs from bench/train_vs_oml.py: OML's BalanceSampler, miners, TripletLossWithMiner /
# ArcFaceLoss and metrics in a plain PyTorch loop (its Lightning pipeline wraps the same calls),
# the network OML's ResnetExtractor (resnet18) or a PyTorch copy of simile's smallcnn, initialised
# as OML ships it: PyTorch's / torchvision's own init (--init tch: tch's defaults, which simile
# used before issue 14). Both sides are validated before training and after the last epoch.
# OML runs from the virtualenv
# scripts/bootstrap-oml.sh creates once (shared with bench/pairwise_vs_oml.sh): it reuses the torch
# wheel (and torchvision) of simile's torch virtualenv instead of downloading another, with
# open-metric-learning==4.0.0 installed without its dependency resolver (it pins numpy < 2; the
# modules used here import and run with numpy 2) plus the modules it imports, and pyarrow to
# read simile's logs. Threads: both sides get the same 2 intra-op threads (torch.set_num_threads /
# simile's libtorch default on 2 cores); OML runs with PyTorch's default OpenMP settings, simile
# with its own (passive waiting), as each is shipped.
#
# Throughput on both sides: the training steps only (the wait for the batch, forward, loss,
# backward, optimiser step); validation and start-up are outside it. simile's comes from its
# train_log.parquet (images_per_s per step), OML's from the same clock points in its loop.
#
# Data: work/fontid (simile-prepare fonts, once). Compare throughput on an idle machine only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SEEDS="0 1 2"
CONFIG=bench/configs/train_vs_oml_resnet18.toml
EPOCHS=
COMPUTE="fp32 bf16"
INIT=torch
RESULTS=
DATA=fontid
while [ $# -gt 0 ]; do
    case "$1" in
    --seeds) SEEDS="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --compute) COMPUTE="$2"; shift 2 ;;
    --init) INIT="$2"; shift 2 ;;
    --results) RESULTS="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
# shellcheck source=/dev/null
. scripts/env.sh
VENV="$(scripts/bootstrap-oml.sh)"
# SIMILE_BIN: a folder with a frozen simile-train (and simile-prepare, if work/fontid is not
# prepared yet), not rebuilt: other builds may replace target/release during the hour this takes.
[ -n "${SIMILE_BIN:-}" ] || cargo build --release --quiet --bin simile-train --bin simile-prepare
BIN="${SIMILE_BIN:-$ROOT/target/release}"
case "$DATA" in
fontid)
    WORK="${WORK:-$ROOT/work/fontid}"
    [ -f "$WORK/dataset.parquet" ] || "$BIN/simile-prepare" fonts --out "$WORK" >/dev/null
    ;;
glyphs)
    WORK="${WORK:-$ROOT/work/glyphs}"
    bench/glyphs.sh "$WORK" "$VENV/bin/python" "$BIN"
    ;;
*) echo "--data: fontid or glyphs, not '$DATA'" >&2; exit 2 ;;
esac
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit: $(git rev-parse --short HEAD 2>/dev/null || echo uncommitted)"
NAME="$(basename "$CONFIG" .toml)"
RESULTS="${RESULTS:-$WORK/bench-oml/$NAME.jsonl}"
mkdir -p "$(dirname "$RESULTS")" "$WORK/bench-oml"
: >"$RESULTS"
# simile trains the config (its epochs unless --epochs); the OML side reads the resolved
# config.toml of that run, so both train the same recipe.
SETS=(--set valid_period=0 --set valid_at_start=true)
[ -n "$EPOCHS" ] && SETS+=(--set "epochs=$EPOCHS")
load() { cut -d' ' -f1-3 /proc/loadavg; }
simile() { # seed compute
    local out="$WORK/bench-oml/$NAME-simile-$1-$2" before
    before="$(load)"
    echo "-- simile $2, seed $1, load $before" >&2
    rm -rf "$out"
    if ! "$BIN/simile-train" --dataset "$WORK/dataset.parquet" --config "$CONFIG" --out "$out" \
        --device cpu --compute "$2" --force --set "seed=$1" "${SETS[@]}" 2>"$out.log"; then
        cat "$out.log" >&2
        return 1
    fi
    "$VENV/bin/python" bench/train_vs_oml.py --simile-run "$out" --load-before "$before" \
        --tag "seed=$1" --tag "compute=$2" | tee -a "$RESULTS"
}
read -r -a COMPUTES <<<"$COMPUTE"
for seed in $SEEDS; do
    echo "== seed $seed" >&2
    simile "$seed" "${COMPUTES[0]}"
    echo "-- OML 4.0.0, seed $seed, load $(load)" >&2
    "$VENV/bin/python" bench/train_vs_oml.py --csv "$WORK/df.csv" --seed "$seed" --init "$INIT" \
        --simile-config "$WORK/bench-oml/$NAME-simile-$seed-${COMPUTES[0]}/config.toml" \
        --tag "seed=$seed" --tag "init=$INIT" | tee -a "$RESULTS"
    for c in "${COMPUTES[@]:1}"; do
        simile "$seed" "$c"
    done
done
echo "load at the end: $(load); results: $RESULTS" >&2
"$VENV/bin/python" bench/train_vs_oml.py --summarise "$RESULTS"
