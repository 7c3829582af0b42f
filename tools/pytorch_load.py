#!/usr/bin/env python3
"""Load a regimen checkpoint in PyTorch and predict the test set, as `regimen eval` does.

    regimen predict --checkpoint RUN DATA/t10k-images-idx3-ubyte.gz > regimen.csv
    python tools/pytorch_load.py RUN/checkpoints/best.safetensors --data-dir DATA \
        --compare regimen.csv

The checkpoint is read with `safetensors` as it is: the model's tensors carry PyTorch's names
(`0.weight`, `1.running_mean`, `5.branch.2.weight`), so they load into the `nn.Sequential` this
script builds from the checkpoint's `model` metadata (the same model spec language as
`regimen train --model`) with `load_state_dict`, no renaming. The other tensors of the file are
the optimizer's state (`optim.*`) and the preprocessing (`preprocess.*`); the preprocessing is
applied to the test images exactly as regimen applies it. Batch norm's `num_batches_tracked`
counters are PyTorch's own and not in the file.

Prints the accuracy on the test split; with --compare, the CSV of `regimen predict` on the same
images, it checks that every predicted class is the same and reports the largest difference of
probabilities. Exit status 1 if a class differs where the two top probabilities are not a near
tie (1e-4). Needs torch and safetensors; runs on the CPU.
"""

import argparse
import csv
import gzip
import math
import os
import struct
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

BUILT_IN = {
    "digits-mlp": "flatten,linear:128,act,linear:classes",
    "digits-cnn": "conv:16:3:1:1:nobias,bn,act,maxpool:2,conv:32:3:1:1:nobias,bn,act,gap,linear:classes",
    "mlp": "flatten,linear:512,act,dropout:0.2,linear:512,act,dropout:0.2,linear:classes",
    "cnn": "conv:32:3:1:1:nobias,bn,act,conv:32:3:1:1:nobias,bn,act,maxpool:2,"
    "conv:64:3:1:1:nobias,bn,act,conv:64:3:1:1:nobias,bn,act,maxpool:2,"
    "dropout:0.25,flatten,linear:256,act,dropout:0.25,linear:classes",
}


def expand(spec):
    """The tokens of a spec, a built-in name in first position expanded (as regimen does)."""
    tokens = [t.strip() for t in spec.split(",")]
    name, *args = tokens[0].split(":")
    if name in BUILT_IN:
        return BUILT_IN[name].split(",") + tokens[1:]
    if name == "deep-mlp":
        depth = int(args[0]) if args else 10
        width = int(args[1]) if len(args) > 1 else 500
        return ["flatten"] + [f"linear:{width}", "act"] * depth + ["linear:classes"] + tokens[1:]
    if name == "resnet":
        n = int(args[0]) if args else 2
        width = int(args[1]) if len(args) > 1 else 16
        p = float(args[2]) if len(args) > 2 else 0.1
        out, block = [f"conv:{width}:3:1:1:nobias"], 0
        for stage in range(3):
            for i in range(n):
                block += 1
                stride = 2 if stage > 0 and i == 0 else 1
                out.append(f"res:{width << stage}:{stride}:{p * block / (3 * n)}")
        return out + ["bn", "act", "gap", "linear:classes"] + tokens[1:]
    return tokens


def activation(spec):
    name, _, arg = spec.partition(":")
    a = float(arg) if arg else None
    return {
        "sigmoid": lambda: nn.Sigmoid(),
        "tanh": lambda: nn.Tanh(),
        "relu": lambda: nn.ReLU(),
        "leaky_relu": lambda: nn.LeakyReLU(a if a is not None else 0.01),
        "lrelu": lambda: nn.LeakyReLU(a if a is not None else 0.01),
        "elu": lambda: nn.ELU(a if a is not None else 1.0),
        "selu": lambda: nn.SELU(),
        "softplus": lambda: nn.Softplus(a if a is not None else 1.0, 20.0),
        "gelu": lambda: nn.GELU(),
        "mish": lambda: nn.Mish(),
        "swish": lambda: Swish(a if a is not None else 1.0),
        "silu": lambda: Swish(a if a is not None else 1.0),
    }.get(name)


class Swish(nn.Module):
    def __init__(self, beta):
        super().__init__()
        self.beta = beta

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class LearnedSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class GlobalAvgPool(nn.Module):
    """regimen's GlobalAvgPool: one layer (AdaptiveAvgPool2d(1) + Flatten would shift names)."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


class Maxout(nn.Module):
    def __init__(self, fin, fout, k):
        super().__init__()
        self.linear = nn.Linear(fin, fout * k)
        self.k = k

    def forward(self, x):
        z = self.linear(x)
        return z.view(z.shape[0], -1, self.k).max(-1).values


class Residual(nn.Module):
    """shortcut(x) + branch(x); in evaluation the branch is scaled by its survival 1 - p."""

    def __init__(self, branch, shortcut, p):
        super().__init__()
        self.branch = branch
        if shortcut is not None:
            self.shortcut = shortcut
        self.has_shortcut = shortcut is not None
        self.p = p

    def forward(self, x):
        s = self.shortcut(x) if self.has_shortcut else x
        return s + (1.0 - self.p) * self.branch(x)


class FractionalPool(nn.Module):
    """regimen's fractional max pooling in evaluation: the fixed samples u = 0.5."""

    def __init__(self, k, ratio):
        super().__init__()
        self.k, self.ratio = k, ratio

    def forward(self, x):
        n, c, h, w = x.shape
        samples = torch.full((n, c, 2), 0.5, dtype=x.dtype)
        out = (int(h * self.ratio), int(w * self.ratio))
        return F.fractional_max_pool2d(x, self.k, output_size=out, _random_samples=samples)


def build(spec, input_shape, classes):
    """nn.Sequential of a regimen model spec, layers named by position as regimen names them."""
    init_act = "relu"
    tokens = []
    for t in expand(spec):
        if t.startswith("activation="):
            init_act = t.split("=", 1)[1]
        elif not t.startswith("init="):
            tokens.append(t)
    shape = list(input_shape)
    layers = []
    for tok in tokens:
        name, *args = tok.split(":")
        nobias = bool(args) and args[-1] == "nobias"
        if nobias:
            args = args[:-1]
        if name == "linear":
            out = classes if args[0] == "classes" else int(args[0])
            layers.append(nn.Linear(shape[0], out, bias=not nobias))
            shape = [out]
        elif name == "conv":
            out = int(args[0])
            k = int(args[1]) if len(args) > 1 else 3
            s = int(args[2]) if len(args) > 2 else 1
            p = int(args[3]) if len(args) > 3 else k // 2
            layers.append(nn.Conv2d(shape[0], out, k, s, p, bias=not nobias))
            shape = [out, (shape[1] + 2 * p - k) // s + 1, (shape[2] + 2 * p - k) // s + 1]
        elif name in ("bn", "batchnorm"):
            layers.append(nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0]))
        elif name in ("maxpool", "avgpool"):
            k = int(args[0]) if args else 2
            s = int(args[1]) if len(args) > 1 else k
            pool = nn.MaxPool2d if name == "maxpool" else nn.AvgPool2d
            layers.append(pool(k, s))
            shape = [shape[0], (shape[1] - k) // s + 1, (shape[2] - k) // s + 1]
        elif name == "gap":
            layers.append(GlobalAvgPool())
            shape = [shape[0]]
        elif name == "fmp":
            k = int(args[0]) if args else 2
            r = float(args[1]) if len(args) > 1 else 1 / math.sqrt(2)
            layers.append(FractionalPool(k, r))
            shape = [shape[0], int(shape[1] * r), int(shape[2] * r)]
        elif name == "flatten":
            layers.append(nn.Flatten())
            shape = [math.prod(shape)]
        elif name == "dropout":
            layers.append(nn.Dropout(float(args[0]) if args else 0.5))
        elif name == "maxout":
            out, k = int(args[0]), int(args[1]) if len(args) > 1 else 2
            layers.append(Maxout(shape[0], out, k))
            shape = [out]
        elif name == "prelu":
            layers.append(nn.PReLU(1 if args == ["shared"] else shape[0]))
        elif name == "swish" and args == ["learned"]:
            layers.append(LearnedSwish())
        elif name == "act":
            layers.append(activation(init_act)())
        elif name == "softmax":
            layers.append(nn.Softmax(dim=1))
        elif name == "res":
            out = int(args[0])
            s = int(args[1]) if len(args) > 1 else 1
            p = float(args[2]) if len(args) > 2 else 0.0
            c = shape[0]
            branch = nn.Sequential(
                nn.BatchNorm2d(c), activation(init_act)(),
                nn.Conv2d(c, out, 3, s, 1, bias=False),
                nn.BatchNorm2d(out), activation(init_act)(),
                nn.Conv2d(out, out, 3, 1, 1, bias=False),
            )
            shortcut = nn.Conv2d(c, out, 1, s, 0, bias=False) if (s != 1 or c != out) else None
            layers.append(Residual(branch, shortcut, p))
            shape = [out, (shape[1] - 1) // s + 1, (shape[2] - 1) // s + 1]
        elif activation(tok) is not None:
            layers.append(activation(tok)())
        else:
            sys.exit(f"error: unknown model spec token {tok!r}")
    return nn.Sequential(*layers)


def read_idx_images(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    _, n, h, w = struct.unpack(">IIII", data[:16])
    x = torch.frombuffer(bytearray(data[16:16 + n * h * w]), dtype=torch.uint8)
    return x.view(n, 1, h, w).float() / 255.0


def read_idx_labels(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    return torch.frombuffer(bytearray(data[8:]), dtype=torch.uint8).long()


def find(data_dir, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(data_dir, name)
        if os.path.exists(p):
            return p
    sys.exit(f"error: no {stem}[.gz] in {data_dir}")


def preprocess(x, kind, t):
    """regimen's Preprocessor::apply on a [N, C, H, W] batch."""
    name = kind.split(":")[0]
    n, c, h, w = x.shape
    if name == "none":
        return x
    if name in ("center", "normalize"):
        return (x - t["mean"][0]) * (1.0 / t["std"][0])
    if name == "mean-image":
        return x - t["mean"].view(1, c, h, w)
    if name in ("channel-mean", "per-channel"):
        return (x - t["mean"].view(1, c, 1, 1)) * (1.0 / t["std"]).view(1, c, 1, 1)
    if name in ("pca", "whiten"):
        k = int(kind.split(":")[1])
        z = (x.reshape(n, -1) - t["mean"]) @ t["components"].view(k, -1).T
        if name == "whiten":
            z = z / torch.sqrt(t["eigenvalues"].clamp(min=0) + 1e-5)
        return z.view(n, k, 1, 1)
    sys.exit(f"error: unknown preprocessing {kind!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--compare", help="the CSV of `regimen predict` on the test images")
    a = ap.parse_args()

    with safe_open(a.checkpoint, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    input_shape = [int(v) for v in meta["input_shape"].split(",")]
    classes = int(meta["classes"])
    model = build(meta["model"], input_shape, classes)
    state = {k: v for k, v in tensors.items() if not k.startswith(("optim.", "preprocess."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        sys.exit(f"error: names differ: missing {missing}, unexpected {unexpected}")
    model.eval()

    x = read_idx_images(find(a.data_dir, "t10k-images-idx3-ubyte"))
    y = read_idx_labels(find(a.data_dir, "t10k-labels-idx1-ubyte"))
    pre = {k[len("preprocess."):]: v for k, v in tensors.items() if k.startswith("preprocess.")}
    x = preprocess(x, meta.get("preprocess.kind", "none"), pre)
    with torch.no_grad():
        probs = torch.cat([F.softmax(model(x[i:i + 500]), dim=1) for i in range(0, len(x), 500)])
    pred = probs.argmax(1)
    print(f"PyTorch: {a.checkpoint} ({meta['model']}) on {len(y)} test images: "
          f"accuracy {100 * (pred == y).float().mean().item():.2f}%")
    if a.compare:
        with open(a.compare) as f:
            rows = list(csv.DictReader(f))
        if len(rows) != len(y):
            sys.exit(f"error: {a.compare} has {len(rows)} rows, the test split {len(y)}")
        theirs = torch.tensor([int(r["class"]) for r in rows])
        p_theirs = torch.tensor([[float(r[f"p_{k}"]) for k in range(classes)] for r in rows])
        differ = (theirs != pred).nonzero().flatten().tolist()
        top2 = probs.topk(2, dim=1).values
        real = [i for i in differ if (top2[i, 0] - top2[i, 1]).item() > 1e-4]
        print(f"regimen predict: accuracy {100 * (theirs == y).float().mean().item():.2f}%; "
              f"{len(y) - len(differ)} of {len(y)} predicted classes identical "
              f"({len(differ) - len(real)} near ties differ); largest probability difference "
              f"{(p_theirs - probs).abs().max().item():.2e}")
        if real:
            print(f"error: classes differ at {real[:10]}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
