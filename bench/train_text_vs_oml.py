"""Trains OML 4.0's text recipe on a text CSV (the verses of `make demo-text`), for
bench/train_text_vs_oml.sh.

OML's own text components in a plain PyTorch loop, as OML's README trains texts (its
"train-val-txt" example, open_metric_learning-4.0.0.dist-info/METADATA lines 672-720):
- data: `TextLabeledDataset` (oml/datasets/texts.py): every text tokenised on its own in
  `__getitem__` with truncation and padding="max_length" (max_length 128 by default), so every
  batch is [batch, max_length] tokens however short its texts (`--padding longest` is a
  variant, not OML's: the same tokens, each batch cut to its longest text);
- model: `HFWrapper(AutoModel.from_pretrained(model dir), hidden size)` (oml/models/texts/
  huggingface.py): the last hidden state of the first ([CLS]) token, not normalised; the model
  in train mode (BERT's dropout 0.1 on);
- `BalanceSampler(labels, n_labels, n_instances)` (2 x 2 in OML's example), `TripletLossWithMiner(
  margin, AllTripletsMiner())` (margin 0.1; Euclidean distances; `--miner hard`:
  HardTripletsMiner), `Adam(model.parameters(), lr)` (1e-4, constant), 1 epoch;
- validation: `TextQueryGalleryLabeledDataset`, OML's `inference`, then `RetrievalResults.
  from_embeddings` (Euclidean distances between the raw CLS vectors) and
  `calc_retrieval_metrics_rr`, before training and after the last epoch.

Throughput counts the training steps only, with bench/train_vs_oml.py's clock points: from
asking for the batch (the tokenisation in the loader included: OML tokenises per item) to the
end of the optimiser step and the loss read back; validation and start-up are outside it.

Prints one JSON line: the config, steps, texts/s of the training steps, tokens per text (real and
as fed), the load average before and after, and the validation metrics (OVERALL/cmc/1, cmc/5,
precision/5, map/5) before and after training. Helper modes for the shell script, from
bench/train_vs_oml.py: `--simile-run DIR` prints the same line for a finished simile-train text
run, `--summarise FILE` the per-seed and mean tables (texts/s; ratios against OML as shipped,
the run without a variant) of a file of such lines.
`--simile-config C` takes epochs, sampler, margin, miner, learning rate, max_length and the
validation batch from a resolved simile config.toml, refusing what OML's recipe cannot mirror.
"""

import argparse
import json
import os
import random
import sys
import time
import warnings

import numpy as np
import pandas as pd
import torch

from train_vs_oml import KEYS, loadavg, simile_run, summarise

OML = "oml-4.0.0"


def from_simile_config(args):
    """The keys of a resolved simile text config (config.toml of a run) that OML's recipe has."""
    import tomllib

    with open(args.simile_config, "rb") as f:
        c = tomllib.load(f)
    m, smp, loss, opt, sch = (c.get(k, {}) for k in ("model", "sampler", "loss", "optimizer", "schedule"))
    bad = []
    if smp.get("name", "balance") != "balance":
        bad.append(f"sampler {smp.get('name')} (OML's recipe: balance)")
    if loss.get("name", "triplet") != "triplet" or loss.get("reduction", "mean") != "mean":
        bad.append(f"loss {loss.get('name')} / reduction {loss.get('reduction')} (OML's recipe: triplet, mean)")
    if opt.get("name", "adam") not in ("adam", "adamw"):
        bad.append(f"optimizer {opt.get('name')} (OML's recipe: adam)")
    if sch.get("name", "constant") != "constant" or sch.get("warmup_epochs", 0.0):
        bad.append(f"schedule {sch.get('name')} with warm-up {sch.get('warmup_epochs', 0.0)} (OML's recipe: constant)")
    if c.get("grad_clip_norm", 0.0) or c.get("grad_clip_value", 0.0) or c.get("freeze_n_epochs", 0):
        bad.append("gradient clipping or frozen epochs (OML's recipe: none)")
    # simile's text keys: [model] pooling and max_length, both the init model's when unset
    # (mean pooling for all-MiniLM-L6-v2), and normalise (true unless set).
    if m.get("pooling") != "cls" or m.get("normalise", True):
        bad.append(
            f"model.pooling {m.get('pooling')}, model.normalise {m.get('normalise', True)} (OML's HFWrapper: "
            'the CLS state, not normalised: pooling = "cls", normalise = false)'
        )
    if "max_length" not in m:
        bad.append("no model.max_length (the init model's then; OML's TextLabeledDataset: 128)")
    if bad:
        raise SystemExit("train_text_vs_oml.py: the config differs from OML's text recipe: " + "; ".join(bad))
    args.epochs = c["epochs"]
    args.n_labels, args.n_instances = smp["n_labels"], smp["n_instances"]
    args.margin = loss["margin"]
    args.miner = {"all_triplets": "all", "hard_triplets": "hard"}[loss.get("miner", {}).get("name", "all_triplets")]
    args.optimizer, args.lr = opt.get("name", "adam"), opt["lr"]
    args.weight_decay = opt.get("weight_decay", 0.01 if args.optimizer == "adamw" else 0.0)
    args.betas, args.eps = opt.get("betas", [0.9, 0.999]), opt.get("eps", 1e-8)
    args.max_length = m["max_length"]
    args.batch_size_val = c.get("batch_size_val", args.batch_size_val)


def metrics_of(model, df_val, tokenizer, args):
    """OML's validation: its text dataset, inference, retrieval results and metrics."""
    from oml.datasets import TextQueryGalleryLabeledDataset
    from oml.inference import inference
    from oml.metrics import calc_retrieval_metrics_rr
    from oml.retrieval import RetrievalResults

    val = TextQueryGalleryLabeledDataset(df_val, tokenizer=tokenizer, max_length=args.max_length)
    with warnings.catch_warnings():  # OML's inference enters a CUDA autocast even on the CPU
        warnings.filterwarnings("ignore", "CUDA is not available", UserWarning)
        emb = inference(model, val, batch_size=args.batch_size_val, num_workers=0)
    rr = RetrievalResults.from_embeddings(emb, val, n_items=10)
    m = calc_retrieval_metrics_rr(rr, cmc_top_k=(1, 5), precision_top_k=(5,), map_top_k=(5,), verbose=False)
    m = {f"OVERALL/{k}/{kk}": float(v) for k, d in m.items() for kk, v in d.items()}
    print("validation: " + ", ".join(f"{k} {m[k]:.4f}" for k in KEYS), file=sys.stderr, flush=True)
    return m


def cut_to_longest(batch):
    """The `--padding longest` variant: a batch of max_length-padded items cut to its longest text."""
    from torch.utils.data import default_collate

    b = default_collate(batch)
    enc = b["input_tensors"]
    n = int(enc["attention_mask"].sum(dim=1).max())
    for k in ("input_ids", "attention_mask"):
        enc[k] = enc[k][:, :n]
    return b


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", help="an OML text CSV: label, text, split, is_query, is_gallery")
    ap.add_argument("--model-dir", help="a HuggingFace folder (scripts/bootstrap-text.sh --model-dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--n-labels", type=int, default=2)
    ap.add_argument("--n-instances", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--miner", choices=["all", "hard"], default="all")
    ap.add_argument("--optimizer", choices=["adam", "adamw"], default="adam")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--padding", choices=["max_length", "longest"], default="max_length")
    ap.add_argument("--batch-size-val", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (OML's example: 0)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after N steps (quick checks; 0: every epoch)")
    ap.add_argument("--no-valid", action="store_true", help="skip both validations (throughput only)")
    ap.add_argument("--log-every", type=int, default=0, metavar="N", help="a progress line on stderr every N steps")
    ap.add_argument("--skip-first-step", action="store_true", help="leave the first step (warm-up) out of texts/s")
    ap.add_argument("--simile-config", help="a resolved simile config.toml whose values replace the defaults above")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="copied into the JSON line")
    ap.add_argument("--simile-run", metavar="DIR", help="print the JSON line of a finished simile-train run")
    ap.add_argument("--load-before", help="the load average before that run")
    ap.add_argument("--summarise", metavar="FILE", help="tables of a file of JSON lines")
    args = ap.parse_args()
    args.betas, args.eps = [0.9, 0.999], 1e-8
    tags = dict(t.split("=", 1) for t in args.tag)
    if args.summarise:
        return summarise(args.summarise, unit="texts", against="plain")
    if args.simile_run:
        return simile_run(args.simile_run, args.load_before, tags, args.skip_first_step, unit="texts")
    if args.simile_config:
        from_simile_config(args)
    if not args.csv or not args.model_dir:
        ap.error("--csv and --model-dir are required")
    if args.padding != "max_length":
        tags.setdefault("variant", f"pad-{args.padding}")

    from torch.utils.data import DataLoader
    from transformers import AutoModel, AutoTokenizer
    import tokenizers
    import transformers

    from oml.datasets import TextLabeledDataset
    from oml.losses import TripletLossWithMiner
    from oml.miners import AllTripletsMiner, HardTripletsMiner
    from oml.models import HFWrapper
    from oml.samplers import BalanceSampler

    t_start = time.time()
    load_before = loadavg()
    random.seed(args.seed)
    np.random.seed(args.seed)  # BalanceSampler draws from numpy's global generator
    torch.manual_seed(args.seed)  # dropout
    torch.set_num_threads(args.threads)

    t0 = time.time()
    df = pd.read_csv(args.csv)
    # OML's text datasets index their texts column by position through the frame's index
    # (texts.py: `self._texts[item]` on a Series): each split needs a fresh 0..N-1 index.
    df_tr = df[df["split"] == "train"].reset_index(drop=True)
    df_val = df[df["split"] == "validation"].reset_index(drop=True)
    df_val = df_val.astype({"is_query": bool, "is_gallery": bool})
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    hf = AutoModel.from_pretrained(args.model_dir)
    model = HFWrapper(hf, hf.config.hidden_size).train()
    load_s = time.time() - t0

    train = TextLabeledDataset(df_tr, tokenizer=tokenizer, max_length=args.max_length)
    sampler = BalanceSampler(train.get_labels(), n_labels=args.n_labels, n_instances=args.n_instances)
    loader = DataLoader(
        train,
        batch_sampler=sampler,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        **({"collate_fn": cut_to_longest} if args.padding == "longest" else {}),
    )
    miner = AllTripletsMiner() if args.miner == "all" else HardTripletsMiner()
    criterion = TripletLossWithMiner(args.margin, miner, need_logs=True)
    make = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = make(model.parameters(), lr=args.lr, betas=tuple(args.betas), eps=args.eps, weight_decay=args.weight_decay)

    valid = not args.no_valid
    t0 = time.time()
    untrained = metrics_of(model, df_val, tokenizer, args) if valid else None
    valid_s = time.time() - t0
    model.train()

    steps_per_epoch = len(sampler)
    step, n_text, train_s, losses = 0, 0, 0.0, []
    real_tokens = fed_tokens = 0
    for _ in range(args.epochs):
        if args.max_steps and step >= args.max_steps:
            break
        it = iter(loader)
        while not (args.max_steps and step >= args.max_steps):
            ts = time.time()
            try:
                batch = next(it)
            except StopIteration:
                break
            # OML's README loop: forward, loss, backward, step, zero_grad.
            embeddings = model(batch["input_tensors"])
            loss = criterion(embeddings, batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if not (args.skip_first_step and step == 0):
                train_s += time.time() - ts
                mask = batch["input_tensors"]["attention_mask"]
                n_text += mask.shape[0]
                real_tokens += int(mask.sum())
                fed_tokens += mask.numel()
            step += 1
            if args.log_every and step % args.log_every == 0:
                recent = losses[-args.log_every :]
                print(
                    f"step {step}/{args.epochs * steps_per_epoch}: loss {np.mean(recent):.4f}, "
                    f"{n_text / max(train_s, 1e-9):.1f} texts/s so far, load {loadavg()}",
                    file=sys.stderr,
                    flush=True,
                )
    load_after = loadavg()
    t0 = time.time()
    metrics = metrics_of(model, df_val, tokenizer, args) if valid else None
    valid_s += time.time() - t0
    print(
        json.dumps(
            {
                "framework": f"{OML} torch-{torch.__version__.split('+')[0]}",
                **tags,
                "args": vars(args),
                "versions": {
                    "transformers": transformers.__version__,
                    "tokenizers": tokenizers.__version__,
                    "attention": getattr(hf.config, "_attn_implementation", None),
                    "dtype": str(next(hf.parameters()).dtype),
                },
                "steps": step,
                "texts": n_text,
                "train_seconds": round(train_s, 2),
                "texts_per_s": round(n_text / train_s, 1) if train_s else None,
                "tokens_per_text": round(real_tokens / max(n_text, 1), 1),
                "tokens_fed_per_text": round(fed_tokens / max(n_text, 1), 1),
                "load_seconds": round(load_s, 2),
                "valid_seconds": round(valid_s, 2),
                "wall_seconds": round(time.time() - t_start, 2),
                "load_before": load_before,
                "load_after": load_after,
                "last_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else None,
                "metrics": {k: metrics[k] for k in KEYS} if metrics else None,
                "metrics_untrained": {k: untrained[k] for k in KEYS} if untrained else None,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
