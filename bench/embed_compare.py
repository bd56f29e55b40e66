"""Cosines for bench/embed_vs_pytorch.sh. Usage: python embed_compare.py torch.npy s32.npy s16.npy"""
import json, sys, numpy as np
def cos(a, b): return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
t, s32, s16 = (np.load(p).astype(np.float64) for p in sys.argv[1:4])
perm = np.roll(np.arange(len(t)), 1)
print(json.dumps({
    "cos_fp32_vs_pytorch_min": float(cos(s32, t).min()), "cos_fp32_vs_pytorch_mean": float(cos(s32, t).mean()),
    "cos_bf16_vs_fp32_min": float(cos(s16, s32).min()), "cos_bf16_vs_fp32_mean": float(cos(s16, s32).mean()),
    "cos_between_different_images_mean": float(cos(t, t[perm]).mean()),
}))
