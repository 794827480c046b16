"""2-rank CPU DDP (gloo): trainyard's step time against a hand-written torch DDP loop on
the same model (the default CNN), data (digits), batch (64 per rank) and optimizer (Adam).

Both sides time the interval between consecutive batch starts inside an epoch (loading,
forward, backward, all-reduce, optimizer, hooks), skip warm-up steps, and run alternately
so machine load hits both alike. Target: trainyard within 5% (ratio <= 1.05).

Usage: python benchmarks/ddp_step.py [--repeats 3] [--epochs 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import BIN, env, median, report

BATCH, LR, SKIP = 64, 1e-3, 5


def _plain_rank(rank: int, world: int, port: int, epochs: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from trainyard.data import DigitsDataModule
    from trainyard.models import CNN

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(42)
    data = DigitsDataModule(seed=42, batch_size=BATCH)
    data.setup()
    sampler = DistributedSampler(data.train_set, shuffle=True, seed=42)
    loader = DataLoader(data.train_set, batch_size=BATCH, sampler=sampler)
    model = DistributedDataParallel(CNN(data.input_shape, data.num_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    steps, seen = [], 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        last = None
        for x, y in _timed(loader):
            now = time.perf_counter()
            if last is not None:
                seen += 1
                if seen > SKIP:
                    steps.append(now - last)
            last = now
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
    if rank == 0:
        Path(out).write_text(json.dumps(steps))
    dist.destroy_process_group()


def _timed(loader):
    yield from loader


def plain_step(epochs: int, tmp: Path) -> float:
    out = tmp / "plain.json"
    port = 29000 + os.getpid() % 1000
    mp.spawn(_plain_rank, args=(2, port, epochs, str(out)), nprocs=2, join=True)
    return statistics.median(json.loads(out.read_text()))


def trainyard_step(epochs: int, tmp: Path, index: int) -> float:
    args = [
        str(BIN / "trainyard-train"),
        f"name=ddpbench{index}",
        "trainer=ddp",
        "trainer.devices=2",
        f"trainer.max_epochs={epochs}",
        f"data.batch_size={BATCH}",
        f"optimizer.lr={LR}",
        "callbacks.early_stopping=null",
        "test_after_fit=false",
        "+callbacks.timer._target_=trainyard.callbacks.timing.StepTimer",
        f"+callbacks.timer.skip_first={SKIP}",
    ]
    subprocess.run(args, check=True, capture_output=True, env=env(TRAINYARD_ROOT=str(tmp)))
    timing = next(tmp.glob(f"outputs/ddpbench{index}/runs/*/ranks/timing_rank0.json"))
    return statistics.median(json.loads(timing.read_text())["step_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            plain.append(plain_step(args.epochs, Path(tmp)))
            ours.append(trainyard_step(args.epochs, Path(tmp), i))
    report(
        f"2-rank CPU DDP step time (median of {args.repeats} runs x ~{args.epochs * 10} steps)",
        [
            ("hand-written torch DDP loop [ms/step]", 1e3 * median(plain), "baseline"),
            ("trainyard-train trainer=ddp devices=2 [ms/step]", 1e3 * median(ours), ""),
            ("ratio trainyard / hand-written", median(ours) / median(plain), "target <= 1.05"),
        ],
    )


if __name__ == "__main__":
    main()
