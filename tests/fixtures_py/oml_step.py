"""One training step of OML 4.0's recipe, the reference for tests/it/train_parity.rs.

Writes into OUT:
- `img/<label>_<k>.png`: 16 labels x 4 grey 64 x 64 images (a pattern per label, noise per
  image), and `df.csv` listing them as train rows (OML's format);
- `init.pth`: the state dict of OML's `ResnetExtractor(weights=None, arch="resnet18",
  gem_p=None, remove_fc=True, normalise_features=True)` as OML builds it (torchvision's own
  initialisation, seeded), keys prefixed `model.` as OML saves them;
- for each optimiser in OPTIMISERS, `<name>.json` (the loss and the gradients' global norm) and
  `<name>.after.safetensors`: every parameter and BatchNorm statistic after one step (names as
  torchvision's, without `num_batches_tracked`), and `<name>.grads.safetensors`.

The step is OML's: the extractor in train mode on the whole batch (all 64 images, the one batch
a balance sampler of 16 labels x 4 instances draws from 16 labels), `TripletLossWithMiner(margin
0.2, HardTripletsMiner())` on the L2-normalised features, backward, then the optimiser over the
extractor's parameters as OML's pipeline builds it. The images are read as OML's torchvision
transforms read them: PIL, `convert("RGB")`, `ToTensor`, `Normalize(ImageNet mean and std)`.

Usage: python oml_step.py OUT
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from oml.losses.triplet import TripletLossWithMiner
from oml.miners.inbatch_hard_tri import HardTripletsMiner
from oml.models import ResnetExtractor

OPTIMISERS = {
    # simile's [optimizer] table for the same optimiser is in tests/it/train_parity.rs.
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
    "sgd": lambda p: torch.optim.SGD(p, lr=1.0),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.01),
    "sgd_nesterov": lambda p: torch.optim.SGD(
        p, lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
}
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

out = sys.argv[1]
os.makedirs(os.path.join(out, "img"), exist_ok=True)
torch.set_num_threads(2)
rng = np.random.default_rng(7)
rows, labels = [], []
for label in range(16):
    yy, xx = np.mgrid[0:64, 0:64]
    base = 128 + 100 * np.sin(xx * (label % 4 + 1) * 0.2 + yy * (label // 4 + 1) * 0.15)
    for k in range(4):
        img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        name = f"img/{label}_{k}.png"
        Image.fromarray(img, mode="L").save(os.path.join(out, name))
        rows.append(f"{label},{name},train,,")
        labels.append(label)
with open(os.path.join(out, "df.csv"), "w") as f:
    f.write("label,path,split,is_query,is_gallery\n" + "\n".join(rows) + "\n")


def load(name):
    a = np.asarray(Image.open(os.path.join(out, name)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(((a - MEAN) / STD).transpose(2, 0, 1).copy())


x = torch.stack([load(r.split(",")[1]) for r in rows])
y = torch.tensor(labels)

torch.manual_seed(0)
init = ResnetExtractor(weights=None, arch="resnet18", gem_p=None, remove_fc=True, normalise_features=True)
torch.save(init.state_dict(), os.path.join(out, "init.pth"))


def plain(sd):
    return {
        k[len("model."):]: v.detach().clone().contiguous()
        for k, v in sd.items()
        if not k.endswith("num_batches_tracked")
    }


for name, make in OPTIMISERS.items():
    model = ResnetExtractor(weights=None, arch="resnet18", gem_p=None, remove_fc=True, normalise_features=True)
    model.load_state_dict(init.state_dict())
    model.train()
    criterion = TripletLossWithMiner(margin=0.2, miner=HardTripletsMiner(), need_logs=True)
    opt = make(model.parameters())
    loss = criterion(model(x), y)
    loss.backward()
    grads = {n[len("model."):]: p.grad.detach().clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    opt.step()
    save_file(plain(model.state_dict()), os.path.join(out, f"{name}.after.safetensors"))
    save_file(grads, os.path.join(out, f"{name}.grads.safetensors"))
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"loss": loss.item(), "grad_norm": norm}, f)
