#!/usr/bin/env python3
"""PyTorch's side of regimen's training-step benchmarks (mlp-step, cnn-step), on CPU or CUDA.

What it measures: training steps per second of one fixed model on one fixed synthetic batch,
exactly what `regimen bench` times on its side (crates/regimen-cli/src/bench.rs):

  * mlp-step: Flatten, Linear 784->512, ReLU, Dropout 0.2, Linear 512->512, ReLU, Dropout 0.2,
    Linear 512->10.
  * cnn-step: [Conv2d 3x3 pad 1 (no bias) -> BatchNorm2d -> ReLU] x2 (32 ch, input 1 ch),
    MaxPool2d 2, [same] x2 (64 ch), MaxPool2d 2, Dropout 0.25, Flatten, Linear 3136->256, ReLU,
    Dropout 0.25, Linear 256->10.

Input: randn [B, 1, 28, 28] and random labels in 0..10, fixed seed, made once on the device (no
data loading or host-to-device copy is timed). One step = zero_grad, forward in train mode,
F.cross_entropy (mean), backward, plain torch.optim.SGD(lr=0.01) step.

Modes (--mode):

  * eager (default): the model as is.
  * compile: torch.compile(model) in its default mode (Inductor), dynamic=False. Only the model
    (forward and backward) is compiled; the loss and the optimizer step stay eager.
  * graphs: torch.compile(model, mode="reduce-overhead", dynamic=False): Inductor plus CUDA graphs
    (CUDA graph trees); CUDA only, refused on CPU.

If torch.compile fails (no C compiler, no Triton, an Inductor error, ...), the script prints one
line to stderr and exits with status 3, so that a caller can skip that mode.

Timing protocol: warm-up steps, then `--reps` repetitions of `--steps` steps each; the median
repetition's steps/s is reported (sorted[len // 2], as regimen does). On CUDA the device is
synchronized before every clock read (cudnn.benchmark is on; PyTorch's default precision
settings are kept and reported). Warm-up: eager runs exactly `--warmup` steps (default 5), untimed.
The compile modes run at least max(--warmup, 20) steps and then go on until two consecutive steps
(each synchronized and timed) differ by at most 20%, at most 200 steps more, so compilation and
graph capture never land inside the timed reps; the steps and seconds that took are reported as
warmup_steps and warmup_seconds.

CPU runs use `--threads` intra-op threads (torch.set_num_threads; default 2).

Run (from the repository root; any python with torch):

    python bench/pytorch.py --workload mlp-step --batch 128
    python bench/pytorch.py --workload cnn-step --batch 512 --json
    python bench/pytorch.py --workload cnn-step --batch 128 --device cuda --mode graphs --json
    python bench/pytorch.py --workload mlp-step --mode compile --steps 20 --reps 3

`--json` prints one line in the same format as `regimen bench --json` (framework "pytorch",
workload, batch, threads, steps_per_s, reps) with extra keys: device, mode, warmup_steps,
warmup_seconds, torch (version), and on CUDA gpu (the device name), cudnn_benchmark,
cudnn_allow_tf32 and matmul_precision. To compare both sides interleaved, use `bench/compare`.

Exit status: 0 on success, 2 on bad arguments (argparse, also --mode graphs on CPU or --device cuda
without CUDA), 3 when torch.compile fails.
"""

import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

COMPILE_FAILED = 3


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
MODES = ("eager", "compile", "graphs")


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """The model as run in `mode` (eager: unchanged). torch.compile is lazy: errors come later."""
    if mode == "eager":
        return model
    if mode == "compile":
        return torch.compile(model, dynamic=False)
    return torch.compile(model, mode="reduce-overhead", dynamic=False)


def compile_failed(script: str, mode: str, err: BaseException) -> int:
    """One line on stderr saying that torch.compile failed; the status for the caller to skip."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if len(first) > 300:
        first = first[:300] + "..."
    print(
        f"{script}: torch.compile failed (--mode {mode}), skipping: {type(err).__name__}: {first}",
        file=sys.stderr,
    )
    return COMPILE_FAILED


def cuda_settings() -> dict:
    """PyTorch's precision-relevant CUDA settings, to report next to the numbers."""
    return {
        "gpu": torch.cuda.get_device_name(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_precision": torch.get_float32_matmul_precision(),
    }


def check_mode_device(p: argparse.ArgumentParser, mode: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available to this PyTorch")
    if mode == "graphs" and device != "cuda":
        p.error(
            "--mode graphs is torch.compile(mode='reduce-overhead'), i.e. CUDA graphs: it needs "
            "--device cuda (use --mode compile on CPU)"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="mlp-step", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps (compile modes: >= 20)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", default="eager", choices=MODES, help="eager (default), compile, graphs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    if args.batch < 1 or args.steps < 1 or args.reps < 1 or args.warmup < 0:
        p.error("--batch, --steps and --reps must be at least 1, --warmup at least 0")
    check_mode_device(p, args.mode, args.device)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = MODELS[args.workload]().to(dev)
    model.train()
    run_model = compile_model(model, args.mode)
    b = args.batch
    x = torch.randn(b, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (b,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    graphs = args.mode == "graphs"

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad()
        loss = F.cross_entropy(run_model(x), y)
        loss.backward()
        opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # Warm-up (untimed). Compile modes: long enough that compilation and graph capture are over.
    sync()
    t_warm = time.perf_counter()
    warm_steps = 0
    if args.mode == "eager":
        for _ in range(args.warmup):
            step()
        warm_steps = args.warmup
    else:
        least = max(args.warmup, 20)
        prev = None
        try:
            while True:
                sync()
                t = time.perf_counter()
                step()
                sync()
                dt = time.perf_counter() - t
                warm_steps += 1
                if warm_steps >= least and prev is not None and abs(dt - prev) <= 0.2 * max(dt, prev):
                    break
                if warm_steps >= least + 200:
                    print(
                        f"pytorch.py: warm-up: step times still differ by over 20% after "
                        f"{warm_steps} steps ({prev:.6f} s, {dt:.6f} s); timing anyway",
                        file=sys.stderr,
                    )
                    break
                prev = dt
        except Exception as err:  # torch.compile compiles lazily, inside the first steps
            return compile_failed("pytorch.py", args.mode, err)
    sync()
    warm_seconds = time.perf_counter() - t_warm

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
        out = {
            "framework": "pytorch",
            "workload": args.workload,
            "batch": b,
            "threads": threads,
            "steps_per_s": median,
            "reps": rates,
            "device": args.device,
            "mode": args.mode,
            "warmup_steps": warm_steps,
            "warmup_seconds": warm_seconds,
            "torch": torch.__version__,
        }
        if dev.type == "cuda":
            out.update(cuda_settings())
        print(json.dumps(out))
    else:
        reps = ", ".join(f"{r:.2f}" for r in rates)
        where = args.device
        if dev.type == "cuda":
            where += f" ({torch.cuda.get_device_name()})"
        print(
            f"pytorch {args.workload} batch {b} threads {threads} device {where} mode {args.mode}: "
            f"{median:.2f} steps/s (reps: [{reps}]; warm-up {warm_steps} steps, "
            f"{warm_seconds:.2f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
