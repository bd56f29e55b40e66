"""OML's postprocessor pipeline (train_postprocessor.py, oml.md 7.4) on a simile dataset, with
the same small CNN backbone and the same starting extractor as simile's pairwise mode, for
bench/pairwise_vs_oml.sh. OML's own classes do the work: BalanceSampler, PairsMiner (hard
pairs), ConcatSiamese, PairwiseReranker, RetrievalResults and calc_retrieval_metrics_rr; only
the Lightning/Hydra wrapper is replaced by a plain loop (same steps: embeddings from the
extractor once, sampler batches, miner on the embeddings, BCEWithLogits on is_negative, Adam).

Usage: python bench/pairwise_oml.py --dataset D.parquet --extractor MODEL_DIR --epochs 6 ...
Prints one JSON line: CMC@1/5, P@5, MAP@5 of the extractor and after re-ranking, and times.
"""
import argparse
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from oml.interfaces.models import IExtractor
from oml.metrics.embeddings import calc_retrieval_metrics_rr
from oml.miners.pairs import PairsMiner
from oml.models.meta.siamese import ConcatSiamese
from oml.retrieval.postprocessors.pairwise import PairwiseReranker
from oml.retrieval.retrieval_results import RetrievalResults
from oml.samplers.balance import BalanceSampler


class SmallCnn(IExtractor):
    """simile's `smallcnn` (src/model/arch.rs): 4 x (conv3x3 no bias, BN, ReLU, max-pool 2 in
    the first three), average pool, optional projection, optional L2 normalisation. The
    parameter names are simile's, so its model.safetensors loads as is."""

    def __init__(self, width, proj_dim, normalise):
        super().__init__()
        blocks, cin = [], 3
        for i in range(4):
            cout = width << i
            b = nn.Module()
            b.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
            b.bn = nn.BatchNorm2d(cout)
            blocks.append(b)
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.proj = nn.Linear(cin, proj_dim) if proj_dim else None
        self.normalise = normalise
        self._dim = proj_dim or cin

    @property
    def feat_dim(self):
        return self._dim

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = F.relu(b.bn(b.conv(x)))
            if i < 3:
                x = F.max_pool2d(x, 2)
        x = x.mean(dim=(2, 3))
        if self.proj is not None:
            x = self.proj(x)
        if self.normalise:
            x = x / x.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)
        return x


def load_extractor(folder):
    spec = json.load(open(os.path.join(folder, "model.json")))
    a = spec["architecture"]
    assert a["name"] == "smallcnn", "this benchmark ports simile's smallcnn only"
    m = SmallCnn(a.get("width", 32), a.get("proj_dim"), spec["normalise"])
    state = load_file(os.path.join(folder, spec["weights"]))
    m.load_state_dict(state, strict=False)
    return m, spec


def prepare(path, size):
    """simile's `pad` resize: the longest side to `size`, aspect kept, centred on white."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    im = im.resize((nw, nh), Image.BILINEAR)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(im, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(out)


class Images:
    """The validation images as OML's reranker sees a query/gallery dataset."""

    input_tensors_key = "input_tensors"
    index_key = "idx"

    def __init__(self, x, norm, query_ids, gallery_ids):
        self.x, self.norm, self.q, self.g = x, norm, query_ids, gallery_ids

    def __getitem__(self, i):
        return {self.input_tensors_key: self.norm(self.x[i : i + 1])[0], self.index_key: i}

    def __len__(self):
        return len(self.x)

    def get_query_ids(self):
        return self.q

    def get_gallery_ids(self):
        return self.g


def embed(model, x, norm, bs=512):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(norm(x[i : i + bs])) for i in range(0, len(x), bs)])


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "/"))
        else:
            out[key] = float(v)
    return out


def metrics(rr):
    m = calc_retrieval_metrics_rr(
        rr, cmc_top_k=(1, 5), precision_top_k=(5,), map_top_k=(5,), verbose=False
    )
    return flat(m)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--extractor", required=True)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--n-labels", type=int, default=16)
    ap.add_argument("--n-instances", type=int, default=4)
    ap.add_argument("--mlp-hidden", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-backbone", type=float, default=3e-4)
    ap.add_argument("--top-n", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t0 = time.time()

    t = pq.read_table(args.dataset)
    meta = {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()}
    root = meta.get("simile.root", ".")
    root = os.path.join(os.path.dirname(os.path.abspath(args.dataset)), root)
    df = t.to_pandas()
    ext, spec = load_extractor(args.extractor)
    size = spec["input"]["size"]
    mean = torch.tensor(spec["input"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec["input"]["std"]).view(1, 3, 1, 1)

    def tensors(rows):
        # Kept as u8 (Font-ID's train split is 1 GB as float32), normalised per batch.
        arr = np.stack([prepare(os.path.join(root, p), size) for p in rows["path"]])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def norm(x):
        return (x.float() / 255.0 - mean) / std

    tr = df[df["split"] == "train"].reset_index(drop=True)
    va = df[df["split"] == "validation"].reset_index(drop=True)
    x_tr, x_va = tensors(tr), tensors(va)
    y_tr = tr["label"].to_numpy()
    y_va = va["label"].to_numpy()
    t_prep = time.time() - t0

    # The extractor's embeddings (OML's embeddings cache) and the validation neighbours.
    e_tr, e_va = embed(ext, x_tr, norm), embed(ext, x_va, norm)
    q_ids = torch.tensor(np.nonzero(va["is_query"].fillna(False).to_numpy(bool))[0])
    g_ids = torch.tensor(np.nonzero(va["is_gallery"].fillna(False).to_numpy(bool))[0])
    d = torch.cdist(e_va[q_ids], e_va[g_ids])
    d[q_ids[:, None] == g_ids[None, :]] = float("inf")
    k = max(5, args.top_n)
    dist, ii = d.topk(k, dim=1, largest=False)
    same = torch.from_numpy(y_va)[q_ids][:, None] == torch.from_numpy(y_va)[g_ids][None, :]
    same &= q_ids[:, None] != g_ids[None, :]
    gt = [torch.nonzero(r).view(-1) for r in same]
    rr = RetrievalResults(distances=list(dist), retrieved_ids=list(ii), gt_ids=gt)
    before = metrics(rr)

    # The pairwise model: ConcatSiamese over a copy of the extractor.
    backbone, _ = load_extractor(args.extractor)
    model = ConcatSiamese(backbone, mlp_hidden_dims=[args.mlp_hidden], use_tta=False)
    opt = torch.optim.Adam(
        [
            {"params": model.extractor.parameters(), "lr": args.lr_backbone},
            {"params": model.head.parameters(), "lr": args.lr},
        ]
    )
    sampler = BalanceSampler(y_tr.tolist(), n_labels=args.n_labels, n_instances=args.n_instances)
    miner = PairsMiner(hard_mining=True)
    crit = nn.BCEWithLogitsLoss()
    steps = args.epochs * len(sampler)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0)
    t1 = time.time()
    step = 0
    for _ in range(args.epochs):
        model.train()
        for batch in sampler:
            batch = torch.tensor(batch)
            i1, i2, is_neg = miner.sample(e_tr[batch], y_tr[batch.numpy()].tolist())
            x = norm(x_tr[batch])
            loss = crit(model(x[i1], x[i2]), is_neg.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    t_train = time.time() - t1

    model.eval()
    reranker = PairwiseReranker(top_n=args.top_n, pairwise_model=model, num_workers=0, batch_size=256)
    t2 = time.time()
    rr2 = reranker.process(rr, Images(x_va, norm, q_ids, g_ids))
    t_rerank = time.time() - t2
    after = metrics(rr2)
    print(
        json.dumps(
            {
                "side": "oml",
                "oml_version": getattr(__import__("oml"), "__version__", "?"),
                "torch_threads": torch.get_num_threads(),
                "steps": step,
                "extractor": before,
                "reranked": after,
                "seconds": {"prepare": t_prep, "train": t_train, "rerank": t_rerank},
            }
        )
    )


if __name__ == "__main__":
    main()
