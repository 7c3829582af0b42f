#!/usr/bin/env python3
"""Read a regimen run folder's TensorBoard event files with TensorBoard's own reader and check
them against its metrics.csv.

    python tools/check_tensorboard.py runs/RUN

For every epoch row of metrics.csv, the `epoch/*` scalars at step = epoch must hold the same
values (as float32): train_loss, train_acc, val_loss, val_acc, gap, lr. The `step/*` scalars
(loss, lr, gradient norm every --log-every updates) are counted. Exit status 1 on a mismatch.
Needs the `tensorboard` Python package.
"""

import csv
import struct
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def f32(v):
    return struct.unpack("f", struct.pack("f", float(v)))[0]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    run = sys.argv[1]
    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    with open(f"{run}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    bad = 0
    for col in ["train_loss", "train_acc", "val_loss", "val_acc", "gap", "lr"]:
        tag = f"epoch/{col}"
        want = {int(r["epoch"]): f32(r[col]) for r in rows if r[col] != ""}
        if not want:
            continue
        if tag not in tags:
            print(f"missing tag {tag}")
            bad += 1
            continue
        # The last event of a step wins (a resumed run may have logged an epoch twice).
        have = {e.step: e.value for e in acc.Scalars(tag)}
        for epoch, v in want.items():
            if have.get(epoch) != v:
                print(f"{tag} epoch {epoch}: metrics.csv {v}, TensorBoard {have.get(epoch)}")
                bad += 1
    steps = {t: len(acc.Scalars(t)) for t in tags if t.startswith("step/")}
    print(f"{run}: {len(rows)} epochs checked against metrics.csv, "
          f"{'all equal' if not bad else f'{bad} mismatches'}; per-step scalars: {steps}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
