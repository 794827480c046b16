"""What a run shows while it trains: a live bar on a terminal, plain lines in CI logs and
batch jobs (where a bar's carriage returns turn into megabytes of noise), and on both the
lines that say what happened (each epoch's metrics, the test metrics, why training
stopped early), logged so that ``train.log`` keeps them too."""

from __future__ import annotations

import logging
import sys
import time

from pytorch_lightning.callbacks import EarlyStopping, ProgressBar, TQDMProgressBar

log = logging.getLogger("trainyard")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _Summary:
    """Epoch, test and early-stop lines, on rank zero only, through the ``trainyard``
    logger (the console and ``train.log``)."""

    def _bar_metrics(self, trainer, pl_module) -> dict:
        items = dict(ProgressBar.get_metrics(self, trainer, pl_module))
        items.pop("v_num", None)  # the logger's version: not a metric
        loss = getattr(pl_module, "last_train_loss", None)
        if loss is not None:  # the mean of the last logging window (trainer.log_every_n_steps)
            items = {"loss": loss, **items}
        return items

    def _say(self, trainer, text: str) -> None:
        if trainer.is_global_zero:
            log.info(text)

    def _epoch_line(self, trainer, pl_module, took: float) -> None:
        last = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
        rates = [v for k, v in metrics.items() if k.startswith("lr-")]
        # the module logs train/loss_epoch after this hook runs: take this epoch's from it
        metrics.pop("train/loss_epoch", None)
        loss = getattr(pl_module, "epoch_train_loss", lambda: None)()
        if loss is not None:
            metrics["train/loss"] = loss
        shown = "  ".join(
            f"{k} {_fmt(v)}" for k, v in sorted(metrics.items()) if not k.startswith("lr-")
        )
        if rates:  # one learning rate is enough here; metrics.csv has every group's
            shown += f"  lr {_fmt(rates[0])}"
        self._say(trainer, f"epoch {trainer.current_epoch + 1}/{last}  step "
                           f"{trainer.global_step}  {shown}  ({took:.1f}s)")  # fmt: skip

    def _test_line(self, trainer) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "test" in k}
        self._say(trainer, "test  " + "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))

    def _stop_line(self, trainer) -> None:
        for callback in trainer.callbacks:
            if not isinstance(callback, EarlyStopping):
                continue
            reason = getattr(callback, "stopping_reason_message", None)
            stopped = str(getattr(callback, "stopping_reason", "")).endswith("NOT_STOPPED")
            if reason and not stopped:  # Lightning says why: patience, threshold, non-finite
                self._say(
                    trainer,
                    f"early stopping after epoch {trainer.current_epoch}: {reason} "
                    "(callbacks.early_stopping.* sets when it stops)",
                )


class PlainProgressBar(_Summary, ProgressBar):
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

    def get_metrics(self, trainer, pl_module):
        return self._bar_metrics(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        # a run resumed mid-epoch starts here, not at an epoch start
        self._epoch_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps
        if n and self._enabled and trainer.global_step % n == 0:
            metrics = self.get_metrics(trainer, pl_module)
            shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            self._say(trainer, f"step {trainer.global_step}  {shown}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._enabled:
            self._epoch_line(trainer, pl_module, time.perf_counter() - self._epoch_start)

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_line(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        if self._enabled:
            self._test_line(trainer)


class TerminalProgressBar(_Summary, TQDMProgressBar):
    """Lightning's live bar, showing the training loss (not the logger's version number),
    with the same epoch, test and early-stop lines as the plain one."""

    def __init__(self, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate)
        self._epoch_start = 0.0

    def get_metrics(self, trainer, pl_module):
        return self._bar_metrics(trainer, pl_module)

    def _say(self, trainer, text: str) -> None:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stderr):  # a line of its own, not glued
            super()._say(trainer, text)  # onto the live bar

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._epoch_line(trainer, pl_module, time.perf_counter() - self._epoch_start)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self._stop_line(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        super().on_test_end(trainer, pl_module)
        self._test_line(trainer)


def progress_bar(refresh_rate: int = 10, every_n_steps: int = 0) -> ProgressBar:
    """A live bar when stderr is a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        return TerminalProgressBar(refresh_rate=refresh_rate)
    return PlainProgressBar(every_n_steps=every_n_steps)
