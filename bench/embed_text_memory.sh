#!/usr/bin/env bash
# Peak memory of simile-embed on text datasets of growing size: does embedding N short texts
# hold a window of batches (flat in N) or the dataset's tokens (growing with N)?
#
#   bench/embed_text_memory.sh [--sizes "4000 16000 64000"] [--batch-size 64] [--work DIR]
#   bench/embed_text_memory.sh --sizes "1000000"      # a million: about an hour on 2 cores
#
# Per size: a generated OML text CSV of short texts (2 to 8 words from a 2,000-word synthetic
# vocabulary, two texts per label, all in the validation split), simile-prepare, then
# simile-embed with the zoo's minilm-l6-v2 under bench/peak_rss.py (peak anonymous memory:
# heap and private pages; and VmHWM, which also counts the memory-mapped model file). Prints
# one Markdown row per size: texts, tokens, wall seconds, texts/s, peak anonymous MiB, peak
# resident MiB, and the growth in anonymous MiB per 1,000 texts against the smallest size.
# Memory that holds a window (64 batches) and the dataset's own texts grows only by the
# texts' bytes (tens of bytes each); one that held every text's tokens and embedding would
# grow by 1.5 KB+ per text (384 float32 + ids).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIZES="4000 16000 64000"
BS=64
WORK=
while [ $# -gt 0 ]; do
    case "$1" in
    --sizes) SIZES="$2"; shift 2 ;;
    --batch-size) BS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    -h | --help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
# shellcheck source=/dev/null
. scripts/env.sh
scripts/bootstrap-text.sh >/dev/null
[ -n "${SIMILE_BIN:-}" ] || cargo build --release --quiet --bin simile-embed --bin simile-prepare
BIN="${SIMILE_BIN:-$ROOT/target/release}"
WORK="${WORK:-$ROOT/work/bench-embed-text-memory}"
mkdir -p "$WORK"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit: $(git rev-parse --short HEAD 2>/dev/null || echo uncommitted); batch $BS"
echo
echo "| texts | tokens | seconds | texts/s | peak anonymous MiB | peak resident MiB | anonymous MiB per 1,000 texts vs the smallest |"
echo "|---|---|---|---|---|---|---|"
first_n= first_anon=
for n in $SIZES; do
    d="$WORK/n$n"
    mkdir -p "$d"
    python3 - "$n" "$d/texts.csv" <<'EOF'
import random, sys
n, out = int(sys.argv[1]), sys.argv[2]
rng = random.Random(0)
syll = ["ka", "lo", "mi", "ren", "tas", "vor", "el", "un", "dri", "ph", "ost", "iq"]
vocab = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(4000)})[:2000]
with open(out, "w") as f:
    f.write("label,text,split,is_query,is_gallery\n")
    for i in range(n):
        words = " ".join(rng.choice(vocab) for _ in range(rng.randint(2, 8)))
        f.write(f"{i // 2},{words},validation,True,True\n")
EOF
    "$BIN/simile-prepare" csv --csv "$d/texts.csv" --out "$d/dataset.parquet" --force >/dev/null
    rm -f "$d/emb.npy"*
    line="$(python3 bench/peak_rss.py "$BIN/simile-embed" --dataset "$d/dataset.parquet" \
        --model minilm-l6-v2 --device cpu --batch-size "$BS" --out "$d/emb.npy" --force)"
    python3 - "$n" "$line" "$d/emb.npy.manifest.json" "${first_n:-}" "${first_anon:-}" <<'EOF'
import json, sys
n, r, m = int(sys.argv[1]), json.loads(sys.argv[2]), json.load(open(sys.argv[3]))
if r["exit"] != 0:
    sys.exit(f"simile-embed failed on {n} texts: {r}")
tokens = m["rows"].get("tokens", 0)
growth = ""
if sys.argv[4]:
    n0, a0 = int(sys.argv[4]), float(sys.argv[5])
    growth = "%.3f" % ((r["peak_anon_mib"] - a0) / ((n - n0) / 1000)) if n > n0 else ""
print("| %d | %d | %.1f | %.0f | %.0f | %.0f | %s |" % (
    n, tokens, r["wall_s"], n / r["wall_s"], r["peak_anon_mib"], r["peak_rss_mib"], growth))
EOF
    if [ -z "$first_n" ]; then
        first_n="$n"
        first_anon="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["peak_anon_mib"])' "$line")"
    fi
done
