"""Agreement for bench/embed_vs_pytorch.sh. Usage: python embed_compare.py torch.npy s32.npy s16.npy
Cosines per row, and the relative L2 error |a - b| / |b| per row: with random weights every
image's embedding points almost the same way (see the context row), so the cosine alone says
little; the relative error shows how close the values are."""
import json, sys, numpy as np
def cos(a, b): return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
def rel(a, b): return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
t, s32, s16 = (np.load(p).astype(np.float64) for p in sys.argv[1:4])
perm = np.roll(np.arange(len(t)), 1)
print(json.dumps({
    "cos_fp32_vs_pytorch_min": float(cos(s32, t).min()), "cos_fp32_vs_pytorch_mean": float(cos(s32, t).mean()),
    "rel_fp32_vs_pytorch_max": float(rel(s32, t).max()), "rel_fp32_vs_pytorch_mean": float(rel(s32, t).mean()),
    "cos_bf16_vs_fp32_min": float(cos(s16, s32).min()), "cos_bf16_vs_fp32_mean": float(cos(s16, s32).mean()),
    "rel_bf16_vs_fp32_max": float(rel(s16, s32).max()), "rel_bf16_vs_fp32_mean": float(rel(s16, s32).mean()),
    "cos_between_different_images_mean": float(cos(t, t[perm]).mean()),
    "rel_between_different_images_mean": float(rel(t[perm], t).mean()),
}))
