#!/usr/bin/env python3
"""PyTorch's side of regimen's whole-training benchmarks (mlp-fit, cnn-fit), on CPU or CUDA.

Data: Fashion-MNIST, 60,000 train / 10,000 test 28x28 grey images, read from the four gzip'd IDX
files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,
t10k-labels-idx1-ubyte.gz) in --data-dir (default /usr/share/datasets/fashion-mnist). Nothing is
downloaded. Pixels are scaled to [0, 1], then normalized by the training set's mean and standard
deviation (one scalar each, over all 60,000 training images), applied to both splits.

Recipes (--recipe):

  * mlp-fit: mlp-step's model (Flatten, Linear 784->512, ReLU, Dropout 0.2, Linear 512->512,
    ReLU, Dropout 0.2, Linear 512->10); Adam (lr 1e-3, betas 0.9/0.999, no weight decay);
    one-cycle schedule torch.optim.lr_scheduler.OneCycleLR(max_lr=1e-3,
    total_steps=epochs*steps_per_epoch, pct_start=0.2, cycle_momentum=False) stepped per batch;
    cross-entropy; batch 128; 20 epochs; shuffled each epoch; no augmentation.
  * cnn-fit: cnn-step's model ([Conv2d 3x3 pad 1 (no bias) -> BatchNorm2d -> ReLU] x2 (32 ch),
    MaxPool2d 2, [same] x2 (64 ch), MaxPool2d 2, Dropout 0.25, Flatten, Linear 3136->256, ReLU,
    Dropout 0.25, Linear 256->10); SGD with Nesterov momentum 0.9 and weight decay 5e-4;
    OneCycleLR(max_lr=0.1, total_steps=epochs*steps_per_epoch, pct_start=0.2,
    cycle_momentum=False) stepped per batch; cross-entropy with label smoothing 0.1; per-sample
    random crop (pad 2 with zeros, a 28x28 window at a uniform offset in 0..4 each way) then
    horizontal flip with p = 0.5; batch 256; 15 epochs; shuffled each epoch.

Both: the last, partial batch of an epoch is kept (steps_per_epoch = ceil(N / batch): 469 for
mlp-fit, 235 for cnn-fit), as regimen's loader does. OneCycleLR's other arguments keep PyTorch's
defaults (div_factor 25, final_div_factor 1e4, cosine annealing). cycle_momentum=False keeps SGD's
momentum at 0.9 and Adam's beta1 at 0.9 (regimen's one-cycle schedules the learning rate only).
Augmentation happens after normalization, so the crop's zero padding is zero in normalized
space, as in regimen, where preprocessing is applied to the dataset before the loader augments.

How the data is fed (a fast, good-faith baseline rather than a DataLoader): both splits are
normalized once and put on the device once (on CUDA: on the GPU). Each epoch draws one
torch.randperm on the device, and one advanced-indexing gather builds the whole shuffled (and for
cnn-fit augmented) epoch: the training set is zero-padded once up front, and per sample a random
crop offset and a flip bit pick the source rows and columns (a flipped sample reads its columns in
reverse, chosen with torch.where), so shuffling, cropping and flipping are one vectorized gather on
the device. The batches are then slices of that epoch tensor. On CPU the same is done with CPU
tensors under torch.set_num_threads(--threads) (default 2).

Modes (--mode): eager (default); compile = torch.compile(model, dynamic=False); graphs =
torch.compile(model, mode="reduce-overhead", dynamic=False) (CUDA graphs; CUDA only). Only the
model is compiled; loss, optimizer and schedule stay eager. On CUDA the optimizer is the fused
implementation (fused=True). --precision bf16 runs forward and loss under
torch.autocast(dtype=torch.bfloat16) (parameters and optimizer stay fp32); default fp32 with
PyTorch's default precision settings (reported). cudnn.benchmark is on for CUDA.

What is timed (time.perf_counter; on CUDA the device is synchronized before every clock read):

  * Not timed: reading and decoding the files, normalizing, the copy to the device
    (load_seconds), and a warm-up before the clock (warmup_seconds): forward and backward of the
    train batch shapes (full and partial) and evaluation forwards, a few times each, so that
    cuDNN autotuning and, in the compile modes, compilation and CUDA-graph capture are done
    before the clock; no optimizer step is taken and the model's parameters and buffers are
    restored afterwards, so training starts from the initial weights. Eager does each once,
    compile twice, graphs three times.
  * train_seconds: the sum over epochs of the training part (permutation, gather/augmentation,
    forward, loss, backward, optimizer and schedule steps).
  * eval_seconds: the sum of the test-set evaluations (eval mode, no grad, batch 1000): after
    each epoch with --eval each (the default on cuda), once after the last with --eval end (the
    default on cpu, as regimen's recipes, whose validation = 0 evaluates the test set once).
  * wall_seconds = train_seconds + eval_seconds, the time to finish.
  * time_to_93 (cnn-fit only): wall seconds (evaluations included) at the end of the first
    epoch whose test accuracy is at least 93% (with --eval end, only the last epoch is
    measured); null if never.
  * test_accuracy: after the last epoch.
  * peak_memory_mb: CPU: the process's peak resident set size (resource.getrusage ru_maxrss),
    MiB; CUDA: torch.cuda.max_memory_allocated() over the whole run, MiB. Both include the
    dataset held on the device (about 220 MB as float32, 270 MB with cnn-fit's padding), the
    epoch's shuffled copy (about 190 MB) and, on CUDA, the gather's index tensors for cnn-fit
    (on an H200: mlp-fit about 650 MiB, cnn-fit about 1.8 GiB), so they are upper bounds on
    what the model itself needs.

Per-epoch lines (epoch, train loss, test accuracy, seconds) go to stderr; a summary line, or one
JSON object with --json, to stdout. JSON keys: framework ("pytorch"), recipe, device, mode,
precision, epochs, batch, threads, train_images, train_seconds, eval_seconds, wall_seconds,
time_to_93 (cnn-fit only), test_accuracy, final_train_loss, epoch_seconds (per epoch, train +
eval), peak_memory_mb, load_seconds, warmup_seconds, torch (version), seed, and on CUDA: gpu (the
device name), cudnn_benchmark, cudnn_allow_tf32, matmul_precision.

Run (from the repository root; any python with torch):

    python bench/pytorch_fit.py --recipe mlp-fit --device cpu --json
    python bench/pytorch_fit.py --recipe cnn-fit --device cuda --mode graphs --json
    python bench/pytorch_fit.py --recipe cnn-fit --device cuda --precision bf16
    python bench/pytorch_fit.py --recipe mlp-fit --epochs 1          # a short run

Exit status: 0 on success, 2 on bad arguments (also --mode graphs on CPU, --device cuda without
CUDA, missing data files), 3 when torch.compile fails (one line on stderr).
"""

import argparse
import copy
import gzip
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch import (  # noqa: E402  (bench/pytorch.py, beside this file)
    MODES,
    check_mode_device,
    cnn_step_model,
    compile_failed,
    compile_model,
    cuda_settings,
    mlp_step_model,
)

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
EVAL_BATCH = 1000
TARGET = 0.93
PAD = 2  # cnn-fit's crop padding

RECIPES = {
    "mlp-fit": dict(model=mlp_step_model, batch=128, epochs=20, augment=False, label_smoothing=0.0),
    "cnn-fit": dict(model=cnn_step_model, batch=256, epochs=15, augment=True, label_smoothing=0.1),
}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip'd) as a uint8 array of its dimensions."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    count = math.prod(dims)
    if len(data) - start != count:
        raise ValueError(f"{path}: {len(data) - start} bytes of data for dimensions {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


def load(data_dir: str):
    """(train x [N,28,28] float32 normalized, train y int64, test x, test y, mean, std) on CPU."""
    arr = {k: read_idx(os.path.join(data_dir, f)) for k, f in FILES.items()}
    xtr = torch.from_numpy(arr["train_images"].astype(np.float32) / 255.0)
    xte = torch.from_numpy(arr["test_images"].astype(np.float32) / 255.0)
    mean = xtr.double().mean().item()
    std = xtr.double().std(unbiased=False).item()
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std
    ytr = torch.from_numpy(arr["train_labels"].astype(np.int64))
    yte = torch.from_numpy(arr["test_labels"].astype(np.int64))
    return xtr, ytr, xte, yte, mean, std


def epoch_gather(xsrc, perm, gen, augment: bool):
    """The epoch's shuffled (and augmented) inputs [N, 1, 28, 28] in one gather.

    Without augmentation xsrc is [N, 28, 28]; with it, the zero-padded [N, 28+2P, 28+2P] and each
    sample gets a crop offset (oy, ox) in 0..2P and a flip bit: out[i, y, x] =
    xsrc[perm[i], oy_i + y, ox_i + (27 - x if flip_i else x)].
    """
    if not augment:
        return xsrc[perm].unsqueeze(1)
    n, dev = perm.numel(), perm.device
    h = xsrc.shape[1] - 2 * PAD
    w = xsrc.shape[2] - 2 * PAD
    oy = torch.randint(0, 2 * PAD + 1, (n, 1), device=dev, generator=gen)
    ox = torch.randint(0, 2 * PAD + 1, (n, 1), device=dev, generator=gen)
    flip = torch.rand((n, 1), device=dev, generator=gen) < 0.5
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy + ar_h  # [n, h]
    cols = ox + torch.where(flip, (w - 1) - ar_w, ar_w)  # [n, w]
    out = xsrc[perm[:, None, None], rows[:, :, None], cols[:, None, :]]  # [n, h, w]
    return out.unsqueeze(1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", default="eager", choices=MODES, help="eager (default), compile, graphs")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's (20 / 15)")
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval",
        choices=["each", "end"],
        default=None,
        help="evaluate the test set after each epoch (each; the default on cuda, for time_to_93) "
        "or once after the last (end; the default on cpu, as regimen's recipes do with "
        "validation = 0)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    # Smoke tests only: train on the first N training images (statistics still from all 60,000).
    p.add_argument("--limit-train", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    check_mode_device(p, args.mode, args.device)
    rec = RECIPES[args.recipe]
    epochs = rec["epochs"] if args.epochs is None else args.epochs
    if epochs < 1:
        p.error("--epochs must be at least 1")
    if args.limit_train is not None and args.limit_train < 1:
        p.error("--limit-train must be at least 1")
    missing = [f for f in FILES.values() if not os.path.isfile(os.path.join(args.data_dir, f))]
    if missing:
        p.error(f"--data-dir {args.data_dir}: missing {', '.join(missing)}")

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # --- Data: read, normalize, put on the device (not timed in train/eval/wall). ---
    t0 = time.perf_counter()
    xtr, ytr, xte, yte, mean, std = load(args.data_dir)
    if args.limit_train is not None:
        xtr, ytr = xtr[: args.limit_train], ytr[: args.limit_train]
    if rec["augment"]:
        xtr = F.pad(xtr, (PAD, PAD, PAD, PAD))  # zero-padded once: [N, 28+2P, 28+2P]
    xtr, ytr = xtr.to(dev).contiguous(), ytr.to(dev)
    xte, yte = xte.unsqueeze(1).to(dev).contiguous(), yte.to(dev)
    sync()
    load_seconds = time.perf_counter() - t0
    n_train, n_test = ytr.numel(), yte.numel()
    batch = rec["batch"]
    steps_per_epoch = math.ceil(n_train / batch)
    total_steps = epochs * steps_per_epoch

    # --- Model, compiled per --mode. ---
    torch.manual_seed(args.seed)
    model = rec["model"]().to(dev)
    run_model = compile_model(model, args.mode)
    graphs = args.mode == "graphs"
    bf16 = args.precision == "bf16"
    ls = rec["label_smoothing"]

    def autocast():
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16)

    def forward_loss(xb, yb):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast():
            return F.cross_entropy(run_model(xb), yb, label_smoothing=ls)

    def evaluate() -> float:
        model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        with torch.no_grad():
            for i in range(0, n_test, EVAL_BATCH):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast():
                    out = run_model(xte[i : i + EVAL_BATCH])
                correct += (out.argmax(1) == yte[i : i + EVAL_BATCH]).sum()
        model.train()
        return correct.item() / n_test

    # --- Warm-up before the clock: every shape the run will see; weights restored after. ---
    sync()
    t0 = time.perf_counter()
    saved = copy.deepcopy(model.state_dict())
    shapes = sorted({batch if n_train >= batch else n_train, n_train % batch or batch})
    wx = torch.zeros((batch,) + tuple(xte.shape[1:]), device=dev)
    wy = torch.zeros(batch, dtype=torch.int64, device=dev)
    try:
        model.train()
        # eager: once (cuDNN autotuning); compile: twice; graphs: three times (CUDA graph trees
        # run a new shape once plainly, then record it, then replay it).
        for _ in range({"eager": 1, "compile": 2, "graphs": 3}[args.mode]):
            for b in shapes:
                model.zero_grad(set_to_none=True)
                forward_loss(wx[:b], wy[:b]).backward()
            evaluate()
        sync()
    except Exception as err:  # torch.compile compiles lazily, inside these first calls
        if args.mode == "eager":
            raise
        return compile_failed("pytorch_fit.py", args.mode, err)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved)  # in place: parameter and buffer addresses are kept
    del wx, wy, saved
    sync()
    warmup_seconds = time.perf_counter() - t0

    # --- Optimizer and schedule (made after the warm-up, so they start fresh). ---
    fused = {"fused": True} if cuda else {}
    if args.recipe == "mlp-fit":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, **fused)
        max_lr = 1e-3
    else:
        # As regimen: weight decay on weights only, not on biases and batch-norm parameters.
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        opt = torch.optim.SGD(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=0.1,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
            **fused,
        )
        max_lr = 0.1
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=total_steps, pct_start=0.2, cycle_momentum=False
    )

    torch.manual_seed(args.seed)  # dropout's stream, the same whatever the warm-up drew
    gen = torch.Generator(device=dev)
    gen.manual_seed(args.seed)

    # --- Training. ---
    each_epoch = (args.eval or ("each" if cuda else "end")) == "each"
    train_seconds = eval_seconds = 0.0
    time_to_93 = None
    acc = float("nan")
    train_loss = float("nan")
    epoch_seconds = []
    for epoch in range(1, epochs + 1):
        sync()
        t0 = time.perf_counter()
        perm = torch.randperm(n_train, device=dev, generator=gen)
        xe = epoch_gather(xtr, perm, gen, rec["augment"])
        ye = ytr[perm]
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        for s in range(steps_per_epoch):
            xb = xe[s * batch : (s + 1) * batch]
            yb = ye[s * batch : (s + 1) * batch]
            opt.zero_grad(set_to_none=True)
            loss = forward_loss(xb, yb)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum.add_(loss.detach().float(), alpha=yb.numel())
        sync()
        t1 = time.perf_counter()
        if each_epoch or epoch == epochs:
            acc = evaluate()  # .item() synchronizes
        sync()
        t2 = time.perf_counter()
        train_loss = loss_sum.item() / n_train
        train_seconds += t1 - t0
        eval_seconds += t2 - t1
        epoch_seconds.append(t2 - t0)
        if args.recipe == "cnn-fit" and time_to_93 is None and acc >= TARGET:
            time_to_93 = train_seconds + eval_seconds
        print(
            f"epoch {epoch:>3}/{epochs}  train loss {train_loss:.4f}  test acc {acc:.4f}  "
            f"train {t1 - t0:.2f} s  eval {t2 - t1:.2f} s  lr {sched.get_last_lr()[0]:.3g}",
            file=sys.stderr,
            flush=True,
        )
    wall_seconds = train_seconds + eval_seconds

    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {
        "framework": "pytorch",
        "recipe": args.recipe,
        "device": args.device,
        "mode": args.mode,
        "precision": args.precision,
        "epochs": epochs,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "train_images": n_train,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "wall_seconds": wall_seconds,
    }
    if args.recipe == "cnn-fit":
        out["time_to_93"] = time_to_93
    out.update(
        {
            "test_accuracy": acc,
            "final_train_loss": train_loss,
            "epoch_seconds": epoch_seconds,
            "peak_memory_mb": peak_mb,
            "load_seconds": load_seconds,
            "warmup_seconds": warmup_seconds,
            "torch": torch.__version__,
            "seed": args.seed,
        }
    )
    if cuda:
        out.update(cuda_settings())
    if args.json:
        print(json.dumps(out))
    else:
        where = args.device + (f" ({out['gpu']})" if cuda else f", {out['threads']} threads")
        t93 = ""
        if args.recipe == "cnn-fit":
            t93 = ", 93% never" if time_to_93 is None else f", 93% at {time_to_93:.2f} s"
        print(
            f"pytorch {args.recipe} {where} mode {args.mode} {args.precision}: {epochs} epochs on "
            f"{n_train} images, train {train_seconds:.2f} s + eval {eval_seconds:.2f} s = wall "
            f"{wall_seconds:.2f} s{t93}, test accuracy {acc:.4f}, peak memory {peak_mb:.0f} MiB "
            f"(load {load_seconds:.2f} s, warm-up {warmup_seconds:.2f} s, not counted)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
