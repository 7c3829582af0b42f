#!/usr/bin/env python3
"""Write the PyTorch reference fixtures for regimen's optimizer and learning-rate-schedule tests.

Optimizers: one safetensors file per case in crates/regimen/tests/fixtures/optim/<case>.safetensors.
Every case trains the same tiny problem from the same start:
    torch.manual_seed(0); model = Sequential(Linear(4, 3), Tanh(), Linear(3, 2))
    x = randn(8, 4) (generator seed 1), labels = [0,1,1,0,1,0,0,1], loss = cross_entropy (mean)
    each step: zero_grad, loss, backward, opt.step()
with two parameter groups, as regimen sets them up by default: the weights ("0.weight",
"2.weight") with the case's weight_decay, the biases ("0.bias", "2.bias") with weight_decay 0;
every other hyperparameter is the same in both groups. foreach=False (plain per-tensor path).
Tensors (float32): "x" [8,4], "labels" [8] (class ids as floats), "p0.<name>" the initial
parameters, "p1.<name>" after 1 step, "p20.<name>" after 20 steps, and "loss" [20], the loss
computed at each of the 20 steps (before that step's update).
Metadata (strings): "optimizer" (sgd, adagrad, rmsprop, adam or adamw), "steps" ("20") and
every hyperparameter, floats written with repr() so they parse back exactly, booleans as
"true"/"false":
    sgd:            lr, momentum, dampening, nesterov, weight_decay
    adagrad:        lr, lr_decay, weight_decay, eps, initial_accumulator_value
    rmsprop:        lr, alpha, eps, weight_decay, momentum, centered
    adam / adamw:   lr, beta1, beta2, eps, weight_decay, amsgrad

Schedules: crates/regimen/tests/fixtures/schedules.json, a list of cases
    {"name", "scheduler" (PyTorch class name), "params" (constructor arguments), "base_lr",
     "steps", "lrs"[, "metrics"]}
where lrs[t] is optimizer.param_groups[0]["lr"] read before the t-th scheduler.step(), i.e. the
lr used by the t-th optimizer step. Each iteration: read lr, opt.step() (dummy SGD on one
parameter, lr=base_lr, momentum 0.9), scheduler.step() (ReduceLROnPlateau: step(metrics[t])).
SequentialLR's params are {"schedulers": [{"scheduler", "params"}, ...], "milestones"}.

Tests never need PyTorch. Run: python tools/golden_optim.py   (needs torch, safetensors; CPU)
"""
import json
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(__file__)
FIXTURES = os.path.join(HERE, "..", "crates", "regimen", "tests", "fixtures")
OPTIM_OUT = os.path.join(FIXTURES, "optim")
SCHEDULES_OUT = os.path.join(FIXTURES, "schedules.json")
STEPS = 20
torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------- optimizers

def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    return model, x, labels


def groups(model, weight_decay):
    named = dict(model.named_parameters())
    return [
        {"params": [named["0.weight"], named["2.weight"]], "weight_decay": weight_decay},
        {"params": [named["0.bias"], named["2.bias"]], "weight_decay": 0.0},
    ]


def make_optimizer(kind, model, hp):
    wd = hp["weight_decay"]
    g = groups(model, wd)
    if kind == "sgd":
        return torch.optim.SGD(g, lr=hp["lr"], momentum=hp["momentum"], dampening=hp["dampening"],
                               nesterov=hp["nesterov"], weight_decay=wd, foreach=False)
    if kind == "adagrad":
        return torch.optim.Adagrad(g, lr=hp["lr"], lr_decay=hp["lr_decay"], weight_decay=wd, eps=hp["eps"],
                                   initial_accumulator_value=hp["initial_accumulator_value"], foreach=False)
    if kind == "rmsprop":
        return torch.optim.RMSprop(g, lr=hp["lr"], alpha=hp["alpha"], eps=hp["eps"], weight_decay=wd,
                                   momentum=hp["momentum"], centered=hp["centered"], foreach=False)
    if kind in ("adam", "adamw"):
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        return cls(g, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"], weight_decay=wd,
                   amsgrad=hp["amsgrad"], foreach=False)
    raise ValueError(kind)


DEFAULTS = {
    "sgd": {"lr": 0.1, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    "adagrad": {"lr": 0.01, "lr_decay": 0.0, "weight_decay": 0.0, "eps": 1e-10, "initial_accumulator_value": 0.0},
    "rmsprop": {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False},
    "adam": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False},
    "adamw": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False},
}

OPT_CASES = [
    ("sgd_lr0.1", "sgd", {"lr": 0.1}),
    ("sgd_momentum0.9", "sgd", {"lr": 0.1, "momentum": 0.9}),
    ("sgd_momentum0.9_dampening0.1", "sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}),
    ("sgd_nesterov0.9", "sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("sgd_nesterov0.9_wd0.01", "sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("sgd_wd0.05", "sgd", {"lr": 0.1, "weight_decay": 0.05}),
    ("adagrad_lr0.1", "adagrad", {"lr": 0.1}),
    ("adagrad_lrdecay0.01_wd0.01", "adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}),
    ("adagrad_init0.1_eps1e-6", "adagrad", {"lr": 0.1, "initial_accumulator_value": 0.1, "eps": 1e-6}),
    ("rmsprop_lr0.01", "rmsprop", {"lr": 0.01}),
    ("rmsprop_centered", "rmsprop", {"lr": 0.01, "centered": True}),
    ("rmsprop_momentum0.9", "rmsprop", {"lr": 0.01, "momentum": 0.9}),
    ("rmsprop_centered_momentum0.5_wd0.01", "rmsprop",
     {"lr": 0.01, "centered": True, "momentum": 0.5, "weight_decay": 0.01}),
    ("rmsprop_alpha0.9_eps1e-6", "rmsprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-6}),
    ("adam_lr0.01", "adam", {"lr": 0.01}),
    ("adam_betas0.8_0.95_eps1e-6", "adam", {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6}),
    ("adam_amsgrad", "adam", {"lr": 0.01, "amsgrad": True}),
    ("adam_wd0.01", "adam", {"lr": 0.01, "weight_decay": 0.01}),
    ("adam_amsgrad_wd0.01", "adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01}),
    ("adamw_lr0.01_wd0.1", "adamw", {"lr": 0.01, "weight_decay": 0.1}),
    ("adamw_amsgrad_wd0.05", "adamw", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.05}),
]


def meta_str(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(float(v))


def optim_case(name, kind, overrides):
    hp = dict(DEFAULTS[kind], **overrides)
    model, x, labels = problem()
    opt = make_optimizer(kind, model, hp)
    snap = lambda tag: {f"{tag}.{n}": p.detach().clone() for n, p in model.named_parameters()}
    tensors = {"x": x, "labels": labels.float()}
    tensors.update(snap("p0"))
    losses = []
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 1:
            tensors.update(snap("p1"))
    tensors.update(snap("p20"))
    tensors["loss"] = torch.tensor(losses)
    meta = {"optimizer": kind, "steps": str(STEPS)}
    meta.update({k: meta_str(v) for k, v in hp.items()})
    tensors = {k: v.detach().contiguous().float() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OPTIM_OUT, name + ".safetensors"), metadata=meta)
    return losses


# ---------------------------------------------------------------- schedules

BASE_LR = 0.1
S = torch.optim.lr_scheduler


def dummy_optimizer():
    p = nn.Parameter(torch.zeros(1))
    p.grad = torch.zeros(1)
    return torch.optim.SGD([p], lr=BASE_LR, momentum=0.9)


def make_scheduler(cls_name, params, opt):
    if cls_name == "SequentialLR":
        subs = [getattr(S, s["scheduler"])(opt, **s["params"]) for s in params["schedulers"]]
        return S.SequentialLR(opt, subs, milestones=params["milestones"])
    return getattr(S, cls_name)(opt, **params)


def schedule_case(name, cls_name, params, steps, metrics=None):
    opt = dummy_optimizer()
    sched = make_scheduler(cls_name, params, opt)
    lrs = []
    for t in range(steps):
        lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        if metrics is not None:
            sched.step(metrics[t])
        else:
            sched.step()
    case = {"name": name, "scheduler": cls_name, "params": params, "base_lr": BASE_LR, "steps": steps, "lrs": lrs}
    if metrics is not None:
        case["metrics"] = metrics
    return case


# Improves, plateaus (tiny "improvements" below the 1e-4 relative threshold count as no
# improvement), improves again, long plateau that drives the lr down to min_lr (clamped),
# a final improvement.
PLATEAU_METRICS = [
    1.0, 0.9, 0.8, 0.8, 0.79995, 0.8, 0.81, 0.7, 0.7, 0.7, 0.7, 0.69, 0.6, 0.6, 0.6,
    0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.5,
]

SCHEDULE_CASES = [
    ("step_lr", "StepLR", {"step_size": 3, "gamma": 0.5}, 20),
    ("multistep_lr", "MultiStepLR", {"milestones": [5, 8, 12], "gamma": 0.1}, 20),
    ("exponential_lr", "ExponentialLR", {"gamma": 0.9}, 20),
    ("cosine_annealing", "CosineAnnealingLR", {"T_max": 10, "eta_min": 0.001}, 11),
    ("linear_warmup", "LinearLR", {"start_factor": 0.25, "end_factor": 1.0, "total_iters": 4}, 10),
    ("constant_warmup", "ConstantLR", {"factor": 0.1, "total_iters": 3}, 8),
    ("polynomial_power2", "PolynomialLR", {"total_iters": 10, "power": 2.0}, 14),
    ("polynomial_power1", "PolynomialLR", {"total_iters": 10, "power": 1.0}, 14),
    ("cyclic_triangular", "CyclicLR",
     {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 4, "mode": "triangular"}, 30),
    ("cyclic_triangular2", "CyclicLR",
     {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 4, "mode": "triangular2"}, 30),
    ("cyclic_exp_range", "CyclicLR",
     {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 4, "mode": "exp_range", "gamma": 0.9}, 30),
    ("cyclic_up3_down5", "CyclicLR",
     {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 3, "step_size_down": 5, "mode": "triangular"}, 24),
    ("onecycle_cos", "OneCycleLR",
     {"max_lr": 0.1, "total_steps": 20, "pct_start": 0.3, "anneal_strategy": "cos",
      "div_factor": 25.0, "final_div_factor": 1e4}, 20),
    ("onecycle_linear", "OneCycleLR",
     {"max_lr": 0.1, "total_steps": 20, "pct_start": 0.3, "anneal_strategy": "linear",
      "div_factor": 25.0, "final_div_factor": 1e4}, 20),
    ("onecycle_three_phase", "OneCycleLR",
     {"max_lr": 0.1, "total_steps": 20, "pct_start": 0.3, "anneal_strategy": "cos",
      "div_factor": 25.0, "final_div_factor": 1e4, "three_phase": True}, 20),
    ("warm_restarts_t5", "CosineAnnealingWarmRestarts", {"T_0": 5, "T_mult": 1, "eta_min": 0.001}, 22),
    ("warm_restarts_t3_mult2", "CosineAnnealingWarmRestarts", {"T_0": 3, "T_mult": 2, "eta_min": 0.0}, 30),
    ("sequential_linear_cosine", "SequentialLR",
     {"schedulers": [
         {"scheduler": "LinearLR", "params": {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 3}},
         {"scheduler": "CosineAnnealingLR", "params": {"T_max": 10, "eta_min": 0.0}}],
      "milestones": [3]}, 14),
]


def main():
    os.makedirs(OPTIM_OUT, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. SequentialLR's step(epoch) deprecation; see report
        for name, kind, hp in OPT_CASES:
            losses = optim_case(name, kind, hp)
            print(f"{name:40s} loss {losses[0]:.6f} -> {losses[-1]:.6f}")
        cases = [schedule_case(*c) for c in SCHEDULE_CASES]
        cases.append(schedule_case(
            "plateau_min", "ReduceLROnPlateau",
            {"mode": "min", "factor": 0.5, "patience": 2, "threshold": 1e-4, "threshold_mode": "rel",
             "cooldown": 1, "min_lr": 0.001},
            len(PLATEAU_METRICS), metrics=PLATEAU_METRICS))
    with open(SCHEDULES_OUT, "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")
    for c in cases:
        print(f"{c['name']:28s}", " ".join(f"{v:.4g}" for v in c["lrs"]))
    print("wrote", len(OPT_CASES), "optimizer fixtures to", os.path.normpath(OPTIM_OUT))
    print("wrote", len(cases), "schedule cases to", os.path.normpath(SCHEDULES_OUT))


if __name__ == "__main__":
    main()
