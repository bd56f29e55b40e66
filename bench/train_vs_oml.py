"""Trains simile's small CNN on Font-ID with OML 4.0's own components, for bench/train_vs_oml.sh.

OML's sampler (BalanceSampler), miners (AllTripletsMiner / HardTripletsMiner), losses
(TripletLossWithMiner / ArcFaceLoss) and metrics (RetrievalResults + calc_retrieval_metrics_rr)
drive a plain PyTorch loop (OML's Lightning pipeline adds logging around the same calls). The
network is a PyTorch copy of simile's `smallcnn` (src/model/arch.rs): 4 blocks of conv3x3 (no
bias) + BatchNorm + ReLU, 2x2 max-pooling between them, average pooling, a linear projection,
L2 normalisation by the detached norm (OML's `normalise_features`). The images are decoded once
into memory (as simile's image cache) and augmented per batch as simile's `[augment]` does
(random resized crop, contrast jitter), in the DataLoader's workers.

Prints one JSON line: the config, steps, images/s of the training steps, and the validation
metrics (OVERALL/cmc/1, cmc/5, precision/5, map/5) after the last epoch.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from oml.datasets.images import ImageQueryGalleryLabeledDataset
from oml.losses.arcface import ArcFaceLoss
from oml.losses.triplet import TripletLossWithMiner
from oml.metrics import calc_retrieval_metrics_rr
from oml.miners.inbatch_all_tri import AllTripletsMiner
from oml.miners.inbatch_hard_tri import HardTripletsMiner
from oml.retrieval.retrieval_results import RetrievalResults
from oml.samplers.balance import BalanceSampler


class SmallCnn(nn.Module):
    def __init__(self, width: int, dim: int):
        super().__init__()
        blocks, cin = [], 3
        for i in range(4):
            cout = width << i
            blocks.append(nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.proj = nn.Linear(cin, dim)

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = F.relu(b(x))
            if i < len(self.blocks) - 1:
                x = F.max_pool2d(x, 2)
        x = self.proj(x.mean(dim=(2, 3)))
        return x / x.norm(dim=1, keepdim=True).detach().clamp_min(1e-12)


def load_images(paths, size):
    """uint8 [N, size, size], grey; resized bilinearly with antialiasing when size differs."""
    out = np.stack([np.asarray(Image.open(p).convert("L")) for p in paths])
    t = torch.from_numpy(out)
    if t.shape[-1] != size:
        t = F.interpolate(t[:, None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        t = t[:, 0].round().clamp(0, 255).to(torch.uint8)
    return t


class Augmented(Dataset):
    """Random resized crop (torchvision's sampling) + contrast jitter, normalised with mean = std = 0.5."""

    def __init__(self, images, scale, ratio, contrast):
        self.images, self.scale, self.ratio, self.contrast = images, scale, ratio, contrast

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from torchvision.transforms import v2

        img = self.images[i][None].float()  # [1, S, S]
        s = img.shape[-1]
        top, left, h, w = v2.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        img = F.interpolate(img[None, :, top : top + h, left : left + w], size=(s, s), mode="bilinear", align_corners=False)[0]
        if self.contrast > 0:
            c = 1 - self.contrast + 2 * self.contrast * torch.rand(()).item()
            img = (img.mean() + (img - img.mean()) * c).clamp(0, 255)
        x = (img / 255.0 - 0.5) / 0.5
        return x.expand(3, s, s), i


def evaluate(model, images, df_val, root, bs):
    model.eval()
    embs = []
    with torch.no_grad():
        for i in range(0, len(images), bs):
            x = (images[i : i + bs].float()[:, None] / 255.0 - 0.5) / 0.5
            embs.append(model(x.expand(-1, 3, -1, -1)))
    model.train()
    ds = ImageQueryGalleryLabeledDataset(df_val.reset_index(drop=True), dataset_root=root)
    rr = RetrievalResults.from_embeddings(torch.cat(embs), ds, n_items=10)
    m = calc_retrieval_metrics_rr(rr, cmc_top_k=(1, 5), precision_top_k=(5,), map_top_k=(5,), verbose=False)
    return {f"OVERALL/{k}/{kk}": float(v) for k, d in m.items() for kk, v in d.items()}


def from_simile_config(args):
    """The keys of a simile config that this loop mirrors (the resolved config.toml of a run)."""
    import tomllib

    with open(args.simile_config, "rb") as f:
        c = tomllib.load(f)
    m, smp, loss, opt, sch, aug = (c.get(k, {}) for k in ("model", "sampler", "loss", "optimizer", "schedule", "augment"))
    if m.get("arch") != "smallcnn" or smp.get("name") != "balance" or opt.get("name") != "adam" or sch.get("name") != "cosine":
        raise SystemExit("train_vs_oml.py mirrors smallcnn + balance sampler + adam + cosine only")
    args.epochs, args.size = c["epochs"], m["size"]
    args.width, args.dim = m.get("width", 32), m["dim"]
    args.n_labels, args.n_instances = smp["n_labels"], smp["n_instances"]
    args.lr, args.lr_loss = opt["lr"], opt.get("lr_loss")
    args.warmup_epochs, args.min_factor = sch.get("warmup_epochs", 0.0), sch.get("min_factor", 0.0)
    args.crop_scale, args.crop_ratio = aug.get("crop_scale", [1, 1]), aug.get("crop_ratio", [0.75, 4 / 3])
    args.contrast = aug.get("contrast", 0.0)
    args.loss = loss["name"]
    if args.loss == "triplet":
        args.margin = loss["margin"]
        args.miner = {"all_triplets": "all", "hard_triplets": "hard"}[loss.get("miner", {}).get("name", "all_triplets")]
    elif args.loss == "arcface":
        args.arcface_m, args.arcface_s = loss.get("m", 0.5), loss.get("s", 64.0)
    else:
        raise SystemExit(f"train_vs_oml.py: loss {args.loss} not mirrored")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--n-labels", type=int, default=16)
    ap.add_argument("--n-instances", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--loss", choices=["triplet", "arcface"], default="triplet")
    ap.add_argument("--miner", choices=["all", "hard"], default="all")
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--arcface-m", type=float, default=0.5)
    ap.add_argument("--arcface-s", type=float, default=64.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-loss", type=float, default=None)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--min-factor", type=float, default=0.05)
    ap.add_argument("--crop-scale", type=float, nargs=2, default=[0.7, 1.0])
    ap.add_argument("--crop-ratio", type=float, nargs=2, default=[0.8, 1.25])
    ap.add_argument("--contrast", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--simile-config", help="a resolved simile config.toml whose values replace the defaults above")
    args = ap.parse_args()
    if args.simile_config:
        from_simile_config(args)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    root = os.path.dirname(os.path.abspath(args.csv))
    df = pd.read_csv(args.csv)
    df_tr = df[df["split"] == "train"].reset_index(drop=True)
    df_val = df[df["split"] == "validation"].reset_index(drop=True)
    t0 = time.time()
    img_tr = load_images([os.path.join(root, p) for p in df_tr["path"]], args.size)
    img_val = load_images([os.path.join(root, p) for p in df_val["path"]], args.size)
    load_s = time.time() - t0

    # Labels remapped to 0..C-1 (ArcFace needs it; the sampler does not mind).
    labels = torch.tensor(pd.factorize(df_tr["label"], sort=True)[0])
    sampler = BalanceSampler(labels.tolist(), n_labels=args.n_labels, n_instances=args.n_instances)
    data = Augmented(img_tr, tuple(args.crop_scale), tuple(args.crop_ratio), args.contrast)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=args.workers, persistent_workers=args.workers > 0)

    model = SmallCnn(args.width, args.dim)
    if args.loss == "triplet":
        miner = AllTripletsMiner() if args.miner == "all" else HardTripletsMiner()
        crit = TripletLossWithMiner(margin=args.margin, miner=miner, need_logs=True)
    else:
        crit = ArcFaceLoss(args.dim, int(labels.max()) + 1, m=args.arcface_m, s=args.arcface_s)
    groups = [{"params": model.parameters(), "lr": args.lr}]
    if any(True for _ in crit.parameters()):
        groups.append({"params": crit.parameters(), "lr": args.lr_loss or args.lr})
    opt = torch.optim.Adam(groups)
    base = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = len(sampler)
    total = args.epochs * steps_per_epoch
    warm = round(args.warmup_epochs * steps_per_epoch)

    def factor(step):  # simile's cosine schedule with linear warm-up (src/train/optim.rs)
        w = (step + 1) / warm if warm > 0 and step < warm else 1.0
        if step < warm or total <= warm:
            return w
        t = (step - warm) / (total - warm)
        return w * (args.min_factor + (1 - args.min_factor) * 0.5 * (1 + math.cos(math.pi * t)))

    step, n_img, train_s, losses = 0, 0, 0.0, []
    for _ in range(args.epochs):
        it = iter(loader)
        while True:
            ts = time.time()
            try:
                x, idx = next(it)
            except StopIteration:
                break
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * factor(step)
            loss = crit(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            train_s += time.time() - ts
            n_img += len(idx)
            step += 1
    metrics = evaluate(model, img_val, df_val, root, 512)
    print(
        json.dumps(
            {
                "framework": "oml-4.0.0",
                "args": vars(args),
                "steps": step,
                "images": n_img,
                "train_seconds": round(train_s, 2),
                "images_per_s": round(n_img / train_s, 1),
                "load_seconds": round(load_s, 2),
                "last_loss": float(np.mean(losses[-steps_per_epoch:])),
                "metrics": metrics,
            }
        )
    )


if __name__ == "__main__":
    main()
