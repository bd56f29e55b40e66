# simile helper: reads a PyTorch checkpoint (.pth/.pt/.ckpt pickle, torch.save) and writes its
# tensors as safetensors, flattening nested dicts with "." (a Lightning checkpoint's
# "state_dict", a {"model": ...} wrapper). Usage: python -c <this> IN OUT
import json, struct, sys, collections
import torch

src, dst = sys.argv[1], sys.argv[2]
try:
    obj = torch.load(src, map_location="cpu", weights_only=True)
except Exception as e:  # Lightning checkpoints hold arbitrary Python objects
    print(f"simile: {src}: not loadable with weights_only=True ({type(e).__name__}); "
          "loading it as a full pickle: only do this with files you trust", file=sys.stderr)
    obj = torch.load(src, map_location="cpu", weights_only=False)
if isinstance(obj, torch.nn.Module):
    obj = obj.state_dict()
for k in ("state_dict", "model_state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(k), dict):
        obj = obj[k]
        break
flat = collections.OrderedDict()
def walk(prefix, o):
    if isinstance(o, torch.Tensor):
        flat[prefix] = o
    elif isinstance(o, dict):
        for k, v in o.items():
            walk(f"{prefix}.{k}" if prefix else str(k), v)
walk("", obj)
if not flat:
    sys.exit(f"simile: {src}: no tensors found")
DT = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
      torch.uint8: "U8", torch.bool: "BOOL"}
header, blobs, off = {}, [], 0
for k, t in flat.items():
    if t.dtype not in DT:
        print(f"simile: skipping {k}: dtype {t.dtype}", file=sys.stderr)
        continue
    b = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    header[k] = {"dtype": DT[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(h)))
    f.write(h)
    for b in blobs:
        f.write(b)
print(len(header))
