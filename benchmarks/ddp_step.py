"""2-rank CPU DDP (gloo): per-step time side by side, as ratios to a hand-written DDP loop,
on the same model (the default CNN), data (digits), batch (64 per rank) and optimizer (Adam):

- plain:          a hand-written torch DDP loop as a user writes it: a standard DataLoader
                  over a TensorDataset with a DistributedSampler. The reference.
- plain-indexed:  the same loop with the data held in memory, each batch taken by indexing
                  the rank's DistributedSampler order (what trainyard's data path does)
- lightning-bare: a bare Lightning Trainer (strategy ddp) with a minimal LightningModule and
                  the standard DataLoader, Lightning as shipped (it adds the sampler itself);
                  its ranks are started the way trainyard starts them (LOCAL_RANK set)
- trainyard:      trainyard-train trainer=ddp trainer.devices=2

Every variant times the interval between consecutive batch starts inside an epoch (loading,
forward, backward, all-reduce, optimizer, hooks) on rank 0, skips warm-up steps, and the
variants run in turn so machine load hits them alike. Target (issue 10): trainyard / plain
<= 1.00.

Usage: python benchmarks/ddp_step.py [--repeats 3] [--epochs 12]
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import BIN, RATIOS, command_line, env, goal, median, report
from _loops import BARE_TRAINER

BATCH, LR, SKIP, WORLD = 64, 1e-3, 5, 2


class EpochTimer:
    """Gaps between batch starts within each epoch, after the first SKIP of the run."""

    def __init__(self):
        self.steps: list[float] = []
        self._last: float | None = None
        self._seen = 0

    def new_epoch(self) -> None:
        self._last = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._seen += 1
            if self._seen > SKIP:
                self.steps.append(now - self._last)
        self._last = now


def _join(rank: int, port: int) -> None:
    """This process as rank ``rank``: the variables trainyard's launcher sets for its ranks."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    torch.manual_seed(42)


def _digits():
    from trainyard.data import DigitsDataModule

    data = DigitsDataModule(seed=42, batch_size=BATCH)
    data.setup()
    return data


def _plain_rank(rank: int, port: int, epochs: int, out: str, indexed: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from trainyard.models import CNN

    _join(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    data = _digits()
    x, y = data.train_set.tensors
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, shuffle=True, seed=42)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    model = DistributedDataParallel(CNN(data.input_shape, data.num_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    timer = EpochTimer()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        timer.new_epoch()
        for xb, yb in _by_index(x, y, sampler) if indexed else loader:
            timer.tick()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            optimizer.step()
    if rank == 0:
        Path(out).write_text(json.dumps(timer.steps))
    _leave()


def _leave() -> None:
    """End a rank without interpreter teardown, where gloo's threads can abort the process
    (``terminate called without an active exception``), as trainyard's ranks end."""
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)


def _by_index(x, y, sampler):
    """This rank's shard of the epoch (the sampler's order), a batch per index slice."""
    order = torch.tensor(list(sampler))
    for start in range(0, len(order), BATCH):
        idx = order[start : start + BATCH]
        yield x[idx], y[idx]


def _lightning_rank(rank: int, port: int, epochs: int, out: str) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from trainyard.models import CNN

    _join(rank, port)
    warnings.filterwarnings("ignore")  # the report, not Lightning's notices
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    data = _digits()
    loader = DataLoader(TensorDataset(*data.train_set.tensors), batch_size=BATCH, shuffle=True)
    timer = EpochTimer()

    class Bare(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = CNN(data.input_shape, data.num_classes)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=LR)

        def on_train_epoch_start(self):
            timer.new_epoch()

        def on_train_batch_start(self, batch, batch_idx):
            timer.tick()

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        max_epochs=epochs,
        **BARE_TRAINER,
    )
    trainer.fit(Bare(), train_dataloaders=loader)
    if rank == 0:
        Path(out).write_text(json.dumps(timer.steps))
    _leave()


def spawned_step(variant: str, epochs: int, tmp: Path, index: int) -> float:
    out = tmp / f"{variant}{index}.json"
    port = 29000 + (os.getpid() + 7 * index + len(variant)) % 1000
    if variant == "lightning-bare":
        mp.spawn(_lightning_rank, args=(port, epochs, str(out)), nprocs=WORLD, join=True)
    else:
        indexed = variant == "plain-indexed"
        mp.spawn(_plain_rank, args=(port, epochs, str(out), indexed), nprocs=WORLD, join=True)
    return statistics.median(json.loads(out.read_text()))


def trainyard_step(epochs: int, tmp: Path, index: int) -> float:
    args = [
        str(BIN / "trainyard-train"),
        f"name=ddpbench{index}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        f"trainer.devices={WORLD}",
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


VARIANTS = ("plain", "plain-indexed", "lightning-bare", "trainyard")


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of ~10 steps per run")
    args = parser.parse_args()
    steps: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name in VARIANTS[i % 4 :] + VARIANTS[: i % 4]:  # no variant always first
                if name == "trainyard":
                    steps[name].append(trainyard_step(args.epochs, Path(tmp), i))
                else:
                    steps[name].append(spawned_step(name, args.epochs, Path(tmp), i))
    step = {name: median(values) for name, values in steps.items()}
    ratio = {name: step[name] / step["plain"] for name in VARIANTS[1:]}
    report(
        f"2-rank CPU DDP step time (median of {args.repeats} runs x ~{args.epochs * 10} steps; "
        f"{RATIOS})",
        [
            *[(f"{name} [ms/step]", 1e3 * value, "") for name, value in step.items()],
            *[
                (f"{name} / plain", value, goal(value, 1.00) if name == "trainyard" else "")
                for name, value in ratio.items()
            ],
        ],
    )


if __name__ == "__main__":
    main()
