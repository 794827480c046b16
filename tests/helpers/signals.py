"""A callback that sends a real signal at a chosen point of a run's first attempt, so tests
can stop training exactly mid-epoch or at an epoch boundary through the real signal path.

Add it with ``+callbacks.sig._target_=tests.helpers.signals.SignalAt +callbacks.sig.step=N``
(the subprocess needs the repository on PYTHONPATH).

A helper that tests import, not a test module: it asserts nothing itself; the tests that use
it (tests/integration/test_preemption.py) check the exit codes, states and final weights.
"""

from __future__ import annotations

import os
import signal

from pytorch_lightning.callbacks import Callback

from trainyard.rundir import RunDir


class SignalAt(Callback):
    def __init__(
        self,
        signal: str = "SIGTERM",
        step: int | None = None,
        epoch: int | None = None,
        batch: int | None = None,
        target: str = "self",
    ):
        """Fire after optimizer step ``step``, or after batch ``batch`` of the first epoch
        (between two steps when accumulating), or during validation of epoch ``epoch``."""
        self.signal, self.step, self.epoch, self.target = signal, step, epoch, target
        self.batch = batch

    def _fire(self, trainer) -> None:
        if trainer.global_rank != 0 or RunDir(trainer.default_root_dir).status()["attempt"] != 1:
            return
        pid = os.getppid() if self.target == "parent" else os.getpid()
        os.kill(pid, signal.Signals[self.signal])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step == self.step:
            self._fire(trainer)
        if self.batch is not None and (trainer.current_epoch, batch_idx) == (0, self.batch):
            self._fire(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.epoch is not None and trainer.current_epoch == self.epoch:
            self._fire(trainer)
