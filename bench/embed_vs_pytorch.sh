#!/usr/bin/env bash
# simile-embed vs PyTorch on the CPU, in one run: N (default 5000) JPEG photos 400x300 made from
# scikit-image's photos, resnet18 (random weights, seed 0) at 224 px (Resize 256 + CenterCrop
# 224, ImageNet mean/std). PyTorch: torchvision + PIL + DataLoader(num_workers=2), 2 threads,
# fp32. simile: the same state dict imported with `simile-embed import`, fp32 and bf16.
# Reports decode+resize and end-to-end images/s and the cosines, and writes them into the
# `## simile-embed` section of docs/benchmarks.md.
# Usage: bench/embed_vs_pytorch.sh   (N=500 BIN=target/debug for a quick try)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-5000}"
BIN="${BIN:-target/release}"
. scripts/env.sh
PY="$(scripts/bootstrap-pyextras.sh)"
[ "$BIN" = target/release ] && cargo build --release --bin simile-embed --bin simile-prepare >&2
# The generated images are made once and reused; every timed step runs again (--force).
W="work/bench-embed-$N"
mkdir -p "$W"
if [ ! -f "$W/resnet18.pth" ]; then
  echo "generating $N JPEGs into $W" >&2
  "$PY" bench/embed_data.py "$W" "$N"
fi
"$BIN/simile-prepare" csv --csv "$W/images.csv" --unlabeled --out "$W/dataset.parquet" >/dev/null
rm -rf "$W/r18"
"$BIN/simile-embed" import --arch resnet18 --weights "$W/resnet18.pth" --size 224 --resize crop \
  --crop-ratio 0.875 --out "$W/r18" >/dev/null
load() { cut -d' ' -f1 /proc/loadavg; }
LOADS=("$(load)")
echo "PyTorch fp32 ..." >&2
PT="$("$PY" bench/embed_pytorch.py "$W" "$W/torch.npy")"
LOADS+=("$(load)")
echo "simile decode + resize ..." >&2
SDEC="$("$BIN/simile-embed" --dataset "$W/dataset.parquet" --model "$W/r18" --check-only |
  sed -n 's/.*(\([0-9.]*\) images\/s decode.*/\1/p')"
declare -A IPS
for c in fp32 bf16; do
  echo "simile $c ..." >&2
  "$BIN/simile-embed" --dataset "$W/dataset.parquet" --model "$W/r18" --out "$W/simile-$c.npy" \
    --batch-size 64 --device cpu --compute "$c" --force >&2
  IPS[$c]="$("$PY" -c "
import json; m=json.load(open('$W/simile-$c.npy.manifest.json'))
print(m['rows']['rows'] / m['timings_s']['total'])")"
  LOADS+=("$(load)")
done
CMP="$("$PY" bench/embed_compare.py "$W/torch.npy" "$W/simile-fp32.npy" "$W/simile-bf16.npy")"
SECTION="$("$PY" - "$PT" "$CMP" "${IPS[fp32]}" "${IPS[bf16]}" "$SDEC" "$N" "$(nproc)" "${LOADS[*]}" <<'PY'
import json, sys
pt, cmp = json.loads(sys.argv[1]), json.loads(sys.argv[2])
s32, s16, sdec, n, cores = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6], sys.argv[7]
loads = ", ".join(sys.argv[8].split())
p32, pdec = pt["pytorch_fp32_ips"], pt["pytorch_decode_resize_ips"]
ok = lambda b: "met" if b else "**missed**"
print(f"""## simile-embed

`bench/embed_vs_pytorch.sh`: {n} JPEGs 400x300 (from scikit-image's photos), resnet18 with random
weights (seed 0) at 224 px (Resize 256 + CenterCrop 224), batch 64, CPU, {cores} cores, one run;
1-minute load average before, and after each of PyTorch, simile fp32, simile bf16: {loads}
(other programs' load slows both sides). PyTorch: torchvision + PIL + `DataLoader(num_workers=2)`,
2 threads, its defaults otherwise. simile: `simile-embed` (default threads: the cores) with the
same state dict through `simile-embed import`. Decode + resize: PyTorch's DataLoader without
the model; `simile-embed --check-only` (decode, crop, resize of every image on the rayon pool).

| | images/s | target | |
|---|---|---|---|
| PyTorch fp32 end to end | {p32:.1f} | | |
| simile fp32 end to end | {s32:.1f} | >= PyTorch ({p32:.1f}) | {ok(s32 >= p32)} |
| simile bf16 end to end | {s16:.1f} | >= 2x PyTorch fp32 ({2*p32:.1f}) | {ok(s16 >= 2*p32)} |
| PyTorch (PIL) decode + resize | {pdec:.1f} | | |
| simile decode + resize | {sdec:.1f} | >= 2x PIL ({2*pdec:.1f}) | {ok(sdec >= 2*pdec)} |

| agreement | cosine min | cosine mean | target | relative L2 error max | mean |
|---|---|---|---|---|---|
| simile fp32 vs PyTorch fp32 | {cmp['cos_fp32_vs_pytorch_min']:.6f} | {cmp['cos_fp32_vs_pytorch_mean']:.6f} | >= 0.999 ({ok(cmp['cos_fp32_vs_pytorch_min'] >= 0.999)}) | {cmp['rel_fp32_vs_pytorch_max']:.4f} | {cmp['rel_fp32_vs_pytorch_mean']:.4f} |
| simile bf16 vs simile fp32 | {cmp['cos_bf16_vs_fp32_min']:.6f} | {cmp['cos_bf16_vs_fp32_mean']:.6f} | >= 0.999 ({ok(cmp['cos_bf16_vs_fp32_min'] >= 0.999)}) | {cmp['rel_bf16_vs_fp32_max']:.4f} | {cmp['rel_bf16_vs_fp32_mean']:.4f} |
| (context: PyTorch, different images) | | {cmp['cos_between_different_images_mean']:.6f} | | | {cmp['rel_between_different_images_mean']:.4f} |

With random weights every image's embedding points almost the same way (the context row), so
the cosine target is easy to meet; the relative error `|a - b| / |b|` is the stricter view
(fp32's comes from the resizers: Pillow's and simile's bilinear filters round differently).
""")
PY
)"
echo "$SECTION"
"$PY" bench/docs_section.py docs/benchmarks.md "$SECTION"
