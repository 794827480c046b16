"""Pruning a sweep's poor trials from their intermediate validation metric.

trainyard's Optuna sweeper writes ``sweep.json`` into a trial's run directory before the
trial starts: where the study is stored, and which of its trials this is. The study lives
on disk (the sweep's journal file), so the trial reports to it from wherever it trains, a
Ray worker or a Slurm node alike, with no connection to the process that drives the sweep.

After each validation, rank 0 reports the monitored metric at that epoch and asks the
study's pruner; every rank gets the answer, and a pruned trial stops at that epoch boundary
as if early-stopped (its result and checkpoints are kept) and leaves ``pruned.json`` for
the sweeper, which records it as pruned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback

SWEEP_FILE = "sweep.json"
PRUNED_FILE = "pruned.json"


class SweepPruning(Callback):
    def __init__(self, run_dir: str | Path, monitor: str):
        self.run_dir, self.monitor = Path(run_dir), monitor
        self._trial: Any = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        from trainyard import search

        info = json.loads((self.run_dir / SWEEP_FILE).read_text())
        if info.get("pruner") in (None, "none"):
            return
        storage = JournalStorage(JournalFileBackend(info["storage"]))
        pruner = search.pruner(info["pruner"], info["min_resource"], info["reduction_factor"])
        study = optuna.load_study(study_name=info["study"], storage=storage, pruner=pruner)
        self._trial = optuna.trial.Trial(study, info["trial_id"])

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        prune, epoch = False, trainer.current_epoch + 1  # epochs trained: the resource
        value = trainer.callback_metrics.get(self.monitor)
        if self._trial is not None and value is not None:
            prune = self._ask(float(value), epoch)
        prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            trainer.should_stop = True
            if trainer.is_global_zero:
                from trainyard.rundir import write_json

                write_json(self.run_dir / PRUNED_FILE, {"epoch": epoch, "value": float(value)})

    def _ask(self, value: float, epoch: int) -> bool:
        """Report and ask the pruner. The sweep may have settled this trial already (a
        relaunched sweep that gave up on it): training then goes on without pruning."""
        import logging

        from optuna.exceptions import OptunaError

        try:
            self._trial.report(value, step=epoch)
            return self._trial.should_prune()
        except (OptunaError, RuntimeError) as exc:
            logging.getLogger("trainyard").warning("pruning off for this trial: %s", exc)
            self._trial = None
            return False
