"""A progress display that suits where it runs: a live bar on a terminal, plain lines in
CI logs and batch jobs (where a bar's carriage returns turn into megabytes of noise)."""

from __future__ import annotations

import sys
import time

from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar


class PlainProgressBar(ProgressBar):
    """One line per epoch (and every ``every_n_steps`` steps, if set), on rank zero only."""

    def __init__(self, every_n_steps: int = 0):
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._epoch_start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(text, flush=True)

    def _metrics(self, trainer) -> str:
        items = self.get_metrics(trainer, trainer.lightning_module)
        items.pop("v_num", None)
        return "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items.items()
        )

    def on_train_start(self, trainer, pl_module) -> None:
        # a run resumed mid-epoch starts here, not at an epoch start
        self._epoch_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps
        if n and trainer.global_step % n == 0:
            self._print(trainer, f"step {trainer.global_step}  {self._metrics(trainer)}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        took = time.perf_counter() - self._epoch_start
        last = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        self._print(
            trainer,
            f"epoch {trainer.current_epoch + 1}/{last}  step {trainer.global_step}  "
            f"{self._metrics(trainer)}  ({took:.1f}s)",
        )

    def on_test_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "test" in k}
        self._print(trainer, "test  " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def progress_bar(refresh_rate: int = 10, every_n_steps: int = 0) -> ProgressBar:
    """A live bar when stderr is a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        return TQDMProgressBar(refresh_rate=refresh_rate)
    return PlainProgressBar(every_n_steps=every_n_steps)
