"""Two ways to train in bf16 on the same libtorch, per step: autocast (what simile-train
--compute bf16 does, and PyTorch / Lightning's bf16-mixed) against a bf16 copy of the network
(forward and backward in bf16, what simile did before issue 25), with fp32 as the baseline.

    python bench/bf16_strategies.py [--steps 4] [--threads 2] [--batch 64] [--size 64]

Networks: torchvision's resnet18 (with a 512 -> 512 projection) and simile's small CNN (width
32, 128-d), random input, a sum of squares as the loss; each step is forward + backward
(+ for the copy, the fp32 -> bf16 weight copy before it), the median of --steps after a warm-up
step. Prints one JSON line per (network, strategy), then a Markdown table. Run it on the torch
of simile's own virtualenv (scripts/env.sh puts it first on PATH) to measure simile's libtorch.
"""

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn as nn
import torchvision


def small_cnn(width=32, dim=128):
    layers, cin = [], 3
    for i in range(4):
        cout = width << i
        layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        if i < 3:
            layers.append(nn.MaxPool2d(2))
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, dim))


def resnet18():
    net = torchvision.models.resnet18()
    net.fc = nn.Linear(512, 512)
    return net


def step_time(net, x, strategy):
    if strategy == "bf16 copy":
        low = copy.deepcopy(net).bfloat16()

        def step():
            with torch.no_grad():
                for a, b in zip(low.parameters(), net.parameters()):
                    a.copy_(b)
            low(x.bfloat16()).float().pow(2).sum().backward()

    elif strategy == "bf16 autocast":

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = net(x)
            y.float().pow(2).sum().backward()

    else:

        def step():
            net(x).pow(2).sum().backward()

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    for name, make in [("resnet18", resnet18), ("smallcnn", small_cnn)]:
        net = make()
        for strategy in ["fp32", "bf16 autocast", "bf16 copy"]:
            step = step_time(net, x, strategy)
            times = []
            for i in range(1 + args.steps):
                t = time.perf_counter()
                step()
                if i > 0:
                    times.append(time.perf_counter() - t)
            r = {
                "torch": torch.__version__,
                "bf16_kernels": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                "network": name,
                "strategy": strategy,
                "s_per_step": round(statistics.median(times), 3),
            }
            rows.append(r)
            print(json.dumps(r), flush=True)
    print()
    print("| network | strategy | s / step (median) | vs fp32 |")
    print("|---|---|---|---|")
    for r in rows:
        base = next(b["s_per_step"] for b in rows if b["network"] == r["network"] and b["strategy"] == "fp32")
        print(f"| {r['network']} | {r['strategy']} | {r['s_per_step']:.3f} | {base / r['s_per_step']:.2f}x |")


if __name__ == "__main__":
    main()
