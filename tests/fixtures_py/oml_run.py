"""A whole training run of OML 4.0's recipe on simile's batches: the reference for
tests/it/train_run_parity.rs and bench/train_run_vs_oml.sh (issue 24, item 1).

Modes:

  python oml_run.py gen OUT [--train-labels 300] [--val-labels 100] [--samples 20] [--seed 0]
      A glyph-like grey set in OUT: `img/<label>/<k>.png`, 64 x 64 grey PNGs of one character
      per label (codepoints that every DejaVu face in /usr/share/fonts/truetype/dejavu covers,
      visually distinct in DejaVu Sans, enough ink), each sample in a random face of those
      (Sans, Serif, Mono, condensed, bold, oblique: 20 faces), size, rotation, shift, ink and
      paper levels and pixel noise, all from one seeded generator; `df.csv` in OML's format
      (train rows first, then validation rows: every one a query and a gallery item, 1 vs rest);
      `init.pth`: OML's `ResnetExtractor(weights=None, arch="resnet18", gem_p=None,
      remove_fc=True, normalise_features=True)` as oml_step.py builds it (torchvision's own
      initialisation after torch.manual_seed(seed)), keys prefixed `model.` as OML saves them.

  python oml_run.py train OUT --trace TRACE --steps N --dest DIR [--threads 2] [--fused]
                       [--deterministic] [--from-simile CKPT --start S] [--no-val]
      OML's recipe on exactly the batches simile-train logged with SIMILE_TRAIN_TRACE=TRACE
      (its lines in step order are steps 0, 1, ...; `rows` are dataset.parquet rows = df.csv
      data rows, in the order the network saw them): the extractor from init.pth in train mode,
      TripletLossWithMiner(margin 0.2, HardTripletsMiner(), need_logs=True) on the batch's
      labels, zero_grad, backward, AdamW(lr 1e-3, weight decay 0.01) over the extractor's
      parameters (as OML's pipeline: every parameter decayed; `--fused`: torch's fused=True
      kernel, the one simile calls), images read as OML's transforms read them (PIL,
      convert("RGB"), ToTensor, Normalize(ImageNet mean and std)). `--deterministic`:
      torch.use_deterministic_algorithms(True) (OML as shipped is not deterministic with 2
      threads: see setup()). Writes into DIR:
      - `steps.jsonl`: per step `step` (0-based), `loss`, `active_tri` (OML's log: the share of
        the B hard triplets whose loss is > 0, which is what simile's `active_tri` is too:
        src/train/loss/triplet.rs), `n_active` (that share times B), `pos_dist`, `neg_dist`,
        `grad_norm` (as simile logs it: see grad_norms()), `grad_norm_f64`, `seconds`;
      - `final.safetensors`: every parameter and BatchNorm statistic after the last step
        (torchvision names, no num_batches_tracked), `optimizer.safetensors` (`m.<name>`,
        `v.<name>`: AdamW's moments, simile's checkpoint names);
      - unless --no-val: `val_emb.npy` (float32 [V, 512], the validation rows in df.csv order,
        eval mode) and `val.json` (OML's CMC@1 and @5, P@5, MAP@5: calc_retrieval_metrics_rr on
        RetrievalResults.from_embeddings, as bench/train_vs_oml.py validates).
      `--from-simile CKPT --start S`: start instead from a simile checkpoint folder written after
      S steps and train trace lines S .. S+N-1.

  python oml_run.py forced OUT --trace TRACE --ckpts DIR --at K1,K2,... --dest DIR [--threads 2]
      For each k: OML's step k from simile's exact state after k steps (CKPTS/<k>: a copy of
      simile's checkpoints/last after k steps: model.safetensors, optimizer.safetensors moments,
      state.json step counts; k = 0: init.pth and a fresh optimiser), on trace line k. Writes
      DEST/<k>/final.safetensors, optimizer.safetensors, grads.safetensors and step.json (loss,
      logs, gradient norms), to compare with simile's CKPTS/<k+1> and its train_log row k + 1:
      the error one step makes, free of the error a run has accumulated.

  python oml_run.py evaluate OUT --weights FILE --dest DIR
      OML's validation of given weights (simile's model.safetensors): `val_emb.npy`, `val.json`.
  python oml_run.py evaluate OUT --init-seeds 0,1,... --dest DIR
      OML's validation of its own untrained extractor (init_model) for each seed: one line of
      metrics a seed in DIR/untrained.jsonl (bench/init_vs_oml.sh).

  python oml_run.py floor OUT --trace TRACE --steps N --dest DIR [--a DIR] [--deterministic]
      The non-determinism floor: `train` again with the same threads (DIR/b; it validates), and
      with 1 thread (DIR/t1), against run a (--a: an existing `train` run with these options,
      else DIR/a made here); prints and writes DIR/floor.json: per step |loss difference|,
      relative grad-norm difference and n_active difference, and the final weights' relative
      difference per tensor (max |a - b| / max |b|), for a-b and for 1 thread against 2.

  python oml_run.py compare --simile RUN --oml DIR [--floor ...] [--forced ...] [--json OUT]
      The tables bench/train_run_vs_oml.sh prints (see its header): the free runs step by step
      with the floor, the final weights, BatchNorm buffers, validation embeddings and CMC@1;
      the forced steps against simile's checkpoints and their own floor; the validation path.
"""
import argparse
import glob
import json
import math
import os
import sys
import time

import numpy as np

# OpenMP threads that wait passively (simile-train's setting): the same numbers, but on a shared
# machine spinning threads slow a run several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
FONTS = "/usr/share/fonts/truetype/dejavu"
SIZE = 64


# ------------------------------------------------------------------------------------------
# gen


def faces():
    """The DejaVu faces with the big common coverage (not ExtraLight, not the TeX math face)."""
    fs = sorted(glob.glob(os.path.join(FONTS, "DejaVu*.ttf")))
    fs = [f for f in fs if "ExtraLight" not in f and "MathTeX" not in f]
    if len(fs) < 4:
        raise SystemExit(f"oml_run.py gen: DejaVu fonts not found in {FONTS} (Debian: fonts-dejavu-core, fonts-dejavu-extra)")
    return fs


def candidates(fs):
    """Codepoints every face covers, visible (letters, digits, punctuation, symbols), with
    enough ink and a DejaVu Sans rendering unlike every other's (no Latin A = Greek Alpha)."""
    import unicodedata

    from fontTools.ttLib import TTFont
    from PIL import Image, ImageDraw, ImageFont

    common = None
    for f in fs:
        cmap = set(TTFont(f, lazy=True).getBestCmap().keys())
        common = cmap if common is None else common & cmap
    font = ImageFont.truetype(os.path.join(FONTS, "DejaVuSans.ttf"), 40)
    seen, out = set(), []
    for c in sorted(common):
        ch = chr(c)
        if c <= 32 or unicodedata.category(ch)[0] not in "LNPS":
            continue
        img = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(img).text((SIZE / 2, SIZE / 2), ch, fill=255, font=font, anchor="mm")
        a = np.asarray(img)
        if (a > 127).sum() < 60:
            continue
        key = (a > 127).tobytes()
        if key in seen:
            continue
        seen.add(key)
        out.append(c)
    return out


def render(ch, face, rng):
    from PIL import Image, ImageDraw, ImageFont

    big = 2 * SIZE
    font = ImageFont.truetype(face, int(rng.integers(30, 45)))
    ink, paper = int(rng.integers(0, 60)), int(rng.integers(200, 256))
    img = Image.new("L", (big, big), paper)
    ImageDraw.Draw(img).text((big / 2, big / 2), ch, fill=ink, font=font, anchor="mm")
    img = img.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR, fillcolor=paper)
    dx, dy = (int(v) for v in rng.integers(-4, 5, size=2))
    left, top = (big - SIZE) // 2 + dx, (big - SIZE) // 2 + dy
    a = np.asarray(img.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float32)
    a = a + rng.normal(0, rng.uniform(2, 10), a.shape)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def init_model(seed):
    from oml.models import ResnetExtractor

    torch.manual_seed(seed)
    return ResnetExtractor(weights=None, arch="resnet18", gem_p=None, remove_fc=True, normalise_features=True)


def gen(a):
    fs = faces()
    cands = candidates(fs)
    n = a.train_labels + a.val_labels
    if n > len(cands):
        raise SystemExit(f"oml_run.py gen: {n} labels asked, {len(cands)} distinct glyphs available")
    rng = np.random.default_rng(a.seed)
    chosen = [cands[i] for i in rng.permutation(len(cands))[:n]]
    os.makedirs(a.out, exist_ok=True)
    lines = []
    for li, c in enumerate(chosen):
        split = "train" if li < a.train_labels else "validation"
        os.makedirs(os.path.join(a.out, "img", str(li)), exist_ok=True)
        for k in range(a.samples):
            name = f"img/{li}/{k}.png"
            render(chr(c), fs[int(rng.integers(len(fs)))], rng).save(os.path.join(a.out, name))
            flags = ",," if split == "train" else ",True,True"
            lines.append(f"{li},{name},{split}{flags}")
    with open(os.path.join(a.out, "df.csv"), "w") as f:
        f.write("label,path,split,is_query,is_gallery\n" + "\n".join(lines) + "\n")
    with open(os.path.join(a.out, "glyphs.json"), "w") as f:
        json.dump({"codepoints": chosen, "faces": [os.path.basename(p) for p in fs], "seed": a.seed}, f)
    torch.save(init_model(a.seed).state_dict(), os.path.join(a.out, "init.pth"))
    print(f"{a.out}: {a.train_labels} train + {a.val_labels} validation labels x {a.samples}, {len(fs)} faces, {len(cands)} glyphs to draw from")


# ------------------------------------------------------------------------------------------
# train


def plain(sd):
    """torchvision names, without num_batches_tracked."""
    return {
        (k[len("model."):] if k.startswith("model.") else k): v.detach().clone().contiguous()
        for k, v in sd.items()
        if not k.endswith("num_batches_tracked")
    }


def read_csv(folder):
    import pandas as pd

    return pd.read_csv(os.path.join(folder, "df.csv"))


class Images:
    """OML's image path: PIL, convert("RGB"), ToTensor, Normalize; decoded once per row."""

    def __init__(self, folder, paths):
        from torchvision import transforms as T

        self.folder, self.paths, self.cache = folder, paths, {}
        self.tf = T.Compose([T.ToTensor(), T.Normalize(mean=MEAN, std=STD)])

    def __getitem__(self, row):
        from PIL import Image

        if row not in self.cache:
            with Image.open(os.path.join(self.folder, self.paths[row])) as im:
                self.cache[row] = self.tf(im.convert("RGB"))
        return self.cache[row]

    def batch(self, rows):
        return torch.stack([self[r] for r in rows])


def read_trace(path):
    """The trace's lines in step order; line i is the run's step i (0-based), whatever base the
    `step` field counts from (simile-train writes the count of steps done after the step, i.e.
    1-based)."""
    with open(path) as f:
        t = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["step"])
    if [r["step"] - t[0]["step"] for r in t] != list(range(len(t))) or t[0]["step"] not in (0, 1):
        raise SystemExit(f"{path}: the steps are not consecutive from 0 or 1 (two runs appended to one trace?)")
    return t


def load_simile_checkpoint(model, opt, ckpt):
    """simile's checkpoint (weights, BatchNorm statistics, AdamW moments and step counts) into
    OML's model and optimiser."""
    from safetensors.torch import load_file

    w = load_file(os.path.join(ckpt, "model.safetensors"))
    sd = model.state_dict()
    for k in sd:
        n = k[len("model."):]
        if n.endswith("num_batches_tracked"):
            continue
        sd[k] = w[n].to(sd[k].dtype)
    model.load_state_dict(sd)
    mom = load_file(os.path.join(ckpt, "optimizer.safetensors"))
    with open(os.path.join(ckpt, "state.json")) as f:
        steps = dict(json.load(f)["optimizer"]["steps"])
    for n, p in model.named_parameters():
        n = n[len("model."):]
        opt.state[p] = {
            "step": torch.tensor(float(steps[n])),
            "exp_avg": mom[f"m.{n}"].clone(),
            "exp_avg_sq": mom[f"v.{n}"].clone(),
        }


def embed(model, imgs, rows, bs=256):
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), bs):
            out.append(model(imgs.batch(rows[i : i + bs])))
    model.train()
    return torch.cat(out)


def cmc(folder, df_val, emb):
    from oml.datasets.images import ImageQueryGalleryLabeledDataset
    from oml.metrics import calc_retrieval_metrics_rr
    from oml.retrieval.retrieval_results import RetrievalResults

    ds = ImageQueryGalleryLabeledDataset(df_val.reset_index(drop=True), dataset_root=folder)
    rr = RetrievalResults.from_embeddings(emb, ds, n_items=10)
    m = calc_retrieval_metrics_rr(rr, cmc_top_k=(1, 5), precision_top_k=(5,), map_top_k=(5,), verbose=False)
    return {f"OVERALL/{k}/{kk}": float(v) for k, d in m.items() for kk, v in d.items()}


def grad_norms(model):
    """The global gradient norm as simile logs it (and torch.nn.utils.clip_grad_norm_ computes
    it): each tensor's float32 L2 norm, then the root of their squares' sum (in float64 here);
    and the same in float64 throughout. The two differ by ~5e-6 relative on resnet18: a float32
    norm of a 2.4M-element tensor is that far from the exact one."""
    gs = [p.grad for p in model.parameters() if p.grad is not None]
    gn = math.sqrt(sum(float(g.norm()) ** 2 for g in gs))
    gn64 = math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs))
    return gn, gn64


def record(step, loss, crit, bs, gn, gn64):
    lg = crit.last_logs
    return {
        "step": step,
        "loss": loss.item(),
        "active_tri": float(lg["active_tri"]),
        "n_active": round(float(lg["active_tri"]) * bs),
        "pos_dist": float(lg["pos_dist"]),
        "neg_dist": float(lg["neg_dist"]),
        "grad_norm": gn,
        "grad_norm_f64": gn64,
    }


def setup(a):
    """Threads, determinism, the data, the trace, OML's model (from init.pth), loss, optimiser."""
    from oml.losses.triplet import TripletLossWithMiner
    from oml.miners.inbatch_hard_tri import HardTripletsMiner
    from oml.models import ResnetExtractor

    torch.set_num_threads(a.threads)
    # OML as shipped is not deterministic with more than one thread: the backward pass of its
    # triplet gather (features[ids], 64 x 512 = 32,768 elements, torch's GRAIN_SIZE) is an
    # index_put_ with accumulate, which torch runs as parallel atomic float adds unless
    # deterministic algorithms are asked for. --deterministic asks (the same sums, a fixed order).
    torch.use_deterministic_algorithms(a.deterministic)
    torch.manual_seed(0)
    df = read_csv(a.out)
    imgs = Images(a.out, list(df["path"]))
    labels = list(df["label"])
    trace = read_trace(a.trace)
    model = ResnetExtractor(weights=None, arch="resnet18", gem_p=None, remove_fc=True, normalise_features=True)
    model.load_state_dict(torch.load(os.path.join(a.out, "init.pth")))
    model.train()
    crit = TripletLossWithMiner(margin=0.2, miner=HardTripletsMiner(), need_logs=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **({"fused": True} if a.fused else {}))
    return df, imgs, labels, trace, model, crit, opt


def save_state(model, opt, dest):
    from safetensors.torch import save_file

    save_file(plain(model.state_dict()), os.path.join(dest, "final.safetensors"))
    mom = {}
    for n, p in model.named_parameters():
        st = opt.state.get(p, {})
        if "exp_avg" in st:
            mom[f"m.{n[len('model.'):]}"] = st["exp_avg"].contiguous()
            mom[f"v.{n[len('model.'):]}"] = st["exp_avg_sq"].contiguous()
    save_file(mom, os.path.join(dest, "optimizer.safetensors"))


def train(a):
    df, imgs, labels, trace, model, crit, opt = setup(a)
    if len(trace) < a.start + a.steps:
        raise SystemExit(f"oml_run.py: the trace has {len(trace)} steps, {a.start + a.steps} needed")
    if a.from_simile:
        load_simile_checkpoint(model, opt, a.from_simile)
    os.makedirs(a.dest, exist_ok=True)
    log = open(os.path.join(a.dest, "steps.jsonl"), "w")
    for step in range(a.start, a.start + a.steps):
        t0 = time.time()
        rows = trace[step]["rows"]
        x = imgs.batch(rows)
        y = torch.tensor([labels[r] for r in rows])
        opt.zero_grad(set_to_none=True)
        loss = crit(model(x), y)
        loss.backward()
        gn, gn64 = grad_norms(model)
        opt.step()
        rec = record(step, loss, crit, len(rows), gn, gn64)
        rec["seconds"] = round(time.time() - t0, 3)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if a.verbose:
            print(json.dumps(rec), file=sys.stderr)
    log.close()
    save_state(model, opt, a.dest)
    if not a.no_val:
        val = df[df["split"] == "validation"]
        emb = embed(model, imgs, list(val.index))
        np.save(os.path.join(a.dest, "val_emb.npy"), emb.numpy().astype(np.float32))
        with open(os.path.join(a.dest, "val.json"), "w") as f:
            json.dump(cmc(a.out, val, emb), f)


def forced(a):
    """One OML step from simile's exact state after k steps, for each k of --at: the state from
    CKPTS/<k> (a copy of simile's checkpoints/last after k steps; k = 0: init.pth and a fresh
    optimiser), the batch of trace line k. Writes DEST/<k>/final.safetensors (weights and
    BatchNorm statistics after the step), optimizer.safetensors (AdamW's moments after it),
    grads.safetensors (the step's gradients) and step.json (loss, logs, gradient norms)."""
    from safetensors.torch import save_file

    df, imgs, labels, trace, model, crit, opt = setup(a)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for k in [int(v) for v in a.at.split(",")]:
        if k >= len(trace):
            raise SystemExit(f"oml_run.py forced: the trace has {len(trace)} steps, step {k} asked")
        model.load_state_dict(init)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **({"fused": True} if a.fused else {}))
        if k > 0:
            load_simile_checkpoint(model, opt, os.path.join(a.ckpts, str(k)))
        model.train()
        rows = trace[k]["rows"]
        x = imgs.batch(rows)
        y = torch.tensor([labels[r] for r in rows])
        opt.zero_grad(set_to_none=True)
        loss = crit(model(x), y)
        loss.backward()
        gn, gn64 = grad_norms(model)
        grads = {n[len("model."):]: p.grad.detach().clone().contiguous() for n, p in model.named_parameters()}
        opt.step()
        dest = os.path.join(a.dest, str(k))
        os.makedirs(dest, exist_ok=True)
        save_state(model, opt, dest)
        save_file(grads, os.path.join(dest, "grads.safetensors"))
        with open(os.path.join(dest, "step.json"), "w") as f:
            json.dump(record(k, loss, crit, len(rows), gn, gn64), f)


def evaluate(a):
    """OML's validation of given weights (simile's, to check simile's validation path): the
    validation rows embedded in eval mode by OML's extractor holding them, OML's metrics.
    `--init-seeds`: instead, OML's own untrained extractor of each seed (init_model)."""
    from safetensors.torch import load_file

    from oml.models import ResnetExtractor

    torch.set_num_threads(a.threads)
    df = read_csv(a.out)
    imgs = Images(a.out, list(df["path"]))
    val = df[df["split"] == "validation"]
    os.makedirs(a.dest, exist_ok=True)
    if a.init_seeds is not None:
        with open(os.path.join(a.dest, "untrained.jsonl"), "w") as f:
            for seed in [int(x) for x in a.init_seeds.split(",")]:
                m = cmc(a.out, val, embed(init_model(seed), imgs, list(val.index)))
                print(json.dumps({"seed": seed, **m}), file=f, flush=True)
        return
    model = ResnetExtractor(weights=None, arch="resnet18", gem_p=None, remove_fc=True, normalise_features=True)
    w = load_file(a.weights)
    sd = model.state_dict()
    for k in sd:
        if not k.endswith("num_batches_tracked"):
            sd[k] = w[k[len("model."):]]
    model.load_state_dict(sd)
    emb = embed(model, imgs, list(val.index))
    np.save(os.path.join(a.dest, "val_emb.npy"), emb.numpy().astype(np.float32))
    with open(os.path.join(a.dest, "val.json"), "w") as f:
        json.dump(cmc(a.out, val, emb), f)


# ------------------------------------------------------------------------------------------
# floor and compare


def steps_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rel(a, b):
    """max |a - b| / max(max |b|, 1e-12) over a tensor."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def weights_diff(wa, wb):
    return {k: rel(wa[k].double(), wb[k].double()) for k in sorted(wb)}


def pair(sa, sb):
    """Per step: |loss a - loss b|, relative grad-norm difference, |n_active a - n_active b|."""
    n = min(len(sa), len(sb))
    return [
        {
            "step": sa[i]["step"],
            "loss": abs(sa[i]["loss"] - sb[i]["loss"]),
            "grad_norm": abs(sa[i]["grad_norm"] - sb[i]["grad_norm"]) / max(abs(sb[i]["grad_norm"]), 1e-12),
            "n_active": abs(sa[i]["n_active"] - sb[i]["n_active"]),
        }
        for i in range(n)
    ]


def summary(d, wdiff):
    return {
        "steps": len(d),
        "max_loss_diff": max(x["loss"] for x in d),
        "max_grad_norm_rel": max(x["grad_norm"] for x in d),
        "max_n_active_diff": max(x["n_active"] for x in d),
        "first_nonzero_step": next((x["step"] for x in d if x["loss"] > 0 or x["grad_norm"] > 0), None),
        "weights_max_rel": max(wdiff.values()),
        "weights_worst": max(wdiff, key=wdiff.get),
        "per_step": d,
    }


def floor(a):
    """OML against itself on the same trace: a second run with the same threads (b), and one
    with 1 thread (t1), against run a (--a DIR: an existing run of `train` with the same
    options, else made here)."""
    from safetensors.torch import load_file

    me = os.path.abspath(__file__)
    runs = {"b": a.threads, "t1": 1}
    if not a.a:
        runs = {"a": a.threads, **runs}
    dirs = {k: os.path.join(a.dest, k) for k in runs}
    dirs["a"] = a.a or dirs["a"]
    for name, th in runs.items():
        cmd = [sys.executable, me, "train", a.out, "--trace", a.trace, "--steps", str(a.steps), "--dest", dirs[name], "--threads", str(th)]
        cmd += [] if name == "b" else ["--no-val"]  # b validates: the floor of the embeddings and CMC@1
        cmd += ["--deterministic"] if a.deterministic else []
        cmd += ["--fused"] if a.fused else []
        t0 = time.time()
        if os.spawnv(os.P_WAIT, sys.executable, cmd) != 0:
            raise SystemExit(f"oml_run.py floor: run {name} failed")
        print(f"floor: OML run {name} ({th} thread(s)) {time.time() - t0:.0f} s", file=sys.stderr)
    s = {k: steps_of(os.path.join(d, "steps.jsonl"))[: a.steps] for k, d in dirs.items()}
    w = {k: load_file(os.path.join(d, "final.safetensors")) for k, d in dirs.items()}
    res = {
        "same_threads": summary(pair(s["a"], s["b"]), weights_diff(w["a"], w["b"])),
        "one_vs_two_threads": summary(pair(s["t1"], s["a"]), weights_diff(w["t1"], w["a"])),
        "threads": a.threads,
        "deterministic": a.deterministic,
        "fused": a.fused,
    }
    with open(os.path.join(a.dest, "floor.json"), "w") as f:
        json.dump(res, f, indent=1)
    for k in ("same_threads", "one_vs_two_threads"):
        r = res[k]
        print(
            f"floor {k}: {r['steps']} steps, max |loss diff| {r['max_loss_diff']:.3e}, max grad-norm rel diff "
            f"{r['max_grad_norm_rel']:.3e}, max |n_active diff| {r['max_n_active_diff']}, first differing step "
            f"{r['first_nonzero_step']}, final weights max rel diff {r['weights_max_rel']:.3e} ({r['weights_worst']})"
        )


def simile_log(run):
    import pyarrow.parquet as pq

    t = pq.read_table(os.path.join(run, "train_log.parquet")).to_pydict()
    n = len(t["loss"])
    order = sorted(range(n), key=lambda i: t["step"][i])
    # train_log's step is the count of steps done after the row's step (1-based).
    return [
        {
            "step": t["step"][i] - 1,
            "loss": t["loss"][i],
            "active_tri": t["active_tri"][i],
            "grad_norm": t["grad_norm"][i],
            "pos_dist": t["pos_dist"][i],
            "neg_dist": t["neg_dist"][i],
        }
        for i in order
    ]


def envelope(xs):
    out, m = [], 0.0
    for x in xs:
        m = max(m, x)
        out.append(m)
    return out


def forced_rows(a, sim):
    """The forced steps against simile's next checkpoint and log row."""
    from safetensors.torch import load_file

    out = []
    by_step = {r["step"]: r for r in sim}
    for k in [int(v) for v in a.at.split(",")]:
        with open(os.path.join(a.forced, str(k), "step.json")) as f:
            o = json.load(f)
        s = by_step[k]
        ws = load_file(os.path.join(a.ckpts, str(k + 1), "model.safetensors"))
        wo = load_file(os.path.join(a.forced, str(k), "final.safetensors"))
        g = load_file(os.path.join(a.forced, str(k), "grads.safetensors"))
        w_all = w_sure = bn = 0.0
        for n in wo:
            d = (ws[n].double() - wo[n].double()).abs()
            if "running_" in n:
                bn = max(bn, float(d.max()))
                continue
            w_all = max(w_all, float(d.max()))
            sure = g[n].abs() > 1e-6
            if sure.any():
                w_sure = max(w_sure, float(d[sure].max()))
        mv = {"m": 0.0, "v": 0.0}
        ms_p = os.path.join(a.ckpts, str(k + 1), "optimizer.safetensors")
        if os.path.exists(ms_p):
            ms, mo = load_file(ms_p), load_file(os.path.join(a.forced, str(k), "optimizer.safetensors"))
            for n in mo:
                mv[n[0]] = max(mv[n[0]], rel(ms[n].double(), mo[n].double()))
        out.append(
            {
                "k": k,
                "loss_simile": s["loss"],
                "loss_oml": o["loss"],
                "active_simile": s["active_tri"],
                "active_oml": o["active_tri"],
                "grad_norm_simile": s["grad_norm"],
                "grad_norm_oml": o["grad_norm"],
                "w_max": w_all,
                "w_max_sure": w_sure,
                "bn_max": bn,
                "m_rel": mv["m"],
                "v_rel": mv["v"],
            }
        )
    return out


def forced_floor(a):
    """The forced steps' floor: OML's forced steps (a.forced) against another forced run of OML
    from the same states (a.forced_floor: another thread count)."""
    from safetensors.torch import load_file

    out = []
    for k in [int(v) for v in a.at.split(",")]:
        d1, d2 = os.path.join(a.forced, str(k)), os.path.join(a.forced_floor, str(k))
        with open(os.path.join(d1, "step.json")) as f:
            o1 = json.load(f)
        with open(os.path.join(d2, "step.json")) as f:
            o2 = json.load(f)
        w1, w2 = load_file(os.path.join(d1, "final.safetensors")), load_file(os.path.join(d2, "final.safetensors"))
        g = load_file(os.path.join(d1, "grads.safetensors"))
        w_all = w_sure = bn = 0.0
        for n in w1:
            d = (w1[n].double() - w2[n].double()).abs()
            if "running_" in n:
                bn = max(bn, float(d.max()))
                continue
            w_all = max(w_all, float(d.max()))
            sure = g[n].abs() > 1e-6
            if sure.any():
                w_sure = max(w_sure, float(d[sure].max()))
        m1, m2 = load_file(os.path.join(d1, "optimizer.safetensors")), load_file(os.path.join(d2, "optimizer.safetensors"))
        mv = {"m": 0.0, "v": 0.0}
        for n in m1:
            mv[n[0]] = max(mv[n[0]], rel(m1[n].double(), m2[n].double()))
        out.append(
            {
                "k": k,
                "loss": abs(o1["loss"] - o2["loss"]),
                "grad_norm_rel": abs(o1["grad_norm"] - o2["grad_norm"]) / o2["grad_norm"],
                "active": abs(o1["active_tri"] - o2["active_tri"]),
                "w_max": w_all,
                "w_max_sure": w_sure,
                "bn_max": bn,
                "m_rel": mv["m"],
                "v_rel": mv["v"],
            }
        )
    return out


def compare(a):
    from safetensors.torch import load_file

    sim = simile_log(a.simile)
    oml = steps_of(os.path.join(a.oml, "steps.jsonl"))
    fl = None
    if a.floor and os.path.exists(a.floor):
        with open(a.floor) as f:
            fl = json.load(f)
    n = min(len(sim), len(oml))
    rows = []
    for i in range(n):
        s, o = sim[i], oml[i]
        assert s["step"] == o["step"], (s["step"], o["step"])
        rows.append(
            {
                "step": o["step"],
                "loss_simile": s["loss"],
                "loss_oml": o["loss"],
                "loss_diff": abs(s["loss"] - o["loss"]),
                "active_simile": s["active_tri"],
                "active_oml": o["active_tri"],
                "grad_norm_simile": s["grad_norm"],
                "grad_norm_oml": o["grad_norm"],
                "grad_norm_rel": abs(s["grad_norm"] - o["grad_norm"]) / max(abs(o["grad_norm"]), 1e-12),
            }
        )
    pairs = [fl[k]["per_step"] for k in ("same_threads", "one_vs_two_threads")] if fl else []

    def fl_at(i, key):
        return max([p[i][key] for p in pairs if i < len(p)], default=0.0)

    env = {key: envelope([fl_at(i, key) for i in range(n)]) for key in ("loss", "grad_norm")}
    first = next(
        (r["step"] for i, r in enumerate(rows) if r["loss_diff"] > max(env["loss"][i], 1e-6) or r["grad_norm_rel"] > max(env["grad_norm"][i], 1e-5)),
        None,
    )
    cks = sorted({0, 1, 2, 3, 5, 9, 19, 49, 99, 149, 199, 299, 499, 999, n - 1} & set(range(n)))
    print(f"\n== free runs: simile ({a.simile}) and OML ({a.oml}) on the same {n} batches; floor = OML against itself (same threads, and 1 vs 2 threads), the larger")
    print("| step | loss simile | loss OML | abs diff | floor | active_tri simile | active_tri OML | grad norm simile | grad norm OML | rel diff | floor |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i in cks:
        r = rows[i]
        print(
            f"| {r['step']} | {r['loss_simile']:.6f} | {r['loss_oml']:.6f} | {r['loss_diff']:.1e} | {fl_at(i, 'loss'):.1e} | "
            f"{r['active_simile']:.4f} | {r['active_oml']:.4f} | {r['grad_norm_simile']:.5f} | {r['grad_norm_oml']:.5f} | "
            f"{r['grad_norm_rel']:.1e} | {fl_at(i, 'grad_norm'):.1e} |"
        )
    print(f"first step where simile-vs-OML exceeds the floor's envelope (its largest difference so far; at least 1e-6 loss, 1e-5 grad norm): {first}")
    segs = [(0, 3), (3, 10), (10, 50), (50, 100), (100, 200), (200, 400), (400, 10**9)]
    print("| steps | max loss diff simile-OML | floor | max grad-norm rel diff simile-OML | floor | mean loss simile | OML | mean active_tri simile | OML |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lo, hi in segs:
        seg = rows[lo:hi]
        if not seg:
            continue
        fl_l = max((fl_at(i, "loss") for i in range(lo, min(hi, n))), default=0.0)
        fl_g = max((fl_at(i, "grad_norm") for i in range(lo, min(hi, n))), default=0.0)
        m = lambda k: sum(r[k] for r in seg) / len(seg)  # noqa: E731
        print(
            f"| {lo}-{min(hi, n) - 1} | {max(r['loss_diff'] for r in seg):.1e} | {fl_l:.1e} | {max(r['grad_norm_rel'] for r in seg):.1e} | {fl_g:.1e} | "
            f"{m('loss_simile'):.5f} | {m('loss_oml'):.5f} | {m('active_simile'):.4f} | {m('active_oml'):.4f} |"
        )
    if fl:
        for k in ("same_threads", "one_vs_two_threads"):
            r = fl[k]
            print(
                f"floor {k} ({'deterministic' if fl.get('deterministic') else 'as shipped'}): max |loss diff| {r['max_loss_diff']:.1e}, "
                f"max grad-norm rel {r['max_grad_norm_rel']:.1e}, first differing step {r['first_nonzero_step']}, final weights max rel {r['weights_max_rel']:.2e} ({r['weights_worst']})"
            )

    ws = load_file(os.path.join(a.simile, "checkpoints", "last", "model.safetensors"))
    wo = load_file(os.path.join(a.oml, "final.safetensors"))
    wd = {k: rel(ws[k].double(), wo[k].double()) for k in sorted(wo)}
    fw = {}
    if fl and a.floor_a and a.floor_b:
        wa, wb = load_file(os.path.join(a.floor_a, "final.safetensors")), load_file(os.path.join(a.floor_b, "final.safetensors"))
        fw = weights_diff(wa, wb)
    print("\nfinal weights, the 10 largest relative differences (max |simile - OML| / max |OML| per tensor; floor: OML vs OML, same threads):")
    for k in sorted(wd, key=wd.get, reverse=True)[:10]:
        print(f"  {k:36s} {wd[k]:.3e}" + (f"   floor {fw[k]:.3e}" if k in fw else ""))
    bn = [k for k in wd if "running_" in k]
    par = [k for k in wd if "running_" not in k]
    med = lambda d, ks: float(np.median([d[k] for k in ks]))  # noqa: E731
    print(
        f"BatchNorm buffers: max rel {max(wd[k] for k in bn):.3e} ({max(bn, key=wd.get)}), median {med(wd, bn):.3e}"
        + (f"; floor max {max(fw[k] for k in bn):.3e}, median {med(fw, bn):.3e}" if fw else "")
    )
    print(
        f"parameters: max rel {max(wd[k] for k in par):.3e}, median {med(wd, par):.3e}"
        + (f"; floor max {max(fw[k] for k in par):.3e}, median {med(fw, par):.3e}" if fw else "")
    )
    out = {"per_step": rows, "first_beyond_floor": first, "weights_rel": wd}
    emb_s = a.simile_emb
    emb_o = os.path.join(a.oml, "val_emb.npy")
    if emb_s and os.path.exists(emb_s) and os.path.exists(emb_o):
        es, eo = np.load(emb_s).astype(np.float64), np.load(emb_o).astype(np.float64)
        cos = (es * eo).sum(1) / np.linalg.norm(es, axis=1) / np.linalg.norm(eo, axis=1)
        line = f"validation embeddings ({len(cos)} rows), simile's run vs OML's run: cosine min {cos.min():.4f}, mean {cos.mean():.4f}"
        if a.floor_emb and os.path.exists(a.floor_emb):
            ef = np.load(a.floor_emb).astype(np.float64)
            cf = (ef * eo).sum(1) / np.linalg.norm(ef, axis=1) / np.linalg.norm(eo, axis=1)
            line += f"; floor (OML vs OML): min {cf.min():.4f}, mean {cf.mean():.4f}"
        print(line)
        out["val_cos_min"], out["val_cos_mean"] = float(cos.min()), float(cos.mean())
    vm = os.path.join(a.simile, "val_metrics.parquet")
    vo = os.path.join(a.oml, "val.json")
    if os.path.exists(vm) and os.path.exists(vo):
        import pyarrow.parquet as pq

        t = pq.read_table(vm).to_pydict()
        with open(vo) as f:
            o = json.load(f)
        cs = t["OVERALL/cmc/1"][-1]
        line = f"CMC@1 on validation: simile {cs:.4f} (its own validation), OML {o['OVERALL/cmc/1']:.4f}"
        if a.floor_val and os.path.exists(a.floor_val):
            with open(a.floor_val) as f:
                line += f", OML again (floor) {json.load(f)['OVERALL/cmc/1']:.4f}"
        print(line)
        out["cmc1_simile"], out["cmc1_oml"] = cs, o["OVERALL/cmc/1"]
        if a.evaluated:
            with open(os.path.join(a.evaluated, "val.json")) as f:
                ev = json.load(f)
            es = np.load(emb_s).astype(np.float64) if emb_s and os.path.exists(emb_s) else None
            ee = np.load(os.path.join(a.evaluated, "val_emb.npy")).astype(np.float64)
            line = f"validation path: OML's metrics on simile's final weights CMC@1 {ev['OVERALL/cmc/1']:.4f} (simile's validation said {cs:.4f})"
            if es is not None:
                c = (es * ee).sum(1) / np.linalg.norm(es, axis=1) / np.linalg.norm(ee, axis=1)
                line += f"; simile-embed vs OML's extractor on those weights: cosine min {c.min():.7f}, max |diff| {np.abs(es - ee).max():.1e}"
            print(line)
            out["cmc1_oml_on_simile_weights"] = ev["OVERALL/cmc/1"]
    if a.forced:
        fr = forced_rows(a, sim)
        print("\n== forced steps: OML's step k from simile's exact state after k steps (weights, BatchNorm statistics, AdamW moments and step counts), against simile's step k")
        print("| k | loss simile | loss OML | active_tri simile / OML | grad norm simile | OML | rel | weights max abs diff | where abs g > 1e-6 | BN buffers | m rel | v rel |")
        print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in fr:
            print(
                f"| {r['k']} | {r['loss_simile']:.7f} | {r['loss_oml']:.7f} | {r['active_simile']:.4f} / {r['active_oml']:.4f} | {r['grad_norm_simile']:.6f} | "
                f"{r['grad_norm_oml']:.6f} | {abs(r['grad_norm_simile'] - r['grad_norm_oml']) / r['grad_norm_oml']:.1e} | {r['w_max']:.1e} | {r['w_max_sure']:.1e} | "
                f"{r['bn_max']:.1e} | {r['m_rel']:.1e} | {r['v_rel']:.1e} |"
            )
        out["forced"] = fr
        if a.forced_floor:
            ff = forced_floor(a)
            print("floor of the forced steps: OML's step k from the same state with 2 threads against 1 thread")
            print("| k | loss abs diff | grad norm rel | active_tri diff | weights max abs diff | where abs g > 1e-6 | BN buffers | m rel | v rel |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in ff:
                print(
                    f"| {r['k']} | {r['loss']:.1e} | {r['grad_norm_rel']:.1e} | {r['active']:.4f} | {r['w_max']:.1e} | {r['w_max_sure']:.1e} | "
                    f"{r['bn_max']:.1e} | {r['m_rel']:.1e} | {r['v_rel']:.1e} |"
                )
            out["forced_floor"] = ff
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("gen")
    g.add_argument("out")
    g.add_argument("--train-labels", type=int, default=300)
    g.add_argument("--val-labels", type=int, default=100)
    g.add_argument("--samples", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    for name in ("train", "floor", "forced"):
        t = sub.add_parser(name)
        t.add_argument("out", help="the folder gen made")
        t.add_argument("--trace", required=True)
        t.add_argument("--dest", required=True)
        t.add_argument("--threads", type=int, default=2)
        t.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
        t.add_argument("--fused", action="store_true", help="AdamW(fused=True), the kernel simile calls")
        if name in ("train", "floor"):
            t.add_argument("--steps", type=int, required=True)
        if name == "floor":
            t.add_argument("--a", metavar="DIR", help="an existing `train` run with these options to compare against")
        if name == "train":
            t.add_argument("--no-val", action="store_true")
            t.add_argument("--from-simile", metavar="CKPT")
            t.add_argument("--start", type=int, default=0)
            t.add_argument("--verbose", action="store_true")
        if name == "forced":
            t.add_argument("--ckpts", required=True, help="folder of simile checkpoints, one per k: CKPTS/<k>")
            t.add_argument("--at", required=True, help="comma-separated k")
    e = sub.add_parser("evaluate")
    e.add_argument("out")
    w = e.add_mutually_exclusive_group(required=True)
    w.add_argument("--weights", help="a model.safetensors (torchvision names)")
    w.add_argument("--init-seeds", help="comma-separated seeds: OML's untrained extractor of each (DEST/untrained.jsonl)")
    e.add_argument("--dest", required=True)
    e.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("--simile", required=True)
    c.add_argument("--oml", required=True)
    c.add_argument("--simile-emb", help="simile-embed's embeddings of the validation split (simile's final model)")
    c.add_argument("--floor", help="floor.json of the floor mode")
    c.add_argument("--floor-a", help="the floor's run a (final.safetensors)")
    c.add_argument("--floor-b", help="the floor's run b")
    c.add_argument("--floor-emb", help="another OML run's val_emb.npy")
    c.add_argument("--floor-val", help="another OML run's val.json")
    c.add_argument("--forced", help="DEST of the forced mode")
    c.add_argument("--forced-floor", help="DEST of another forced run from the same states (another thread count)")
    c.add_argument("--ckpts", help="CKPTS of the forced mode")
    c.add_argument("--at", help="the forced mode's k list")
    c.add_argument("--evaluated", help="DEST of the evaluate mode on simile's final weights")
    c.add_argument("--json")
    a = ap.parse_args()
    {"gen": gen, "train": train, "floor": floor, "forced": forced, "evaluate": evaluate, "compare": compare}[a.mode](a)


if __name__ == "__main__":
    main()
