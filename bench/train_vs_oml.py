"""Trains simile's recipe on Font-ID with OML 4.0's own components, for bench/train_vs_oml.sh.

OML's sampler (BalanceSampler), miners (AllTripletsMiner / HardTripletsMiner), losses
(TripletLossWithMiner / ArcFaceLoss) and metrics (RetrievalResults + calc_retrieval_metrics_rr)
drive a plain PyTorch loop (OML's Lightning pipeline adds logging around the same calls).
The network (src/model/arch.rs):
- `resnet18`: OML's own ResnetExtractor(weights=None, arch="resnet18", remove_fc=True) (torchvision's
  resnet18), GEM pooling when simile's pool is gem, simile's `dim` projection as its `fc`, L2
  normalisation by the detached norm (`normalise_features`);
- `smallcnn`: a PyTorch copy of simile's: 4 blocks of conv3x3 (no bias) + BatchNorm + ReLU, 2x2
  max-pooling between them, average pooling, the projection, the same normalisation.
The network starts as OML ships it: PyTorch's / torchvision's own initialisation (`--init torch`,
the default; simile's layers are initialised the same way since issue 14). `--init tch` draws it
instead from tch's defaults, which simile used before: conv and linear weights
U(+-sqrt(6 / fan_in)), linear biases U(+-1 / sqrt(fan_in)), BatchNorm weights U(0, 1), biases 0.
With `valid_at_start = true` in the simile config both sides are also validated before training.
The images are decoded once into memory (as simile's image cache) and augmented per batch as
simile's `[augment]` does (random resized crop, contrast jitter), in the DataLoader's workers.

Throughput counts the training steps only, as simile's train_log does: from asking for the
batch (the wait for the loader included) to the end of the optimiser step and the loss read
back; validation, start-up and image decoding are outside it.

Prints one JSON line: the config, steps, images/s of the training steps, the load average
before and after, and the validation metrics (OVERALL/cmc/1, cmc/5, precision/5, map/5) after
the last epoch. Two helper modes for the shell script: `--simile-run DIR` prints the same line
for a finished simile-train run (from its train_log.parquet and val_metrics.parquet), and
`--summarise FILE` turns a file of such lines into per-seed and mean tables (Markdown);
`--simile-config C --profile N` prints the seconds of each phase of N steps on a random batch,
as SIMILE_TRAIN_PROFILE=1 does for simile.
"""

import argparse
import contextlib
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


def gem(x, p):
    """simile's (and OML's GEM) generalised mean over the spatial positions."""
    return x.clamp_min(1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class SmallCnn(nn.Module):
    def __init__(self, width: int, dim, pool: str, gem_p: float, normalise: bool):
        super().__init__()
        blocks, cin = [], 3
        for i in range(4):
            cout = width << i
            blocks.append(nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.proj = nn.Linear(cin, dim) if dim else nn.Identity()
        self.pool, self.gem_p, self.normalise = pool, gem_p, normalise

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = F.relu(b(x))
            if i < len(self.blocks) - 1:
                x = F.max_pool2d(x, 2)
        x = self.proj(gem(x, self.gem_p) if self.pool == "gem" else x.mean(dim=(2, 3)))
        return x / x.norm(dim=1, keepdim=True).detach().clamp_min(1e-12) if self.normalise else x


def resnet18(dim, pool: str, gem_p: float, normalise: bool):
    """OML's ResnetExtractor around torchvision's resnet18; simile's projection becomes its fc."""
    from oml.models.resnet.extractor import ResnetExtractor

    m = ResnetExtractor(None, "resnet18", gem_p if pool == "gem" else None, remove_fc=True, normalise_features=normalise)
    if dim:
        m.model.fc = nn.Linear(512, dim)
    return m


def tch_init(model):
    """tch's default initial weights' distributions (simile's layers before issue 14)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                b = math.sqrt(6.0 / fan_in)  # Kaiming uniform, ReLU gain
                m.weight.uniform_(-b, b)
                if m.bias is not None:
                    if isinstance(m, nn.Linear):
                        m.bias.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
                    else:
                        m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.0, 1.0)
                m.bias.zero_()


def load_images(paths, size):
    """uint8 [N, size, size], grey; resized bilinearly with antialiasing when size differs."""
    out = np.stack([np.asarray(Image.open(p).convert("L")) for p in paths])
    t = torch.from_numpy(out)
    if t.shape[-1] != size:
        t = F.interpolate(t[:, None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        t = t[:, 0].round().clamp(0, 255).to(torch.uint8)
    return t


class Augmented(Dataset):
    """Random resized crop (torchvision's sampling) + contrast jitter, normalised with mean, std."""

    def __init__(self, images, scale, ratio, contrast, mean, std):
        self.images, self.scale, self.ratio, self.contrast = images, scale, ratio, contrast
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

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
        return (img.expand(3, s, s) / 255.0 - self.mean) / self.std, i


def evaluate(model, images, df_val, root, bs, mean, std):
    model.eval()
    embs = []
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        for i in range(0, len(images), bs):
            x = images[i : i + bs].float()[:, None].expand(-1, 3, -1, -1)
            embs.append(model((x / 255.0 - mean) / std))
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
    if (
        m.get("arch") not in ("smallcnn", "resnet18")
        or smp.get("name") != "balance"
        or opt.get("name") not in ("adam", "adamw")
        or sch.get("name") not in ("cosine", "constant")
    ):
        raise SystemExit("train_vs_oml.py mirrors smallcnn / resnet18 + balance sampler + adam / adamw + cosine / constant only")
    # Font-ID's glyphs are square at the model's size: pad and stretch are the same (no resize).
    if m.get("resize", "pad") not in ("pad", "stretch") or m.get("init") or m.get("pool", "avg") not in ("avg", "gem") or m.get("blocks", 4) != 4:
        raise SystemExit("train_vs_oml.py mirrors resize = pad / stretch, pool avg / gem, 4 smallcnn blocks, from scratch only")
    args.epochs, args.size, args.arch = c["epochs"], m["size"], m["arch"]
    args.width, args.dim = m.get("width", 32), m.get("dim")
    args.pool, args.gem_p, args.normalise = m.get("pool", "avg"), m.get("gem_p", 3.0), m.get("normalise", True)
    args.mean, args.std = m.get("mean", [0.485, 0.456, 0.406]), m.get("std", [0.229, 0.224, 0.225])
    args.n_labels, args.n_instances = smp["n_labels"], smp["n_instances"]
    args.lr, args.lr_loss = opt["lr"], opt.get("lr_loss")
    args.optimizer, args.weight_decay = opt["name"], opt.get("weight_decay", 0.01 if opt["name"] == "adamw" else 0.0)
    args.schedule = sch["name"]
    args.warmup_epochs, args.min_factor = sch.get("warmup_epochs", 0.0), sch.get("min_factor", 0.0)
    args.valid_at_start = c.get("valid_at_start", False)
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
    ap.add_argument("--csv")
    ap.add_argument("--arch", choices=["smallcnn", "resnet18"], default="smallcnn")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128, help="projection width (0: none)")
    ap.add_argument("--pool", choices=["avg", "gem"], default="avg")
    ap.add_argument("--gem-p", type=float, default=3.0)
    ap.add_argument("--no-normalise", dest="normalise", action="store_false")
    ap.add_argument("--mean", type=float, nargs=3, default=[0.5, 0.5, 0.5])
    ap.add_argument("--std", type=float, nargs=3, default=[0.5, 0.5, 0.5])
    ap.add_argument("--init", choices=["torch", "tch"], default="torch")
    ap.add_argument("--optimizer", choices=["adam", "adamw"], default="adam")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    ap.add_argument("--valid-at-start", action="store_true")
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
    ap.add_argument("--fused", action="store_true", help="torch.optim's fused=True optimiser (one kernel per step)")
    ap.add_argument(
        "--autocast",
        choices=["none", "bf16"],
        default="none",
        help="bf16: forward and loss under torch.autocast('cpu', torch.bfloat16), as Lightning's precision='bf16-mixed'",
    )
    ap.add_argument("--max-steps", type=int, default=0, help="stop after N steps (throughput only; 0: every epoch)")
    ap.add_argument("--skip-first-step", action="store_true", help="leave the first step (warm-up) out of images/s")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--simile-config", help="a resolved simile config.toml whose values replace the defaults above")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="copied into the JSON line")
    ap.add_argument("--simile-run", metavar="DIR", help="print the JSON line of a finished simile-train run")
    ap.add_argument("--load-before", help="the load average before that run")
    ap.add_argument("--summarise", metavar="FILE", help="tables of a file of JSON lines")
    ap.add_argument("--profile", type=int, metavar="N", help="time the phases of N steps on random input (triplet loss)")
    args = ap.parse_args()
    tags = dict(t.split("=", 1) for t in args.tag)
    if args.summarise:
        return summarise(args.summarise)
    if args.simile_run:
        return simile_run(args.simile_run, args.load_before, tags, args.skip_first_step)
    if args.simile_config:
        from_simile_config(args)
    if args.profile:
        return profile(args)
    if not args.csv:
        ap.error("--csv is required")

    load_before = loadavg()
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
    data = Augmented(img_tr, tuple(args.crop_scale), tuple(args.crop_ratio), args.contrast, args.mean, args.std)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=args.workers, persistent_workers=args.workers > 0)

    model = build_model(args)
    emb_dim = args.dim or (512 if args.arch == "resnet18" else 8 * args.width)
    if args.loss == "triplet":
        miner = AllTripletsMiner() if args.miner == "all" else HardTripletsMiner()
        crit = TripletLossWithMiner(margin=args.margin, miner=miner, need_logs=True)
    else:
        crit = ArcFaceLoss(emb_dim, int(labels.max()) + 1, m=args.arcface_m, s=args.arcface_s)
    groups = [{"params": model.parameters(), "lr": args.lr}]
    if any(True for _ in crit.parameters()):
        groups.append({"params": crit.parameters(), "lr": args.lr_loss or args.lr})
    # OML's pipeline: every parameter of the extractor (and the loss) decayed alike.
    make = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    opt = make(groups, weight_decay=args.weight_decay, **({"fused": True} if args.fused else {}))
    base = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = len(sampler)
    total = args.epochs * steps_per_epoch
    warm = round(args.warmup_epochs * steps_per_epoch)

    def factor(step):  # simile's schedules with linear warm-up (src/train/optim.rs)
        w = (step + 1) / warm if warm > 0 and step < warm else 1.0
        if step < warm or total <= warm or args.schedule == "constant":
            return w
        t = (step - warm) / (total - warm)
        return w * (args.min_factor + (1 - args.min_factor) * 0.5 * (1 + math.cos(math.pi * t)))

    # Throughput-only runs (--max-steps) skip validation on both ends.
    untrained = (
        evaluate(model, img_val, df_val, root, 512, args.mean, args.std)
        if args.valid_at_start and not args.max_steps
        else None
    )
    step, n_img, train_s, losses = 0, 0, 0.0, []
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast == "bf16" else contextlib.nullcontext()
    for _ in range(args.epochs):
        if args.max_steps and step >= args.max_steps:
            break
        it = iter(loader)
        while not (args.max_steps and step >= args.max_steps):
            ts = time.time()
            try:
                x, idx = next(it)
            except StopIteration:
                break
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * factor(step)
            with amp:
                loss = crit(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if not (args.skip_first_step and step == 0):
                train_s += time.time() - ts
                n_img += len(idx)
            step += 1
    load_after = loadavg()
    metrics = None if args.max_steps else evaluate(model, img_val, df_val, root, 512, args.mean, args.std)
    print(
        json.dumps(
            {
                "framework": f"oml-4.0.0 torch-{torch.__version__.split('+')[0]}",
                **tags,
                "args": vars(args),
                "steps": step,
                "images": n_img,
                "train_seconds": round(train_s, 2),
                "images_per_s": round(n_img / train_s, 1),
                "load_seconds": round(load_s, 2),
                "load_before": load_before,
                "load_after": load_after,
                "last_loss": float(np.mean(losses[-steps_per_epoch:])),
                "metrics": metrics,
                "metrics_untrained": untrained,
            }
        )
    )


def build_model(args):
    """The network the simile config names, initialised as --init says."""
    if args.arch == "resnet18":
        model = resnet18(args.dim, args.pool, args.gem_p, args.normalise)
    else:
        model = SmallCnn(args.width, args.dim, args.pool, args.gem_p, args.normalise)
    if args.init == "tch":
        tch_init(model)
    return model


def profile(args):
    """Seconds of forward, loss, backward and optimiser per step, as SIMILE_TRAIN_PROFILE=1 prints
    them for simile: one random batch, no loader; then the loss's forward and backward alone."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = build_model(args)
    miner = AllTripletsMiner() if args.miner == "all" else HardTripletsMiner()
    crit = TripletLossWithMiner(margin=args.margin, miner=miner, need_logs=True)
    opt = torch.optim.Adam(model.parameters(), args.lr)
    x = torch.randn(args.n_labels * args.n_instances, 3, args.size, args.size)
    y = torch.arange(args.n_labels).repeat_interleave(args.n_instances)
    for step in range(args.profile):
        t0 = time.time()
        e = model(x)
        t1 = time.time()
        loss = crit(e, y)
        t2 = time.time()
        opt.zero_grad()
        loss.backward()
        t3 = time.time()
        opt.step()
        loss.item()
        t4 = time.time()
        ed = e.detach().requires_grad_()
        crit(ed, y).backward()
        t5 = time.time()
        print(
            f"step {step}: forward {t1 - t0:.3f} loss {t2 - t1:.3f} backward {t3 - t2:.3f} optim {t4 - t3:.3f} "
            f"total {t4 - t0:.3f}; the loss's forward + backward alone {t5 - t4:.3f}",
            flush=True,
        )


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


KEYS = ["OVERALL/cmc/1", "OVERALL/cmc/5", "OVERALL/precision/5", "OVERALL/map/5"]


def simile_run(out, load_before, tags, skip_first=False, unit="images"):
    """The JSON line of a finished (or stopped) simile-train run: images/s over its logged
    training steps (but the first, with skip_first). unit="texts" (bench/train_text_vs_oml.py)
    names its keys texts and texts_per_s, read from the log's texts_per_s column where it has
    one, else from its images_per_s."""
    import pyarrow.parquet as pq

    log = pq.read_table(f"{out}/train_log.parquet").to_pydict()
    # A run stopped after some steps (throughput only) has no final validation.
    val = pq.read_table(f"{out}/val_metrics.parquet").to_pydict() if os.path.exists(f"{out}/val_metrics.parquet") else None
    if val is not None and len(val["step"]) < 2:
        val = None
    util = {}
    if os.path.exists(f"{out}/model.safetensors.manifest.json"):
        with open(f"{out}/model.safetensors.manifest.json") as f:
            util = json.load(f).get("notes", {}).get("utilisation", {})
    with open(f"{out}/config.toml", "rb") as f:
        import tomllib

        bs = tomllib.load(f)["sampler"]
    bs = bs["n_labels"] * bs["n_instances"]
    # Each row's images_per_s is batch / (that step's seconds, batch wait to optimiser step).
    col = log[f"{unit}_per_s"] if f"{unit}_per_s" in log else log["images_per_s"]
    per_step = col[1:] if skip_first else col
    secs = sum(bs / x for x in per_step if x)
    n = len(per_step)
    print(
        json.dumps(
            {
                "framework": "simile",
                **tags,
                "steps": n,
                unit: n * bs,
                "train_seconds": round(secs, 2),
                f"{unit}_per_s": round(n * bs / secs, 1),
                "load_before": load_before,
                "load_after": loadavg(),
                "metrics": {k: val[k][-1] for k in KEYS} if val else None,
                "metrics_untrained": {k: val[k][0] for k in KEYS} if val and val["step"][0] == 0 else None,
                # A stopped run has no manifest: the shell script passes them as tags.
                "flops_per_image": util.get("flops_per_image") or tags.get("flops_per_image"),
                "peak_gflop_s": util.get("peak_gflop_s") or tags.get("peak_gflop_s"),
            }
        )
    )


def summarise(path, unit="images", against="fastest"):
    """Per-seed rows and means per framework (and compute, and variant), Markdown; ratios
    against OML's fastest variant (against="plain": its run without compute or variant tags;
    unit="texts": of texts/s, the lines' texts_per_s). GFLOP/s and the share of the peak where
    the line carries flops_per_image and peak_gflop_s (simile's manifest; the OML lines get
    simile's counts for the same network from bench/train_speed.sh)."""
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    name = lambda r: r["framework"] + "".join(f" {r[k]}" for k in ("compute", "variant") if r.get(k))
    u = lambda r: f"{r['metrics_untrained']['OVERALL/cmc/1']:.4f}" if r.get("metrics_untrained") else "-"
    cmc = lambda r: r["metrics"]["OVERALL/cmc/1"] if r.get("metrics") else None
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    gflops = lambda r: float(r["flops_per_image"]) * r[f"{unit}_per_s"] / 1e9 if r.get("flops_per_image") else None
    share = lambda r: gflops(r) / float(r["peak_gflop_s"]) if gflops(r) and r.get("peak_gflop_s") else None
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    print(f"| run | seed | steps | train s | {unit}/s | GFLOP/s | of peak | CMC@1 untrained | CMC@1 | MAP@5 | load before / after (1, 5, 15 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r.get("metrics") or {}
        g = gflops(r)
        print(
            f"| {name(r)} | {r.get('seed', '')} | {r['steps']} | {r['train_seconds']:.1f} | {r[f'{unit}_per_s']:.1f} "
            f"| {'-' if g is None else f'{g:.1f}'} | {pct(share(r))} "
            f"| {u(r)} | {fmt(m.get('OVERALL/cmc/1'))} | {fmt(m.get('OVERALL/map/5'))} | {r.get('load_before', '')} / {r.get('load_after', '')} |"
        )
    means = {}
    for r in rows:
        means.setdefault(name(r), []).append(r)
    print()
    vs = "OML's fastest" if against == "fastest" else "OML"
    print(f"| run | seeds | {unit}/s (mean) | of peak | CMC@1 untrained (mean) | CMC@1 (mean) | CMC@1 sd | CMC@1 min-max | MAP@5 (mean) | {unit}/s vs {vs} | CMC@1 vs it (standard error, Welch) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def sd(xs):
        # The sample standard deviation (n - 1): seeds are a sample of the runs one could get.
        if len(xs) < 2:
            return None
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    mean = lambda v, f: (lambda xs: sum(xs) / len(xs) if xs else None)([f(r) for r in v if f(r) is not None])
    ips = lambda r: r[f"{unit}_per_s"]
    omls = {k: v for k, v in means.items() if k.startswith("oml")}
    if against == "plain":
        ref = next((v for k, v in omls.items() if k == v[0]["framework"]), None)
    else:
        ref = max(omls.values(), key=lambda v: mean(v, ips)) if omls else None
    for k, v in means.items():
        ratio = f"{mean(v, ips) / mean(ref, ips):.2f}x" if ref else ""
        c, rc = mean(v, cmc), mean(ref, cmc) if ref else None
        cs = [cmc(r) for r in v if cmc(r) is not None]
        rcs = [cmc(r) for r in ref if cmc(r) is not None] if ref else []
        diff = f"{c - rc:+.4f}" if c is not None and rc is not None else ""
        if diff and v is not ref and sd(cs) is not None and sd(rcs) is not None:
            diff += f" ({math.sqrt(sd(cs) ** 2 / len(cs) + sd(rcs) ** 2 / len(rcs)):.4f})"
        un = [r["metrics_untrained"]["OVERALL/cmc/1"] for r in v if r.get("metrics_untrained")]
        un = f"{sum(un) / len(un):.4f}" if un else "-"
        spread = f"{min(cs):.4f}-{max(cs):.4f}" if cs else "-"
        m5 = mean(v, lambda r: r["metrics"]["OVERALL/map/5"] if r.get("metrics") else None)
        print(
            f"| {k} | {len(v)} | {mean(v, ips):.1f} | {pct(mean(v, share))} | {un} | {fmt(c)} | {fmt(sd(cs))} | {spread} "
            f"| {fmt(m5)} | {ratio} | {diff} |"
        )


if __name__ == "__main__":
    main()
