#!/usr/bin/env python3
"""The PyTorch peer of simile's text embedding, for parity tests and benchmarks:
all-MiniLM-L6-v2 (or any BERT folder) through sentence-transformers / transformers.
Run it with the python `scripts/bootstrap-text.sh` prints.

Embed (writes float32 [N, D] .npy atomically; prints one JSON line on stdout with
sentences/s of the encode call alone, model load and tokenizer-length counting excluded):
  PY=$(scripts/bootstrap-text.sh); MD=$(scripts/bootstrap-text.sh --model-dir)
  $PY bench/text_reference.py --texts texts.jsonl --model-dir "$MD" --pooling mean \\
      --normalise --max-length 256 --out emb.npy [--batch-size 32] [--threads 2] [--dtype fp32|bf16|int8]
  --pooling mean: sentence-transformers: the folder's own SentenceTransformer(model_dir) when
    its modules.json says Transformer+Pooling(mean)[+Normalize] and that matches --normalise;
    otherwise built explicitly as models.Transformer(max_seq_length) + Pooling(mean)
    [+ Normalize] (--st-load explicit forces that). max_seq_length = --max-length.
  --pooling cls: plain transformers AutoModel, last_hidden_state[:, 0] (what OML 4.0's
    HFWrapper returns), tokenised with truncation to --max-length; --normalise L2s it.
  --dtype int8: torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    on the loaded model (CPU), as simile's --quantize int8 does.
  --dtype bf16: torch.autocast(bfloat16) around the forward pass (weights stay fp32, output
    cast to fp32), as simile's --compute bf16 does.
  --texts: .jsonl (each line a JSON string or an object with "text") or .csv (a "text" column).

Make texts (deterministic for a seed; .jsonl of {"id", "kind", "text"}):
  $PY bench/text_reference.py --make-texts 1000 --out texts.jsonl --seed 0
  Kinds: short (1-3 words), medium, long (well over 256 word pieces: truncation), unicode
  (accents, NFD combining marks, CJK, emoji, Cyrillic, Greek, Arabic, NBSP), mixed-case,
  punctuation, whitespace (runs of spaces, tabs, newlines); from the pythonbible verses
  and synthetic vocabulary. No text is empty after whitespace stripping.

Check the published all-MiniLM-L6-v2 values (mean + L2): exit 0 when they match to 1e-5:
  $PY bench/text_reference.py --check-golden --model-dir "$MD"
"""

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time

GOLDEN_A = "This is an example sentence"
GOLDEN_B = "Each sentence is converted"
GOLDEN_FIRST5 = [0.0676569, 0.0634959, 0.0487131, 0.0793050, 0.0374481]
GOLDEN_COS = 0.40456


def log(msg):
    print(f"text_reference: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------- reading/writing
def read_texts(path):
    texts = []
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            r = csv.DictReader(f)
            if "text" not in (r.fieldnames or []):
                raise SystemExit(f"text_reference: {path}: no 'text' column (found {r.fieldnames})")
            texts = [row["text"] for row in r]
    else:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                v = json.loads(line)
                if isinstance(v, dict):
                    v = v.get("text")
                if not isinstance(v, str):
                    raise SystemExit(f"text_reference: {path}:{n}: expected a string or an object with 'text'")
                texts.append(v)
    if not texts:
        raise SystemExit(f"text_reference: {path}: no texts")
    return texts


def atomic_write(path, write):
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------- models
def st_modules(model_dir):
    """The folder's sentence-transformers pipeline: (has modules.json, mean pooling, normalise)."""
    mj = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(mj):
        return None
    with open(mj) as f:
        mods = json.load(f)
    kinds = [m["type"].rsplit(".", 1)[-1] for m in mods]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    pool = next(m for m in mods if m["type"].endswith("Pooling"))
    pc = os.path.join(model_dir, pool["path"], "config.json")
    if not os.path.isfile(pc):
        return None
    with open(pc) as f:
        cfg = json.load(f)
    mean = cfg.get("pooling_mode_mean_tokens") and not any(
        cfg.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                             "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                             "pooling_mode_lasttoken"))
    return {"mean": bool(mean), "normalise": kinds[-1] == "Normalize"}


class MeanST:
    """sentence-transformers, mean pooling."""

    def __init__(self, a, device):
        import warnings

        from sentence_transformers import SentenceTransformer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sentence_transformers.models is a deprecated alias
            from sentence_transformers import models
        own = st_modules(a.model_dir)
        use_folder = (a.st_load == "folder" or (a.st_load == "auto" and own and own["mean"]
                                                 and own["normalise"] == a.normalise))
        if a.st_load == "folder" and not (own and own["mean"] and own["normalise"] == a.normalise):
            raise SystemExit(f"text_reference: {a.model_dir}'s modules.json is not Transformer+Pooling(mean)"
                             f"{'+Normalize' if a.normalise else ''}; use --st-load explicit")
        if use_folder:
            self.model = SentenceTransformer(a.model_dir, device=device, local_files_only=True)
            self.model.max_seq_length = a.max_length
            self.loader = "SentenceTransformer(model_dir)"
        else:
            tr = models.Transformer(a.model_dir, max_seq_length=a.max_length)
            mods = [tr, models.Pooling(tr.get_embedding_dimension(), pooling_mode="mean")]
            if a.normalise:
                mods.append(models.Normalize())
            self.model = SentenceTransformer(modules=mods, device=device)
            self.loader = "Transformer+Pooling(mean)" + ("+Normalize" if a.normalise else "")
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.batch_size = a.batch_size

    def encode(self, texts):
        import torch

        e = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                              show_progress_bar=False, normalize_embeddings=False)
        return e.to(torch.float32).cpu().numpy()


class ClsHF:
    """transformers AutoModel, last_hidden_state[:, 0] (OML 4.0's HFWrapper)."""

    def __init__(self, a, device):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(a.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(a.model_dir, local_files_only=True).to(device).eval()
        self.loader = "AutoModel CLS"
        self.device, self.a = device, a

    def encode(self, texts):
        import torch

        a = self.a
        # longest first, like sentence-transformers' encode, so both paths pad alike
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = [None] * len(texts)
        with torch.inference_mode():
            for s in range(0, len(order), a.batch_size):
                idx = order[s:s + a.batch_size]
                x = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=a.max_length, return_tensors="pt").to(self.device)
                with autocast(a, self.device):
                    h = self.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
                e = h["last_hidden_state"][:, 0].float()
                if a.normalise:
                    e = torch.nn.functional.normalize(e, p=2, dim=1)
                for j, i in enumerate(idx):
                    out[i] = e[j]
        return torch.stack(out).cpu().numpy()


def autocast(a, device):
    import contextlib

    import torch

    if a.dtype == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build(a):
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = MeanST(a, device) if a.pooling == "mean" else ClsHF(a, device)
    if a.dtype == "int8":
        import warnings

        if device != "cpu":
            raise SystemExit("text_reference: --dtype int8 runs on the CPU (--device cpu)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
            m.model = torch.ao.quantization.quantize_dynamic(m.model, {torch.nn.Linear}, dtype=torch.qint8)
    return m, device


def run_embed(a):
    import numpy as np
    import torch

    texts = read_texts(a.texts)
    t0 = time.perf_counter()
    m, device = build(a)
    load_s = time.perf_counter() - t0
    # how many texts the max length cuts (counted outside the timed call)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no "longer than the maximum" warning for the counting
    lens = [len(ids) for ids in m.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
    hf_logging.set_verbosity(level)
    truncated = sum(n > a.max_length for n in lens)
    for _ in range(a.warmup):
        with autocast(a, device):
            m.encode(texts[: a.batch_size])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    if a.pooling == "mean":
        with autocast(a, device):
            emb = m.encode(texts)
    else:
        emb = m.encode(texts)  # autocast inside, around the forward pass only
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    enc_s = time.perf_counter() - t1
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    atomic_write(a.out, lambda p: np.save(open(p, "wb"), emb))
    import sentence_transformers
    import transformers

    print(json.dumps({
        "mode": "embed", "pooling": a.pooling, "normalise": a.normalise, "loader": m.loader,
        "n": len(texts), "dim": int(emb.shape[1]), "max_length": a.max_length,
        "truncated": truncated, "tokens_mean": round(sum(min(n, a.max_length) for n in lens) / len(lens), 1),
        "batch_size": a.batch_size, "threads": torch.get_num_threads(), "dtype": a.dtype, "device": device,
        "load_s": round(load_s, 3), "encode_s": round(enc_s, 3),
        "sentences_per_s": round(len(texts) / enc_s, 2),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__, "out": os.path.abspath(a.out),
    }), flush=True)


def run_golden(a):
    import numpy as np

    a.texts, a.pooling, a.normalise = None, "mean", True
    m, _ = build(a)
    e = m.encode([GOLDEN_A, GOLDEN_B])
    first5 = [round(float(x), 7) for x in e[0, :5]]
    cos = float(np.dot(e[0], e[1]) / np.linalg.norm(e[0]) / np.linalg.norm(e[1]))
    ok = np.allclose(e[0, :5], GOLDEN_FIRST5, atol=1e-5) and abs(cos - GOLDEN_COS) < 1e-5
    print(json.dumps({"mode": "check-golden", "loader": m.loader, "first5": first5,
                      "expected_first5": GOLDEN_FIRST5, "cosine": round(cos, 6),
                      "expected_cosine": GOLDEN_COS, "ok": bool(ok)}), flush=True)
    if not ok:
        sys.exit(1)


# ---------------------------------------------------------------------------- texts
WORDS = ("river stone light metric embedding gallery query label train model vector search "
         "distance neighbour font glyph sample batch anchor positive negative margin triplet "
         "kernel tensor cache shard window bridge harbour market winter garden silver orange "
         "quickly slowly brightly under above between through without against").split()
UNICODE = [
    "Café crème brûlée à la façon de grand-mère, naïve et déjà vu",
    "Ça va? Ñandú, señor — São Paulo, Zürich, Øresund, Łódź, İstanbul",
    "e\u0301te\u0301 (NFD: combining acute accents) vs été (NFC)",
    "東京タワーの近くで寿司を食べました。北京欢迎你！서울특별시",
    "Emoji run: 😀😃😄 👍🏽 🇫🇷 👨‍👩‍👧‍👦 ❤️ 🚀✨",
    "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ελληνικά: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Αλφα βήτα γάμμα.",
    "العربية: مرحبا بالعالم — עברית: שלום עולם",
    "Non\u00a0breaking\u00a0spaces and a zero\u200bwidth space and ﬁ ligature, ＦＵＬＬＷＩＤＴＨ",
    "Math: ∑ x² ≤ ∞, ½ + ¼ = ¾, 10 °C, € 5, £ 3, ¥ 7, № 9",
]
PUNCT = ["!!!", "?!", "...", "—", "–", ";", ":", "(", ")", "[", "]", "{", "}", "\"", "'", "`",
         "«", "»", "“", "”", "@", "#", "$", "%", "^", "&", "*", "_", "=", "+", "|", "\\", "/", "~", "<", ">"]


def verses():
    """All verse texts of the installed pythonbible translations, in a fixed order."""
    import importlib

    out = []
    for t in ("asv", "kjv", "web", "ylt"):
        try:
            b = importlib.import_module(f"pythonbible_{t}.plain_text_readers_bible").bible
        except ImportError:
            raise SystemExit("text_reference: --make-texts reads the pythonbible-* packages: "
                             "run it with $(scripts/bootstrap-text.sh)")
        for vid in sorted(b.get_verse_ids()):
            s = " ".join(b.get_scripture(vid).split())
            if s:
                out.append(s)
    return out


def make_texts(n, seed):
    rng = random.Random(seed)
    vs = verses()
    kinds = ["short", "medium", "medium", "long", "unicode", "mixed-case", "punctuation", "whitespace"]

    def synth(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        v = rng.choice(vs)
        if kind == "short":
            src = v.split() if rng.random() < 0.5 else WORDS
            t = " ".join(rng.choice(src) for _ in range(rng.randint(1, 3)))
        elif kind == "medium":
            t = v if rng.random() < 0.6 else synth(rng.randint(6, 25)).capitalize() + "."
        elif kind == "long":
            # 300-600 words: well over 256 word pieces
            parts, words = [], 0
            target = rng.randint(300, 600)
            while words < target:
                p = rng.choice(vs) if rng.random() < 0.7 else synth(rng.randint(10, 40)) + "."
                parts.append(p)
                words += len(p.split())
            t = " ".join(parts)
        elif kind == "unicode":
            u = rng.choice(UNICODE)
            t = u if rng.random() < 0.5 else f"{v} {u}" if rng.random() < 0.5 else f"{u} {synth(rng.randint(2, 8))}"
        elif kind == "mixed-case":
            w = v.split()
            style = rng.choice(["upper", "lower", "alternate", "random", "title"])
            if style == "upper":
                t = v.upper()
            elif style == "lower":
                t = v.lower()
            elif style == "title":
                t = v.title()
            elif style == "alternate":
                t = "".join(c.upper() if j % 2 else c.lower() for j, c in enumerate(v))
            else:
                t = " ".join(x.upper() if rng.random() < 0.3 else x for x in w)
        elif kind == "punctuation":
            w = (v if rng.random() < 0.5 else synth(rng.randint(3, 12))).split()
            t = " ".join(x + (rng.choice(PUNCT) if rng.random() < 0.4 else "") for x in w)
            t = rng.choice(PUNCT) + t + rng.choice(PUNCT) * rng.randint(1, 3)
            if rng.random() < 0.3:
                t = t.replace(" ", "", rng.randint(1, 3))  # punctuation glued to words
        else:  # whitespace
            w = (v if rng.random() < 0.5 else synth(rng.randint(3, 12))).split()
            seps = [" ", "  ", "   ", "\t", "\n", " \t ", "\r\n", "\u3000"]
            t = "".join(x + rng.choice(seps) for x in w)
            t = rng.choice(["", " ", "\t", "\n  "]) + t
        if not t.strip():
            t = synth(2)
        out.append({"id": i, "kind": kind, "text": t})
    return out


def run_make(a):
    rows = make_texts(a.make_texts, a.seed)
    assert all(r["text"].strip() for r in rows)

    def write(p):
        with open(p, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    atomic_write(a.out, write)
    kinds = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print(json.dumps({"mode": "make-texts", "n": len(rows), "seed": a.seed, "kinds": kinds,
                      "out": os.path.abspath(a.out)}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", help="texts to embed: .jsonl or .csv with a text column")
    ap.add_argument("--make-texts", type=int, metavar="N", help="write N test texts to --out (.jsonl)")
    ap.add_argument("--check-golden", action="store_true", help="check all-MiniLM-L6-v2's published values")
    ap.add_argument("--model-dir", help="folder with config.json, model.safetensors, tokenizer.json")
    ap.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    ap.add_argument("--normalise", "--normalize", action="store_true", help="L2-normalise the embeddings")
    ap.add_argument("--max-length", type=int, default=256, help="word pieces, [CLS]/[SEP] included (default 256)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32")
    ap.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when there is one)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed batches encoded first (default 0)")
    ap.add_argument("--st-load", choices=["auto", "folder", "explicit"], default="auto",
                    help="mean pooling: the folder's own modules.json, or modules built here (default auto)")
    ap.add_argument("--out", help="emb.npy (embed) or texts.jsonl (--make-texts)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.make_texts is not None:
        if not a.out or a.make_texts < 1:
            ap.error("--make-texts N needs N >= 1 and --out")
        run_make(a)
    elif a.check_golden:
        if not a.model_dir:
            ap.error("--check-golden needs --model-dir")
        run_golden(a)
    else:
        if not (a.texts and a.model_dir and a.out):
            ap.error("embedding needs --texts, --model-dir and --out (or use --make-texts / --check-golden)")
        run_embed(a)


if __name__ == "__main__":
    main()
