"""Step timing: how long training steps take, and when the first one finished.

Add it with ``+callbacks.timer._target_=trainyard.callbacks.timing.StepTimer``. Each rank
writes ``<run_dir>/ranks/timing_rank<N>.json`` at the end of fit. A step's time is the
interval between consecutive batch starts inside one epoch (data loading, forward,
backward, optimizer and every hook), so epoch-end validation is not counted.
"""

from __future__ import annotations

import time
from pathlib import Path

from pytorch_lightning.callbacks import Callback

from trainyard.rundir import write_json


class StepTimer(Callback):
    def __init__(self, skip_first: int = 5):
        self.skip_first = skip_first  # warm-up steps left out of the statistics
        self.first_step_end: float | None = None
        self.steps: list[float] = []
        self._last: float | None = None
        self._seen = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._seen += 1
            if self._seen > self.skip_first:
                self.steps.append(now - self._last)
        self._last = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first_step_end is None:
            self.first_step_end = time.time()

    def on_fit_end(self, trainer, pl_module) -> None:
        root = Path(trainer.default_root_dir)
        write_json(
            root / "ranks" / f"timing_rank{trainer.global_rank}.json",
            {"first_step_end": self.first_step_end, "step_s": self.steps},
        )
