#!/usr/bin/env bash
# Data-parallel simile-train against one process, same recipe, same machine, one run:
# 1 process x T threads and --nproc 2 (2 ranks x T/2 threads, Gloo over loopback) on Font-ID
# with pipelines/configs/fontid.toml. Prints images/s of each, their ratio, and from the
# 2-rank run's manifest the gradient bytes all-reduced per step and the seconds they took.
#
#   bench/train_ddp.sh [--threads T] [--set key=value ...]   (default T: the cores; epochs=2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=/dev/null
. scripts/env.sh
cargo build --release --quiet --bins
BIN="$ROOT/target/release"
THREADS="$(nproc)"
if [ "${1:-}" = "--threads" ]; then THREADS="$2"; shift 2; fi
WORK="${WORK:-$ROOT/work/fontid}"
[ -f "$WORK/dataset.parquet" ] || "$BIN/simile-prepare" fonts --out "$WORK" >/dev/null
DS="$WORK/dataset.parquet"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD)"
run() { # tag, extra flags...
    local tag="$1"; shift
    local out="$WORK/ddp-bench-$tag"
    rm -rf "$out"
    "$BIN/simile-train" --dataset "$DS" --config pipelines/configs/fontid.toml --out "$out" \
        --device cpu --force --set epochs=2 "$@" 2>/dev/null | tail -1
}
one=$(run one --threads "$THREADS" "$@")
two=$(run two --nproc 2 --threads "$THREADS" "$@")
echo "1 process x $THREADS threads: $one"
echo "2 ranks x $((THREADS / 2 > 0 ? THREADS / 2 : 1)) threads: $two"
python3 - "$one" "$two" "$WORK/ddp-bench-two/model.safetensors.manifest.json" "$WORK/ddp-bench-one/model.safetensors" <<'PY'
import json, os, re, sys
ips = [float(re.search(r"([0-9.]+) images/s", s).group(1)) for s in sys.argv[1:3]]
m = json.load(open(sys.argv[3]))
dp = m["notes"]["data_parallel"]
print(f"images/s: one process {ips[0]:.0f}, two ranks {ips[1]:.0f}, ratio {ips[1] / ips[0]:.2f}")
print(f"all-reduce per step: {dp['allreduce_mib_per_step']:.2f} MiB in {1000 * dp['allreduce_s_per_step']:.1f} ms "
      f"({dp['allreduce_mib_per_step'] / max(dp['allreduce_s_per_step'], 1e-9):.0f} MiB/s, Gloo over loopback)")
PY
