#!/usr/bin/env bash
# simile's optimiser step against PyTorch's on the same parameters (resnet18 with a 512-d
# projection, 11.4 M parameters), same threads, same run:
#
#   bench/optim_step.sh [--steps 12] [--threads 2]
#
# simile: simile-train on Font-ID (work/fontid, prepared once) with bench/configs/train_vs_oml_resnet18.toml
# (AdamW 1e-3, weight decay 0.01), then Adam and SGD with momentum 0.9, --stop-after-steps N
# with SIMILE_TRAIN_PROFILE=1; a step's optimiser time is its "step" mark minus its "clip" mark
# (the fused step alone, as opt.step() on the PyTorch side), the median over the steps after the
# first; "clear" (dropping the gradients, zero_grad(set_to_none=True)) is reported beside it.
# PyTorch: bench/optim_step.py on the torch of simile's own virtualenv (the same libtorch
# 2.13.0), torch.optim's single-tensor, foreach and fused implementations. Both sides run under
# each OpenMP wait policy in turn (OMP_WAIT_POLICY: PASSIVE, simile's default, and ACTIVE,
# libgomp's and so PyTorch's): the fused kernels open one parallel region per tensor, and a
# passive thread pool pays a wake-up for each. Prints a Markdown table with the ratios to
# PyTorch fused under the same policy.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STEPS=12
THREADS=2
while [ $# -gt 0 ]; do
    case "$1" in
    --steps) STEPS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
# shellcheck source=/dev/null
. scripts/env.sh
PY="$(scripts/bootstrap-pyextras.sh)"
[ -n "${SIMILE_BIN:-}" ] || cargo build --release --quiet --bin simile-train --bin simile-prepare
BIN="${SIMILE_BIN:-$ROOT/target/release}"
DATA="${WORK:-$ROOT/work/fontid}"
[ -f "$DATA/dataset.parquet" ] || "$BIN/simile-prepare" fonts --out "$DATA" >/dev/null
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit: $(git rev-parse --short HEAD 2>/dev/null || echo uncommitted)"
RESULTS="$WORK/results.jsonl"
for policy in PASSIVE ACTIVE; do
    export OMP_WAIT_POLICY=$policy
    for opt in adamw adam sgd; do
        case "$opt" in
        adamw) SET=(--set optimizer.name=adamw --set optimizer.lr=1e-3 --set optimizer.weight_decay=0.01) ;;
        adam) SET=(--set optimizer.name=adam --set optimizer.lr=1e-3 --set optimizer.weight_decay=0) ;;
        sgd) SET=(--set optimizer.name=sgd --set optimizer.lr=0.1 --set optimizer.momentum=0.9) ;;
        esac
        SIMILE_TRAIN_PROFILE=1 "$BIN/simile-train" --dataset "$DATA/dataset.parquet" \
            --config bench/configs/train_vs_oml_resnet18.toml --out "$WORK/m-$opt" --device cpu \
            --threads "$THREADS" --stop-after-steps "$STEPS" --set valid_at_start=false "${SET[@]}" \
            --log-every off --force 2>"$WORK/$opt.log" >/dev/null
        python3 - "$WORK/$opt.log" "$opt" "$policy" >>"$RESULTS" <<'PY'
import json, re, statistics, sys
ms = []
for line in open(sys.argv[1]):
    m = re.match(r"step (\d+): \[(.*)\]", line)
    if not m:
        continue
    marks = dict((k, float(v)) for k, v in re.findall(r'\("(\w+)", ([0-9.e-]+)\)', m.group(2)))
    if int(m.group(1)) > 0:
        ms.append((1000 * (marks["step"] - marks["clip"]), 1000 * (marks["optim"] - marks["step"])))
print(json.dumps({"framework": "simile", "optimizer": sys.argv[2], "impl": "fused (ATen)", "policy": sys.argv[3],
                  "step_ms": round(statistics.median(m[0] for m in ms), 2),
                  "clear_ms": round(statistics.median(m[1] for m in ms), 2)}))
PY
    done
    "$PY" bench/optim_step.py --threads "$THREADS" --steps "$STEPS" --tag "policy=$policy" >>"$RESULTS"
done
python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
fused = {(r["optimizer"], r["policy"]): r["step_ms"] for r in rows if r["impl"] == "fused"}
print("| OMP_WAIT_POLICY | optimizer | framework | implementation | step ms (median) | vs PyTorch fused | dropping the gradients, ms |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    clear = f"{r['clear_ms']:.2f}" if "clear_ms" in r else "(not timed)"
    ratio = r["step_ms"] / fused[(r["optimizer"], r["policy"])]
    print(f"| {r['policy']} | {r['optimizer']} | {r['framework']} | {r['impl']} | {r['step_ms']:.2f} | {ratio:.2f}x | {clear} |")
PY
