"""A training step of trainyard runs the tensor operations of the hand-written loop that
launch work, and no more. On a GPU each is a kernel launch, and for small models the
launches, not the arithmetic, set the pace of a step (issue 10): an extra one per step is a
visible cost there. Counted on the CPU with torch's dispatcher, which sees every operation;
views (``detach``) launch nothing and are left out."""

import contextlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from trainyard import preflight
from trainyard.freeze import freeze
from trainyard.rundir import RunDir
from trainyard.worker import build, prepare_process

BATCH = 8
COUNTED_STEP = 6  # after the optimizer's state exists (made at the first step)


class _Ops(TorchDispatchMode):
    """Operations that launch work, by name (views such as ``detach`` launch none)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class _OneStep(Callback):
    """Counts from the start of one batch to the start of the next: the step, its hooks,
    and the taking of a batch."""

    def __init__(self):
        self.mode = _Ops()
        self.counting = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == COUNTED_STEP:
            self.mode.__enter__()
            self.counting = True
        elif batch_idx == COUNTED_STEP + 1:
            self.leave()

    def leave(self) -> None:
        """Stop counting (also where training failed in between: the mode is global)."""
        if self.counting:
            self.counting = False
            self.mode.__exit__(None, None, None)


def _trainyard_step(cfg, tmp_path: Path) -> tuple[Counter, object, object]:
    frozen = preflight.check_config(freeze(cfg))
    prepare_process()
    datamodule, task, trainer = build(frozen, RunDir(tmp_path / "run"), "cpu", 1)
    counter = _OneStep()
    trainer.callbacks.append(counter)
    try:
        trainer.fit(task, datamodule=datamodule)
    finally:
        counter.leave()
    return counter.mode.ops, datamodule, task


def _hand_written_step(datamodule, task, autocast: bool) -> Counter:
    """One step as a user writes it, data in memory and the optimizer's fused kernel (what
    trainyard chooses), after one step that makes the optimizer's state."""
    x, y = datamodule.train_set.tensors
    optimizer = task.optimizer_factory(params=task._param_groups(), fused=True)
    order = torch.randperm(len(x))
    counted = _Ops()
    for step in range(2):
        with counted if step == 1 else contextlib.nullcontext():
            idx = order[step * BATCH : (step + 1) * BATCH]
            xb, yb = x[idx], y[idx]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = task.loss_fn(task.net(xb), yb)
            loss.backward()
            optimizer.step()
    return counted.ops


MLP = ("data.shape=[16]", "model=mlp", "model.hidden=[8]")
# the networks of benchmarks/gpu_step.py on small images: convolutions and BatchNorm (its
# running statistics are updated in place), ResNet-18's residual additions
CNN = ("data.shape=[3,16,16]", "model=cnn")
RESNET = ("data.shape=[3,16,16]", "model=resnet18")


@pytest.mark.parametrize(
    "network, precision",
    [(MLP, "32-true"), (MLP, "bf16-mixed"), (CNN, "bf16-mixed"), (RESNET, "bf16-mixed")],
    ids=["mlp-32-true", "mlp-bf16-mixed", "cnn-bf16-mixed", "resnet18-bf16-mixed"],
)
def test_a_training_step_runs_the_operations_of_the_hand_written_loop(
    cfg_factory, tmp_path, network, precision
):
    cfg = cfg_factory(
        "data=synthetic", *network, "data.num_samples=120", f"data.batch_size={BATCH}",
        "optimizer=adam",
        "trainer.accelerator=cpu", "trainer.max_epochs=1", f"trainer.precision={precision}",
        "trainer.log_every_n_steps=1000",  # a logging step reads the loss: not this one
    )  # fmt: skip
    ours, datamodule, task = _trainyard_step(cfg, tmp_path)
    theirs = _hand_written_step(datamodule, task, autocast=precision == "bf16-mixed")
    assert sum(theirs.values()) > 10  # forward, backward and the optimizer were seen
    assert ours == theirs, {
        "only trainyard": dict(ours - theirs),
        "only the hand-written loop": dict(theirs - ours),
    }
