"""PyTorch side of bench/embed_vs_pytorch.sh: torchvision resnet18 (fc removed) at 224 px,
PIL decode, Resize(256) + CenterCrop(224), DataLoader with 2 workers, 2 threads, fp32.
Prints JSON: decode+resize and end-to-end images/s. Usage: python embed_pytorch.py DIR OUT.npy"""
import json, os, sys, time
import numpy as np, torch, torchvision
from PIL import Image
import torchvision.transforms as T
d, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
paths = [os.path.join(d, l.strip()) for l in open(os.path.join(d, "images.csv")).readlines()[1:]]
tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
class DS(torch.utils.data.Dataset):
    def __len__(self): return len(paths)
    def __getitem__(self, i): return tf(Image.open(paths[i]).convert("RGB"))
def loader(): return torch.utils.data.DataLoader(DS(), batch_size=64, num_workers=2)
t = time.time()
for _ in loader(): pass
decode = len(paths) / (time.time() - t)
m = torchvision.models.resnet18(weights=None)
m.load_state_dict(torch.load(os.path.join(d, "resnet18.pth")))
m.fc = torch.nn.Identity()
m.eval()
t = time.time(); ys = []
with torch.no_grad():
    for x in loader(): ys.append(m(x))
e2e = len(paths) / (time.time() - t)
np.save(out, torch.cat(ys).numpy())
print(json.dumps({"pytorch_decode_resize_ips": decode, "pytorch_fp32_ips": e2e}))
