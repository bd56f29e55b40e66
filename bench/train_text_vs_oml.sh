#!/usr/bin/env bash
# simile-train vs OML 4.0 on texts (issue 22): OML's text recipe (TextLabeledDataset +
# HFWrapper + BalanceSampler + TripletLossWithMiner, Adam) fine-tuning all-MiniLM-L6-v2 on the
# verses of `make demo-text` (train: 2,000 Old Testament verses x ASV/KJV/WEB; validation:
# Proverbs 10:1-22:16, 384 verses x 3, 1 vs rest), the same recipe in simile-train; validation
# CMC@1 / MAP@5 before and after training and training texts/s for both, per seed, then
# per-seed and mean tables (Markdown) with the ratio of texts/s and the CMC@1 difference.
#
#   bench/train_text_vs_oml.sh [--seeds "0 1 2"] [--epochs N] [--config pipelines/configs/verses_oml.toml]
#                              [--padding "max_length longest"] [--oml-args "--max-steps 20"] [--results FILE]
#
# Per seed, interleaved so that the machine's load hits both alike: simile, then OML (once per
# --padding: max_length, the default, is OML's own TextLabeledDataset padding every text to
# max_length tokens; longest, a variant, cuts each batch to its longest text). The load average
# is printed around each run and recorded in the results (one JSON line per run, by default
# work/verses/bench-oml/<config name>.jsonl, rewritten each time; the tables also go to the
# same name with .md).
#
# simile trains the config (its epochs unless --epochs) with `--set seed=S --set
# valid_at_start=true --set valid_period=0`; OML (bench/train_text_vs_oml.py) reads that run's
# resolved config.toml (epochs, sampler, margin, miner, learning rate, max_length, validation
# batch) and refuses a config that its recipe cannot mirror (another pooling than CLS, L2
# normalisation, a schedule, clipping). OML runs from the virtualenv scripts/bootstrap-oml.sh
# creates once (it reuses simile's torch wheel; transformers 5.25.0 and tokenizers 0.23.3 as
# scripts/bootstrap-text.sh pins them); the model is the folder scripts/bootstrap-text.sh
# --model-dir prints. Threads: 2 intra-op threads on both sides.
#
# Throughput on both sides: the training steps only (the wait for the batch, tokenisation
# included on OML's side, forward, loss, backward, optimiser step); validation and start-up are
# outside it. simile's comes from its train_log.parquet (texts_per_s, or images_per_s, per
# step), OML's from the same clock points in its loop.
#
# Data: work/verses (pipelines/text.mk, once). Compare throughput on an idle machine only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SEEDS="0 1 2"
CONFIG=pipelines/configs/verses_oml.toml
EPOCHS=
PADDING=max_length
OML_ARGS=
RESULTS=
while [ $# -gt 0 ]; do
    case "$1" in
    --seeds) SEEDS="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --padding) PADDING="$2"; shift 2 ;;
    --oml-args) OML_ARGS="$2"; shift 2 ;;
    --results) RESULTS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
# shellcheck source=/dev/null
. scripts/env.sh
VENV="$(scripts/bootstrap-oml.sh)"
PY="$(scripts/bootstrap-text.sh)"
MODEL_DIR="$(scripts/bootstrap-text.sh --model-dir)"
# SIMILE_BIN: a folder with a frozen simile-train and simile-prepare, not rebuilt: other builds
# may replace target/release while this runs.
[ -n "${SIMILE_BIN:-}" ] || cargo build --release --quiet --bin simile-train --bin simile-prepare
BIN="${SIMILE_BIN:-$ROOT/target/release}"
WORK="${WORK:-$ROOT/work/verses}"
[ -f "$WORK/dataset.parquet" ] && [ -f "$WORK/verses.csv" ] ||
    make -f pipelines/text.mk "$WORK/dataset.parquet" BIN="$BIN" WORK="$WORK" PY="$PY" >&2
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit: $(git rev-parse --short HEAD 2>/dev/null || echo uncommitted)"
NAME="$(basename "$CONFIG" .toml)"
RESULTS="${RESULTS:-$WORK/bench-oml/$NAME.jsonl}"
mkdir -p "$(dirname "$RESULTS")" "$WORK/bench-oml"
: >"$RESULTS"
SETS=(--set valid_period=0 --set valid_at_start=true)
[ -n "$EPOCHS" ] && SETS+=(--set "epochs=$EPOCHS")
read -r -a EXTRA <<<"$OML_ARGS"
load() { cut -d' ' -f1-3 /proc/loadavg; }
for seed in $SEEDS; do
    echo "== seed $seed" >&2
    out="$WORK/bench-oml/$NAME-simile-$seed"
    before="$(load)"
    echo "-- simile, seed $seed, load $before" >&2
    rm -rf "$out"
    if ! "$BIN/simile-train" --dataset "$WORK/dataset.parquet" --config "$CONFIG" --out "$out" \
        --device cpu --force --set "seed=$seed" "${SETS[@]}" 2>"$out.log"; then
        cat "$out.log" >&2
        exit 1
    fi
    "$VENV/bin/python" bench/train_text_vs_oml.py --simile-run "$out" --load-before "$before" \
        --tag "seed=$seed" | tee -a "$RESULTS"
    for pad in $PADDING; do
        echo "-- OML 4.0.0 (padding $pad), seed $seed, load $(load)" >&2
        "$VENV/bin/python" bench/train_text_vs_oml.py --csv "$WORK/verses.csv" --model-dir "$MODEL_DIR" \
            --seed "$seed" --padding "$pad" --simile-config "$out/config.toml" --tag "seed=$seed" \
            ${EXTRA[@]+"${EXTRA[@]}"} | tee -a "$RESULTS"
    done
done
echo "load at the end: $(load); results: $RESULTS" >&2
"$VENV/bin/python" bench/train_text_vs_oml.py --summarise "$RESULTS" | tee "${RESULTS%.jsonl}.md"
