"""``last.ckpt``: the exact state to resume from, and the step-boundary stop on a signal.

Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only when it saves a
top-k checkpoint, so after a run whose metric peaked early it held an old epoch. This
callback owns ``last.ckpt`` instead:

- it is written at the end of every training epoch (after validation, the scheduler step
  and the other callbacks' bookkeeping), at the end of training, and when a stop is
  requested (:mod:`trainyard.signals`), at the step boundary where training stops;
- it carries, for every rank, every random stream that training draws from (Python,
  NumPy, torch CPU and CUDA) and the module's buffers (BatchNorm running statistics are
  updated by each rank's own batches, while Lightning saves rank 0's only), restored when
  training resumes; the loaders need no state (:mod:`trainyard.data.loader`), so a resumed
  run ends bit-identical to one that never stopped.

With several ranks, a stop is agreed on with one small all-reduce every
``check_every_n_steps`` steps (and at every epoch end), so every rank stops at the same
step even when only one of them was signalled. It replaces Lightning's own signal
handling, which broadcasts a tensor on every step and from inside the signal handler.
"""

from __future__ import annotations

import logging
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning.callbacks import Checkpoint

from trainyard import lean, signals

_log = logging.getLogger("trainyard")

_REASONS = ("", "preempted", "interrupted")  # index = code all-reduced with MAX


def rng_states() -> dict[str, Any]:
    """Plain types and tensors only, so ``torch.load(weights_only=True)`` still reads it."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: a requeued
    return states  # job may see another number of GPUs


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _log_epoch_metrics(trainer) -> None:
    """Hand the epoch's logged values (train/loss_epoch) to the loggers, as Lightning's fit
    loop does after the epoch-end hooks: a stop leaves the loop from inside them, and the
    resumed run starts at the next epoch, so they would never be written. The same calls,
    at the same step; every rank makes them (sync_dist values are reduced here)."""
    if not lean.verified():  # Lightning internals, checked on one version
        return
    connector, loop = trainer._logger_connector, trainer.fit_loop.epoch_loop
    connector.on_epoch_end()
    loop._batches_that_stepped -= 1  # epoch values are logged at the epoch's last step
    try:
        connector.update_train_epoch_metrics()
    except Exception as exc:  # a logger that fails now must not turn the stop into a failure
        _log.warning("the epoch's metrics did not reach the loggers before the stop: %s", exc)
    finally:
        loop._batches_that_stepped += 1


def _distributed(trainer) -> bool:
    return trainer.world_size > 1 and torch.distributed.is_initialized()


def agreed_stop(trainer) -> bool:
    """Whether any rank was asked to stop; the same answer on every rank (one all-reduce
    with several ranks, so every rank must call it at the same point)."""
    request = signals.requested()
    if not _distributed(trainer):
        return request is not None
    # reason and signal in one number: every rank stops for the same reason and signal (the
    # highest), so rank 0 knows whether Slurm's SIGTERM or the time-limit warning stopped
    # the job even when the signal reached another rank first
    code = _REASONS.index(request.reason) * 100 + signals.number(request.signal) if request else 0
    flag = torch.tensor([code], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    agreed = int(flag.item())
    if agreed and agreed != code:
        signum = agreed % 100
        name = signal.Signals(signum).name if signum else "a signal to another rank"
        signals.override(_REASONS[agreed // 100], name)
    return agreed > 0


class ResumeCheckpoint(Checkpoint):
    """Writes ``path`` (``last.ckpt``); stops training at a step boundary on request."""

    def __init__(self, path: str | Path, check_every_n_steps: int = 10):
        self.path = Path(path)
        self.check_every_n_steps = max(1, int(check_every_n_steps))
        self._steps = 0
        self._saved_step: int | None = None
        self._to_restore: list[dict[str, Any]] | None = None
        self._trainer = None

    @property
    def state_key(self) -> str:
        return "ResumeCheckpoint"

    # -- per-rank state ----------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        # called on every rank while a checkpoint is assembled, so gathering is safe
        mine = {"rng": rng_states(), "buffers": {}}
        if self._trainer is not None:
            module = self._trainer.lightning_module
            mine["buffers"] = {k: b.detach().cpu() for k, b in module.named_buffers()}
            if hasattr(module, "rank_state_dict"):  # per-rank state a LightningModule keeps
                mine["module"] = module.rank_state_dict()
            # DDP broadcasts rank 0's buffers before a forward only when this flag is set;
            # a fresh wrapper has it set, the running one did not (manual optimization)
            mine["ddp_sync_buffers"] = getattr(
                self._trainer.strategy.model, "require_forward_param_sync", None
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, mine)
        else:
            every = [mine]
        return {"ranks": every}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict.get("ranks")

    def on_train_start(self, trainer, pl_module) -> None:
        self._restore(trainer, pl_module)
        # a stop requested while the ranks were starting: every rank leaves here, together
        if agreed_stop(trainer):
            signals.raise_if_requested("before the first step")

    def _restore(self, trainer, pl_module) -> None:
        # restored here, after everything that runs between loading and the first step
        ranks, self._to_restore = self._to_restore, None
        if not ranks:
            return
        mine = ranks[trainer.global_rank] if trainer.global_rank < len(ranks) else ranks[0]
        set_rng_states(mine["rng"])
        ddp = trainer.strategy.model
        if mine.get("ddp_sync_buffers") is not None and hasattr(ddp, "require_forward_param_sync"):
            ddp.require_forward_param_sync = mine["ddp_sync_buffers"]
        if "module" in mine and hasattr(pl_module, "load_rank_state_dict"):
            pl_module.load_rank_state_dict(mine["module"])
        buffers = dict(pl_module.named_buffers())
        with torch.no_grad():
            for name, saved in mine["buffers"].items():
                if name in buffers and buffers[name].shape == saved.shape:
                    buffers[name].copy_(saved)

    # -- saving and stopping ---------------------------------------------------------
    def _save(self, trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The epoch's last batch: on_train_epoch_end checks, after validation and the
        # epoch's bookkeeping. Stopped here, a resume would count the epoch as ended and
        # skip all that (its validation, its train/loss_epoch, an epoch scheduler's step).
        # The same on every rank, so the ranks still check at the same steps.
        if trainer.is_last_batch:
            return
        # only where an optimizer step just happened: gradients accumulated since the last
        # one are in no checkpoint
        accumulate = getattr(pl_module, "accumulate_grad_batches", 1)
        if (batch_idx + 1) % accumulate:
            return
        self._steps += 1
        if _distributed(trainer) and self._steps % self.check_every_n_steps:
            return
        if agreed_stop(trainer):
            self._save(trainer)
            where = f"at step {trainer.global_step}, saved in {self.path}"
            signals.raise_if_requested(where, step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)
        if agreed_stop(trainer):
            _log_epoch_metrics(trainer)
            where = f"after epoch {trainer.current_epoch + 1} (1-based), saved in {self.path}"
            signals.raise_if_requested(where, step=trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._saved_step != trainer.global_step:  # stopped by max_steps mid-epoch
            self._save(trainer)
