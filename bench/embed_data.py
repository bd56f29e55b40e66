"""Data for bench/embed_vs_pytorch.sh: N JPEG photos 400x300 made from scikit-image's photos
(random crops, flips and colour shifts), an unlabeled CSV for simile-prepare, and a resnet18
state dict with random weights (seed 0). Usage: python embed_data.py OUT N"""
import os, sys, random
import numpy as np, torch, torchvision, skimage.data as sd
from PIL import Image
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(os.path.join(out, "img"), exist_ok=True)
rng = random.Random(0)
photos = [Image.fromarray(f()).convert("RGB") for f in (sd.astronaut, sd.chelsea, sd.coffee, sd.rocket, sd.cat, sd.immunohistochemistry, sd.colorwheel, sd.retina, sd.hubble_deep_field)]
with open(os.path.join(out, "images.csv"), "w") as f:
    f.write("path\n")
    for i in range(n):
        p = photos[i % len(photos)]
        w, h = p.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im = p.crop((x, y, x + cw, y + ch)).resize((400, 300), Image.BILINEAR)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        a = np.asarray(im).astype(np.float32) * rng.uniform(0.7, 1.2) + rng.uniform(-20, 20)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(os.path.join(out, "img", f"{i:05d}.jpg"), quality=90)
        f.write(f"img/{i:05d}.jpg\n")
torch.manual_seed(0)
torch.save(torchvision.models.resnet18(weights=None).state_dict(), os.path.join(out, "resnet18.pth"))
