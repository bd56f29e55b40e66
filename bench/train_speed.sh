#!/usr/bin/env bash
# Training speed against OML at its fastest (issue 25): simile-train and OML 4.0 on the torch
# that `pip install open-metric-learning==4.0.0` brings today, in every precision and optimiser
# variant each offers, on the same data, recipe and steps, in one run.
#
#   bench/train_speed.sh [--seeds "0 1 2"] [--configs "bench/configs/train_vs_oml_resnet18.toml
#                        bench/configs/train_vs_oml_smallcnn.toml"] [--bf16-steps 4] [--no-bf16]
#
# Per config and seed, interleaved so that the machine's load hits all alike (full runs: the
# config's epochs, validated before and after):
#   simile fp32 (fused AdamW, ATen's kernel), OML default (torch.optim.AdamW as OML's pipeline
#   builds it), OML with AdamW(fused=True).
# Then, per config, throughput only (--bf16-steps steps, seed 0, the first step left out as
# warm-up): simile --compute bf16 (autocast), OML under torch.autocast("cpu", torch.bfloat16)
# (Lightning's precision="bf16-mixed") with AdamW(fused=True). On a CPU without AVX512-BF16 or
# AMX both run libtorch's reference bf16 convolutions: those rows say how slow, not who wins.
#
# OML runs bench/train_vs_oml.py (OML's sampler, miner, loss and metrics in a plain PyTorch loop;
# see that file) in the virtualenv `OML_TORCH=latest scripts/bootstrap-oml.sh` makes. Every row
# gets simile's FLOPs per image for its network (the profiler's count, x3 for forward + backward,
# from simile's manifest) and the machine's peak for its precision (simile's GEMM probe), so the
# GFLOP/s and share-of-peak columns compare like with like. Compare throughput on an idle
# machine only. Results: one JSON line per run in work/fontid/bench-speed/<config>.jsonl.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SEEDS="0 1 2"
CONFIGS="bench/configs/train_vs_oml_resnet18.toml bench/configs/train_vs_oml_smallcnn.toml"
BF16_STEPS=4
while [ $# -gt 0 ]; do
    case "$1" in
    --seeds) SEEDS="$2"; shift 2 ;;
    --configs) CONFIGS="$2"; shift 2 ;;
    --bf16-steps) BF16_STEPS="$2"; shift 2 ;;
    --no-bf16) BF16_STEPS=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
# shellcheck source=/dev/null
. scripts/env.sh
VENV="$(OML_TORCH=latest scripts/bootstrap-oml.sh)"
[ -n "${SIMILE_BIN:-}" ] || cargo build --release --quiet --bin simile-train --bin simile-prepare
BIN="${SIMILE_BIN:-$ROOT/target/release}"
WORK="${WORK:-$ROOT/work/fontid}"
[ -f "$WORK/dataset.parquet" ] || "$BIN/simile-prepare" fonts --out "$WORK" >/dev/null
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, flags: $(grep -o -w 'avx512f\|avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo uncommitted); OML: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
load() { cut -d' ' -f1-3 /proc/loadavg; }
# FLOPs per image of simile run $1 (its manifest), and the peak for compute mode $2 from the
# GEMM probe's cache (simile-train measured it at the start of its runs; the faster of the
# mode's precision and fp32, as simile-train takes it), as --tag arguments.
util_tags() {
    python3 - "$1/model.safetensors.manifest.json" "$2" "${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}/peak.json" <<'PY'
import json, sys
u = json.load(open(sys.argv[1])).get("notes", {}).get("utilisation", {})
peaks = json.load(open(sys.argv[3]))
# The probe of this machine at the run's threads: keys are processor|device|threads|compute|libtorch.
# As simile-train: the faster of the mode's precision and fp32.
peak = [p["gflop_s"] for k, p in peaks.items() if k.split("|")[3] in (sys.argv[2], "fp32") and f"({p['threads']} threads)" in k.split("|")[1]]
print(f"--tag flops_per_image={u.get('flops_per_image')} --tag peak_gflop_s={max(peak) if peak else ''}")
PY
}
mkdir -p "$WORK/bench-speed"
for CONFIG in $CONFIGS; do
    NAME="$(basename "$CONFIG" .toml)"
    RESULTS="$WORK/bench-speed/$NAME.jsonl"
    : >"$RESULTS"
    simile() { # seed compute [extra simile-train arguments]
        local seed="$1" compute="$2" out="$WORK/bench-speed/$NAME-simile-$1-$2" before
        shift 2
        before="$(load)"
        echo "-- simile $compute, seed $seed, load $before" >&2
        rm -rf "$out"
        if ! "$BIN/simile-train" --dataset "$WORK/dataset.parquet" --config "$CONFIG" --out "$out" \
            --device cpu --compute "$compute" --force --set "seed=$seed" --set valid_period=0 \
            --set valid_at_start=true "$@" >"$out.stdout" 2>"$out.log"; then
            cat "$out.log" >&2
            return 1
        fi
        # shellcheck disable=SC2046
        "$VENV/bin/python" bench/train_vs_oml.py --simile-run "$out" --load-before "$before" \
            --tag "seed=$seed" --tag "compute=$compute" "${PYARGS[@]}" | tee -a "$RESULTS"
    }
    PYARGS=()
    oml() { # seed variant [extra train_vs_oml.py arguments]
        local seed="$1" variant="$2"
        shift 2
        echo "-- OML $variant, seed $seed, load $(load)" >&2
        # shellcheck disable=SC2046
        "$VENV/bin/python" bench/train_vs_oml.py --csv "$WORK/df.csv" --seed "$seed" \
            --simile-config "$WORK/bench-speed/$NAME-simile-$seed-fp32/config.toml" \
            --tag "seed=$seed" --tag "variant=$variant" \
            $(util_tags "$WORK/bench-speed/$NAME-simile-$seed-fp32" "${PEAK_OF:-fp32}") "$@" | tee -a "$RESULTS"
    }
    for seed in $SEEDS; do
        echo "== $NAME, seed $seed" >&2
        simile "$seed" fp32
        oml "$seed" "fp32 default"
        oml "$seed" "fp32 fused AdamW" --fused
    done
    if [ "$BF16_STEPS" -gt 0 ]; then
        # Throughput only: a few steps (the first is the warm-up, left out of both).
        seed="$(echo "$SEEDS" | cut -d' ' -f1)"
        # The bf16 peak is cached by the first bf16 run: a 1-step run measures it first.
        "$BIN/simile-train" --dataset "$WORK/dataset.parquet" --config "$CONFIG" \
            --out "$WORK/bench-speed/$NAME-probe" --device cpu --compute bf16 --force \
            --stop-after-steps 1 --set valid_at_start=false >/dev/null 2>&1
        # shellcheck disable=SC2207
        PYARGS=(--skip-first-step $(util_tags "$WORK/bench-speed/$NAME-simile-$seed-fp32" bf16))
        simile "$seed" bf16 --stop-after-steps "$((BF16_STEPS + 1))" --set valid_at_start=false
        PYARGS=()
        PEAK_OF=bf16 oml "$seed" "bf16 autocast, fused AdamW" --fused --autocast bf16 \
            --max-steps "$((BF16_STEPS + 1))" --skip-first-step
    fi
    echo "load at the end: $(load); results: $RESULTS" >&2
    echo "### $NAME"
    "$VENV/bin/python" bench/train_vs_oml.py --summarise "$RESULTS"
done
