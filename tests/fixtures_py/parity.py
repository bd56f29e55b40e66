"""Reference models and outputs for simile-embed's parity tests (tests/it/embed.rs).

Writes into OUT: for each case a checkpoint (random weights, fixed seed), an input batch
`<case>.x.npy` and PyTorch's embeddings of it `<case>.y.npy`:
- resnet18: torchvision resnet18, a plain state dict (.pth); embedding = avgpool features.
- vits16: timm vit_small_patch16_224 inside a Lightning-style checkpoint (.ckpt with
  "state_dict", every key prefixed "model.", plus an ArcFace "criterion.weight" to drop);
  embedding = CLS token after the final norm.
- vits16_160, vits16_288: the same ViT at non-native input sizes, its position embeddings
  interpolated as DINO's `interpolate_pos_encoding` does (bicubic, +0.1 offset; what OML's
  ViTExtractor runs), written out here as the reference.
- vits14: timm vit_small_patch14_dinov2 (LayerScale), .safetensors; CLS after the norm.
- traced: torch.jit.trace of a small CNN returning [batch, 64].
Usage: python parity.py OUT
"""
import math, os, sys
import numpy as np
import torch, torchvision, timm
from safetensors.torch import save_file

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.set_num_threads(2)

def save_io(name, x, y):
    np.save(os.path.join(out, f"{name}.x.npy"), x.numpy().astype(np.float32))
    np.save(os.path.join(out, f"{name}.y.npy"), y.detach().numpy().astype(np.float32))

with torch.no_grad():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None).eval()
    # Non-trivial BN statistics, so running stats are part of what is compared.
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 1.5)
    torch.save(m.state_dict(), os.path.join(out, "resnet18.pth"))
    x = torch.randn(2, 3, 64, 64)
    m.fc = torch.nn.Identity()
    save_io("resnet18", x, m(x))

    torch.manual_seed(1)
    v = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    sd = {f"model.{k}": t for k, t in v.state_dict().items()}
    sd["criterion.weight"] = torch.randn(10, 384)
    torch.save({"state_dict": sd, "epoch": 3}, os.path.join(out, "vits16.ckpt"))
    x = torch.randn(2, 3, 224, 224)
    save_io("vits16", x, v.forward_features(x)[:, 0])

    # DINO's VisionTransformer.prepare_tokens + interpolate_pos_encoding (facebookresearch/dino,
    # vision_transformer.py), on timm's layers: the reference for inputs of another size.
    def dino_pos(v, h, w):
        pos = v.pos_embed
        n, dim = pos.shape[1] - 1, pos.shape[-1]
        w0, h0 = w // 16 + 0.1, h // 16 + 0.1
        grid = torch.nn.functional.interpolate(
            pos[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
        assert int(w0) == grid.shape[-2] and int(h0) == grid.shape[-1]
        return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)

    def dino_forward(v, x):
        b, _, h, w = x.shape
        t = v.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat((v.cls_token.expand(b, -1, -1), t), dim=1)
        t = t + (v.pos_embed if h == w == 224 else dino_pos(v, h, w))
        for blk in v.blocks:
            t = blk(t)
        return v.norm(t)[:, 0]

    # The hand-written forward is timm's at the native size (so only the interpolation differs).
    assert torch.allclose(dino_forward(v, x), v.forward_features(x)[:, 0], atol=1e-5)
    for side in (160, 288):
        torch.manual_seed(10 + side)
        x = torch.randn(1, 3, side, side)
        save_io(f"vits16_{side}", x, dino_forward(v, x))

    torch.manual_seed(2)
    d = timm.create_model("vit_small_patch14_dinov2", pretrained=False).eval()
    save_file({k: t.contiguous() for k, t in d.state_dict().items()}, os.path.join(out, "vits14.safetensors"))
    x = torch.randn(1, 3, 518, 518)
    save_io("vits14", x, d.forward_features(x)[:, 0])

    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 64)).eval()
    x = torch.randn(2, 3, 32, 32)
    ts = torch.jit.trace(net, x)
    ts.save(os.path.join(out, "traced.pt"))
    save_io("traced", x, net(x))
print("ok")
