#!/usr/bin/env python3
"""PyTorch's side of regimen's training-step benchmarks (BENCH.md: mlp-step, cnn-step).

What it measures: training steps per second of one fixed model on one fixed synthetic batch,
exactly what `regimen bench` times on its side (crates/regimen-cli/src/bench.rs):

  * mlp-step: Flatten, Linear 784->512, ReLU, Dropout 0.2, Linear 512->512, ReLU, Dropout 0.2,
    Linear 512->10.
  * cnn-step: [Conv2d 3x3 pad 1 (no bias) -> BatchNorm2d -> ReLU] x2 (32 ch, input 1 ch),
    MaxPool2d 2, [same] x2 (64 ch), MaxPool2d 2, Dropout 0.25, Flatten, Linear 3136->256, ReLU,
    Dropout 0.25, Linear 256->10.

Input: randn [B, 1, 28, 28] and random labels in 0..10, fixed seed, made once (no data loading is
timed). One step = zero_grad, forward in train mode, F.cross_entropy (mean), backward, plain
torch.optim.SGD(lr=0.01) step. Timing protocol: `--warmup` steps, then `--reps` repetitions of
`--steps` steps each; the median repetition's steps/s is reported. On CUDA the device is
synchronized before every clock read.

CPU runs use `--threads` intra-op threads (torch.set_num_threads; default 2, as BENCH.md asks).

Run (from the repository root):

    /root/torchenv/bin/python bench/pytorch.py --workload mlp-step --batch 128
    /root/torchenv/bin/python bench/pytorch.py --workload cnn-step --batch 512 --json
    /root/torchenv/bin/python bench/pytorch.py --workload cnn-step --batch 128 --device cuda

`--json` prints one line in the same format as `regimen bench --json`, with framework "pytorch"
and an extra "device" key. To compare both sides interleaved, use `bench/compare`.
"""

import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp_step_model() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(512, 10),
    )


def conv_bn_relu(cin: int, cout: int) -> list:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def cnn_step_model() -> nn.Module:
    return nn.Sequential(
        *conv_bn_relu(1, 32),
        *conv_bn_relu(32, 32),
        nn.MaxPool2d(2),
        *conv_bn_relu(32, 64),
        *conv_bn_relu(64, 64),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(3136, 256),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(256, 10),
    )


MODELS = {"mlp-step": mlp_step_model, "cnn-step": cnn_step_model}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="mlp-step", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    if args.batch < 1 or args.steps < 1 or args.reps < 1 or args.warmup < 0:
        p.error("--batch, --steps and --reps must be at least 1, --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available to this PyTorch")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = MODELS[args.workload]().to(dev)
    model.train()
    b = args.batch
    x = torch.randn(b, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (b,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    rates = []
    for _ in range(args.reps):
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        rates.append(args.steps / (time.perf_counter() - t))
    # Same median as regimen's: sorted[len // 2] (upper median for an even count).
    median = sorted(rates)[len(rates) // 2]
    threads = torch.get_num_threads()
    if args.json:
        print(
            json.dumps(
                {
                    "framework": "pytorch",
                    "workload": args.workload,
                    "batch": b,
                    "threads": threads,
                    "steps_per_s": median,
                    "reps": rates,
                    "device": args.device,
                }
            )
        )
    else:
        reps = ", ".join(f"{r:.2f}" for r in rates)
        print(
            f"pytorch {args.workload} batch {b} threads {threads} device {args.device}: "
            f"{median:.2f} steps/s (reps: [{reps}])"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
