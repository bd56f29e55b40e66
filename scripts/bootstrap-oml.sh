#!/usr/bin/env bash
# Prints the path of the virtualenv with open-metric-learning==4.0.0 that the OML parity test
# (tests/it/train_parity.rs) and the OML benchmarks (bench/train_vs_oml.sh,
# bench/pairwise_vs_oml.sh) run, creating it once: ${SIMILE_CACHE:-~/.cache/simile}/oml-4.0.0.
# It reuses the torch wheel and torchvision of simile's torch virtualenv (a .pth file; installed
# first by scripts/bootstrap-pyextras.sh) instead of downloading another, and installs OML
# without its dependency resolver (it pins numpy < 2; the modules used import and run with
# numpy 2), plus the modules they import. OML_VENV=DIR uses another (already complete) one.
# OML's text modules (oml.datasets.texts, oml.models.texts.HFWrapper; bench/train_text_vs_oml.sh)
# need transformers (OML's `nlp` extra, unpinned there): the same pins as scripts/bootstrap-text.sh
# gives the torch virtualenv, checked against OML 4.0's text code below, and added to an existing
# virtualenv too (a stamp per pin set); where the torch virtualenv has them already, pip finds
# them through the .pth file and installs nothing more.
# OML_TORCH=latest: instead, a virtualenv with what `pip install open-metric-learning==4.0.0`
# brings today, its own dependency resolution included (torch 2.15.0 on 2026-12-06), for the
# benchmarks that compare with OML at its newest (bench/train_speed.sh):
# ${SIMILE_CACHE:-~/.cache/simile}/oml-4.0.0-pip.
# Safe to run from parallel tests (flock); quick when done.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
LATEST="${OML_TORCH:-}"
case "$LATEST" in
"" | latest) ;;
*) echo "OML_TORCH: 'latest' or unset, not '$LATEST'" >&2; exit 2 ;;
esac
VENV="${OML_VENV:-$CACHE/oml-4.0.0${LATEST:+-pip}}"
# transformers 5.25.0 needs tokenizers>=0.23.1,<0.24 and huggingface-hub>=2.4,<3.
TEXT_PKGS=("transformers==5.25.0" "tokenizers==0.23.3")
TEXT_STAMP="$VENV/.simile-text-$(printf '%s\n' "${TEXT_PKGS[@]}" | cksum | cut -d' ' -f1)"
# The installs, into $TMP (a new virtualenv made here).
install_latest() {
    python3 -m venv "$TMP"
    "$TMP/bin/python" -m pip install --quiet --upgrade pip >&2
    # OML imports modules its package metadata does not list (omegaconf and others); it pins
    # numpy < 2, which pyarrow 18 is the last to support.
    "$TMP/bin/python" -m pip install --quiet "open-metric-learning==4.0.0" "pyarrow==18.1.0" \
        omegaconf validators gdown matplotlib albumentations opencv-python-headless >&2
}
install_bundled() {
    "$TORCH_VENV/bin/python" -m venv "$TMP"
    py="$(ls -d "$TMP"/lib/python3*/site-packages)"
    echo "$(ls -d "$TORCH_VENV"/lib/python3*/site-packages)" >"$py/simile-torch.pth"
    "$TMP/bin/python" -m pip install --quiet --no-deps "open-metric-learning==4.0.0" >&2
    "$TMP/bin/python" -m pip install --quiet pandas pyarrow gdown omegaconf validators \
        matplotlib albumentations opencv-python-headless >&2
}
# OML's text modules into $1 (a complete virtualenv or $TMP), pinned; torch and numpy stay as they
# are. Then OML's text dataset and HFWrapper on a tiny random BERT, warnings as errors (OML warns
# when a tokenizer or model is not of the transformers classes it knows).
install_text() {
    local cons
    cons="$(mktemp)"
    "$1/bin/python" -c "import numpy, torch; print(f'torch=={torch.__version__}'); print(f'numpy=={numpy.__version__}')" >"$cons"
    "$1/bin/python" -m pip install --quiet -c "$cons" "${TEXT_PKGS[@]}" >&2
    rm -f "$cons"
    "$1/bin/python" - "${TEXT_PKGS[@]}" >&2 <<'EOF'
import json, os, sys, tempfile, warnings

import pandas as pd
import tokenizers
import torch
import transformers
from oml.datasets import TextLabeledDataset
from oml.models import HFWrapper

warnings.simplefilter("error")

want = dict(p.split("==") for p in sys.argv[1:])
got = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
assert all(got[k] == v for k, v in want.items()), f"expected {want}, got {got}"
with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer"}, f)
    tok = transformers.AutoTokenizer.from_pretrained(d)
cfg = transformers.BertConfig(vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
model = HFWrapper(transformers.BertModel(cfg), 8)
ds = TextLabeledDataset(pd.DataFrame({"label": [0, 0], "text": ["hello world", "world"]}), tokenizer=tok, max_length=6)
batch = torch.utils.data.default_collate([ds[0], ds[1]])
assert batch["input_tensors"]["input_ids"].tolist() == [[2, 5, 6, 3, 0, 0], [2, 6, 3, 0, 0, 0]], batch
assert model(batch["input_tensors"]).shape == (2, 8)
EOF
}
if [ ! -f "$VENV/.simile-complete" ] || [ ! -f "$TEXT_STAMP" ]; then
    if [ -z "$LATEST" ]; then
        PY="$(scripts/bootstrap-pyextras.sh)"
        TORCH_VENV="$(dirname "$(dirname "$PY")")"
    fi
    mkdir -p "$CACHE"
    exec 9>"$VENV.lock"
    flock 9
    if [ ! -f "$VENV/.simile-complete" ]; then
        echo "simile: installing open-metric-learning==4.0.0 and ${TEXT_PKGS[*]} into $VENV (once${LATEST:+, as pip resolves it: about 5 GB})" >&2
        TMP="$VENV.tmp.$$"
        rm -rf "$TMP"
        if [ -n "$LATEST" ]; then install_latest; else install_bundled; fi
        "$TMP/bin/python" -c "import oml.models, oml.losses.triplet, oml.miners.inbatch_hard_tri, torchvision" >&2
        install_text "$TMP"
        rm -rf "$VENV"
        mv "$TMP" "$VENV"
        # A venv's scripts hard-code their folder: fix the shebangs after the move.
        grep -rl "$TMP" "$VENV/bin" 2>/dev/null | xargs -r sed -i "s#$TMP#$VENV#g"
        touch "$VENV/.simile-complete" "$TEXT_STAMP"
    elif [ ! -f "$TEXT_STAMP" ]; then
        echo "simile: installing ${TEXT_PKGS[*]} into $VENV (OML's text modules; once)" >&2
        install_text "$VENV"
        touch "$TEXT_STAMP"
    fi
fi
echo "$VENV"
