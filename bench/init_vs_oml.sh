#!/usr/bin/env bash
# The untrained network of OML's recipe, many seeds a side (issue 24): is simile's
# initialisation of resnet18 the same distribution as torchvision's, judged by what it is for?
# Each side validates its own untrained extractor (eval mode, L2-normalised 512-d average-pooled
# features) on the generated glyph set of `bench/train_vs_oml.sh --data glyphs`, once per seed:
# simile-train's validation before its first step (bench/configs/train_vs_oml_resnet18.toml,
# `--stop-after-steps 1`), and OML 4.0's `ResnetExtractor(weights=None, arch="resnet18")` after
# torch.manual_seed(seed) with OML's metrics (tests/fixtures_py/oml_run.py evaluate
# --init-seeds). Prints each side's CMC@1 per seed, mean and standard deviation, and the
# difference of the means with its standard error (Welch).
#
#   bench/init_vs_oml.sh [--seeds "0 1 ... 15"]
#
# SIMILE_BIN: a folder with a frozen simile-train (else target/release, built). About 2.5
# minutes a seed, both sides together, on 2 cores (each validates 13,800 images).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SEEDS="$(seq -s ' ' 0 15)"
while [ $# -gt 0 ]; do
    case "$1" in
    --seeds) SEEDS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
# shellcheck source=/dev/null
. scripts/env.sh
VENV="$(scripts/bootstrap-oml.sh)"
[ -n "${SIMILE_BIN:-}" ] || cargo build --release --quiet --bin simile-train --bin simile-prepare
BIN="${SIMILE_BIN:-$ROOT/target/release}"
WORK="${WORK:-$ROOT/work/glyphs}"
bench/glyphs.sh "$WORK" "$VENV/bin/python" "$BIN"
OUT="$WORK/bench-init"
rm -rf "$OUT"
mkdir -p "$OUT"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit: $(git rev-parse --short HEAD 2>/dev/null || echo uncommitted); load $(cut -d' ' -f1-3 /proc/loadavg)"
for seed in $SEEDS; do
    run="$OUT/simile-$seed"
    "$BIN/simile-train" --dataset "$WORK/dataset.parquet" \
        --config bench/configs/train_vs_oml_resnet18.toml --out "$run" --device cpu \
        --set "seed=$seed" --set valid_at_start=true --stop-after-steps 1 >"$run.log" 2>&1 ||
        { cat "$run.log" >&2; exit 1; }
    "$VENV/bin/python" - "$run/val_metrics.parquet" "$seed" >>"$OUT/simile.jsonl" <<'EOF'
import json, sys
import pyarrow.parquet as pq
t = pq.read_table(sys.argv[1]).to_pylist()
first = min(t, key=lambda r: r["step"])  # the validation before the first step
print(json.dumps({"seed": int(sys.argv[2]), **{k: v for k, v in first.items() if k.startswith("OVERALL/")}}))
EOF
    rm -rf "$run"
    echo "simile seed $seed: $(tail -1 "$OUT/simile.jsonl")" >&2
done
"$VENV/bin/python" tests/fixtures_py/oml_run.py evaluate "$WORK" --init-seeds "${SEEDS// /,}" \
    --dest "$OUT/oml"
"$VENV/bin/python" - "$OUT/simile.jsonl" "$OUT/oml/untrained.jsonl" <<'EOF'
import json, math, sys
def read(p):
    return {r["seed"]: r["OVERALL/cmc/1"] for r in map(json.loads, open(p))}
s, o = read(sys.argv[1]), read(sys.argv[2])
print("| seed | simile CMC@1 untrained | OML 4.0 CMC@1 untrained |")
print("|---|---|---|")
for k in sorted(s):
    print(f"| {k} | {s[k]:.4f} | {o[k]:.4f} |")
def stats(v):
    v = list(v.values())
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return m, sd, len(v)
(ms, ss, ns), (mo, so, no) = stats(s), stats(o)
se = math.sqrt(ss**2 / ns + so**2 / no)
print(f"| mean (sd) | {ms:.4f} ({ss:.4f}) | {mo:.4f} ({so:.4f}) |")
print(f"\nsimile - OML: {ms - mo:+.4f}, standard error {se:.4f} (Welch), t = {(ms - mo) / se:.2f}, {ns} and {no} seeds")
EOF
