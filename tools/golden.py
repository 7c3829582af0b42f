#!/usr/bin/env python3
"""Write the PyTorch reference fixtures for regimen's golden tests.

For each case: a small module (or loss) with fixed seeds, its input `x`, an upstream gradient
`dy`, and what PyTorch computes: the output `y`, `dx`, the gradient `g.<name>` of every
parameter `p.<name>`, and buffers before (`bi.<name>`) and after (`b.<name>`) the forward.
One safetensors file per case in crates/regimen/tests/fixtures/; the case's settings are in
the file's metadata. The tests (crates/regimen/tests/golden.rs) rebuild each case in regimen,
load the same parameters, and compare every tensor. Tests never need PyTorch.

Run: python tools/golden.py   (needs torch, safetensors; any recent version, CPU)
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "regimen", "tests", "fixtures")
torch.set_default_dtype(torch.float32)


def away_from_kinks(shape, seed):
    """Distinct values, none within 0.01 of zero or of each other (no ReLU kinks, no max ties)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    grid = (torch.arange(n, dtype=torch.float64) - n / 2 + 0.5) * (4.0 / n)
    return grid[torch.randperm(n, generator=g)].float().reshape(shape)


def randn(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def save(name, tensors, meta=None):
    tensors = {k: v.detach().contiguous().float() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT, name + ".safetensors"), metadata={k: str(v) for k, v in (meta or {}).items()})


def layer_case(name, module, x, mode="train", seed=1, forward=None, meta=None):
    """Run module on x in `mode`; record params, buffers, y, dy, dx and grads."""
    torch.manual_seed(seed)
    module.train(mode == "train")
    tensors = {}
    for n, p in module.named_parameters():
        tensors["p." + n] = p.detach().clone()
    for n, b in module.named_buffers():
        if b.dtype.is_floating_point and not n.startswith("_"):
            tensors["bi." + n] = b.detach().clone()
    x = x.clone().requires_grad_(True)
    y = forward(module, x) if forward else module(x)
    dy = randn(y.shape, seed + 100)
    y.backward(dy)
    tensors.update({"x": x, "y": y, "dy": dy, "dx": x.grad})
    for n, p in module.named_parameters():
        tensors["g." + n] = p.grad
    for n, b in module.named_buffers():
        if b.dtype.is_floating_point and not n.startswith("_"):
            tensors["b." + n] = b.detach().clone()
    save(name, tensors, dict(meta or {}, mode=mode))


class Maxout(nn.Module):
    def __init__(self, i, o, k):
        super().__init__()
        self.o, self.k = o, k
        self.linear = nn.Linear(i, o * k)

    def forward(self, x):
        return self.linear(x).view(x.shape[0], self.o, self.k).max(-1).values


class LearnedSwish(nn.Module):
    def __init__(self, beta):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor([beta]))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class Residual(nn.Module):
    """y = x + s * branch(x); in eval with stochastic depth p, s = 1 - p."""

    def __init__(self, branch, scale=1.0):
        super().__init__()
        self.branch, self.scale = branch, scale

    def forward(self, x):
        return x + self.scale * self.branch(x)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    layer_case("linear", nn.Linear(5, 4), randn((3, 5), 1))
    layer_case("sequential_mlp", nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), randn((4, 6), 2))
    layer_case("conv_s1p1", nn.Conv2d(2, 3, 3, padding=1), randn((2, 2, 5, 5), 3))
    layer_case("conv_s2p0_nobias", nn.Conv2d(2, 3, 3, stride=2, bias=False), randn((2, 2, 7, 7), 4))
    layer_case("conv_1x1", nn.Conv2d(3, 4, 1), randn((2, 3, 4, 4), 5))
    layer_case("conv_s2p1", nn.Conv2d(2, 3, 3, stride=2, padding=1), randn((2, 2, 7, 6), 60))
    # More than 4 input channels: regimen's weight gradient with vectors along output channels.
    layer_case("conv_wide", nn.Conv2d(6, 20, 3, padding=1), randn((3, 6, 6, 7), 61))
    layer_case("maxpool_k2", nn.MaxPool2d(2), away_from_kinks((2, 2, 6, 6), 6))
    layer_case("maxpool_k3s2p1", nn.MaxPool2d(3, stride=2, padding=1), away_from_kinks((2, 2, 7, 7), 7))
    layer_case("avgpool_k2", nn.AvgPool2d(2), randn((2, 2, 6, 6), 8))
    layer_case("avgpool_k3s2p1", nn.AvgPool2d(3, stride=2, padding=1), randn((2, 2, 7, 7), 9))
    layer_case("global_avg_pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), randn((2, 3, 4, 5), 10))
    samples = torch.rand(2, 2, 2, generator=torch.Generator().manual_seed(11))
    frac = nn.FractionalMaxPool2d(2, output_size=(4, 5), _random_samples=samples)
    layer_case("fractional_max_pool", frac, away_from_kinks((2, 2, 9, 10), 12), meta={"samples": ",".join(f"{v:.9g}" for v in samples.flatten().tolist())})
    for mode in ("train", "eval"):
        bn1 = nn.BatchNorm1d(4)
        bn2 = nn.BatchNorm2d(3)
        with torch.no_grad():
            for bn, s in ((bn1, 13), (bn2, 14)):
                bn.weight.copy_(1 + 0.5 * randn(bn.weight.shape, s))
                bn.bias.copy_(randn(bn.bias.shape, s + 1))
                bn.running_mean.copy_(randn(bn.running_mean.shape, s + 2))
                bn.running_var.copy_(1 + randn(bn.running_var.shape, s + 3).abs())
        layer_case(f"batchnorm1d_{mode}", bn1, 2 + 3 * randn((6, 4), 15), mode=mode)
        layer_case(f"batchnorm2d_{mode}", bn2, randn((3, 3, 4, 4), 16), mode=mode)
    layer_case("maxout", Maxout(5, 4, 3), randn((3, 5), 17))
    acts = {
        "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "relu": nn.ReLU(), "leaky_relu_0.1": nn.LeakyReLU(0.1),
        "elu_1": nn.ELU(1.0), "elu_0.5": nn.ELU(0.5), "selu": nn.SELU(), "softplus": nn.Softplus(),
        "gelu": nn.GELU(), "mish": nn.Mish(), "swish_1": nn.SiLU(), "softmax": nn.Softmax(dim=1),
    }
    for i, (n, m) in enumerate(acts.items()):
        layer_case("act_" + n, m, 3 * away_from_kinks((3, 7), 20 + i))
    layer_case("act_swish_1.5", nn.Identity(), 3 * away_from_kinks((3, 7), 40), forward=lambda m, x: x * torch.sigmoid(1.5 * x))
    layer_case("prelu_channels", nn.PReLU(3, init=0.2), away_from_kinks((2, 3, 4), 41))
    layer_case("prelu_shared", nn.PReLU(1, init=0.3), away_from_kinks((2, 3, 4), 42))
    layer_case("swish_learned", LearnedSwish(0.8), 2 * away_from_kinks((3, 6), 43))
    branch = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    layer_case("residual_train", Residual(branch), randn((2, 2, 4, 4), 44))
    branch = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    layer_case("residual_sd0.2_eval", Residual(branch, scale=0.8), randn((2, 2, 4, 4), 45), mode="eval")

    # Losses: x = logits or predictions, `loss`, `dx` = d loss / d x.
    def loss_case(name, x, fn, extra):
        x = x.clone().requires_grad_(True)
        loss = fn(x)
        loss.backward()
        save(name, dict(extra, x=x, loss=loss.reshape(1), dx=x.grad))

    logits = 2 * randn((5, 4), 50)
    labels = torch.tensor([0, 3, 1, 3, 2])
    soft = torch.softmax(randn((5, 4), 51), dim=1)
    loss_case("ce_hard", logits, lambda z: F.cross_entropy(z, labels), {"labels": labels})
    loss_case("ce_hard_smooth0.1", logits, lambda z: F.cross_entropy(z, labels, label_smoothing=0.1), {"labels": labels})
    loss_case("ce_soft", logits, lambda z: F.cross_entropy(z, soft), {"target": soft})
    loss_case("ce_soft_smooth0.2", logits, lambda z: F.cross_entropy(z, soft, label_smoothing=0.2), {"target": soft})
    t = randn((3, 4), 52)
    loss_case("mse", randn((3, 4), 53), lambda p: F.mse_loss(p, t), {"target": t})
    w = randn((4, 3), 54)
    loss_case("penalty_l2_0.01", w, lambda v: 0.01 * (v ** 2).sum(), {})
    loss_case("penalty_l1_0.01", w, lambda v: 0.01 * v.abs().sum(), {})
    loss_case("penalty_elastic_0.01_0.5", w, lambda v: 0.01 * (0.5 * v ** 2 + v.abs()).sum(), {})
    print("wrote", len(os.listdir(OUT)), "fixtures to", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
