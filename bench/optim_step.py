"""PyTorch's optimiser steps on resnet18's parameters, for bench/optim_step.sh.

The parameters of simile's resnet18 extractor with a 512 -> 512 projection (torchvision's
resnet18 without its classifier, plus a Linear(512, 512)), random gradients, and for each
optimiser torch.optim's three implementations: the single-tensor loop (foreach=False), the
multi-tensor one (foreach=True, PyTorch's default on CUDA) and fused=True. Each step is timed
from the call to its return, after 3 warm-up steps, the median of N; zero_grad is not timed
(set_to_none makes it free). Prints one JSON line per (optimiser, implementation).
"""

import argparse
import json
import statistics
import time

import torch
import torchvision


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="copied into the JSON lines")
    args = ap.parse_args()
    tags = dict(t.split("=", 1) for t in args.tag)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Linear(512, 512)
    params = [p for p in net.parameters()]
    n = sum(p.numel() for p in params)
    makers = {
        "adamw": lambda ps, **k: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, **k),
        "adam": lambda ps, **k: torch.optim.Adam(ps, lr=1e-3, **k),
        "sgd": lambda ps, **k: torch.optim.SGD(ps, lr=0.1, momentum=0.9, **k),
    }
    for name, make in makers.items():
        for impl, kw in [("single-tensor", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})]:
            opt = make(params, **kw)
            times = []
            for i in range(3 + args.steps):
                for p in params:
                    p.grad = torch.randn_like(p) * 1e-3
                t = time.perf_counter()
                opt.step()
                if i >= 3:
                    times.append(time.perf_counter() - t)
            print(
                json.dumps(
                    {
                        **tags,
                        "framework": f"torch-{torch.__version__.split('+')[0]}",
                        "optimizer": name,
                        "impl": impl,
                        "params": n,
                        "step_ms": round(1000 * statistics.median(times), 2),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
