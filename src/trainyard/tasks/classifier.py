"""The classification task: any network, any loss, optimizer and scheduler from config.

The optimization loop is written out here (Lightning's manual optimization) rather than
left to Lightning's closure machinery, which costs about 60 µs a step on small models.
Accumulation, clipping and scheduler stepping therefore live here; the entrypoint hands
over ``trainer.accumulate_grad_batches`` and ``trainer.gradient_clip_*`` from the config.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from trainyard.data.preprocess import Preprocess
from trainyard.tasks import specs

_log = logging.getLogger("trainyard")

# Schedulers defined per optimizer step rather than per epoch.
_STEPWISE = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


class Classifier(pl.LightningModule):
    """``net``, ``optimizer``, ``scheduler`` and ``loss`` are objects, or specs (plain
    dicts, see :mod:`trainyard.tasks.specs`) built here. Specs and the plain arguments are
    saved as hyperparameters, so ``Classifier.load_from_checkpoint(path)`` rebuilds the
    task; for objects, :meth:`record_specs` saves their specs (trainyard's entrypoint does),
    or load_from_checkpoint needs them passed again (Lightning's rule for modules).
    ``preprocess`` (:class:`~trainyard.data.preprocess.Preprocess`) is taken from the data
    module in :meth:`setup` and saved the same way.
    """

    def __init__(
        self,
        net: nn.Module | Mapping,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer] | Mapping | None = None,
        scheduler: Callable[..., object] | Mapping | None = None,
        loss: nn.Module | Mapping | None = None,
        decay_norm_and_bias: bool = False,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        preprocess: Mapping | None = None,
    ):
        super().__init__()
        given = {"net": net, "optimizer": optimizer, "scheduler": scheduler, "loss": loss}
        # logger=False: config.yaml is the run's record; these only rebuild the task
        self.save_hyperparameters(ignore=[*given, "preprocess"], logger=False)
        self.automatic_optimization = False
        self.net = _built(net, "net")
        loss = _built(loss, "loss")
        self.loss_fn = loss if loss is not None else nn.CrossEntropyLoss()
        self.optimizer_factory = _built(optimizer, "optimizer")
        self.scheduler_factory = _built(scheduler, "scheduler")
        self.record_specs(**{k: v for k, v in given.items() if isinstance(v, Mapping)})
        self.preprocess: Preprocess | None = None
        if preprocess is not None:
            self.use_preprocess(Preprocess.from_dict(preprocess))
        self.decay_norm_and_bias = decay_norm_and_bias
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self._loss_window: list[torch.Tensor] = []  # detached losses since the last log
        # sum and count this epoch, for train/loss_epoch: added a window at a time, so a
        # step launches no kernel for it; the window's first _counted losses are in it
        self._epoch_loss = [0.0, 0]
        self._counted = 0
        self.last_train_loss: float | None = None  # last logging window's mean (progress)

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets this string attribute twice per hook call (44 times a step); it is
        # never a parameter, buffer or module, so nn.Module's bookkeeping can be skipped.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # -- what checkpoints record -------------------------------------------------------
    def record_specs(self, **given: Mapping | None) -> None:
        """Save how to rebuild ``net``, ``optimizer``, ``scheduler`` or ``loss`` in the
        hyperparameters. A spec that could not be rebuilt safely is left out: loading
        then needs that argument passed (the network) or goes without it (the others)."""
        for name, spec in given.items():
            if spec is None:
                continue
            if not specs.recordable(spec, specs.KINDS[name]):
                if name == "net":
                    _log.warning(
                        "the network's target %s is not an nn.Module class: checkpoints "
                        "will not rebuild it (load_from_checkpoint needs net=...)",
                        spec.get("_target_"),
                    )
                continue
            spec = copy.deepcopy(dict(spec))
            self.hparams[name] = specs.architecture(spec) if name == "net" else spec

    def use_preprocess(self, preprocess: Preprocess) -> None:
        """How raw inputs become what ``net`` takes; saved with every checkpoint."""
        self.preprocess = preprocess
        self.hparams["preprocess"] = preprocess.to_dict()

    def setup(self, stage: str) -> None:
        # the data module knows its preprocessing once its own setup ran (statistics of the
        # training split), and Lightning runs that before this hook
        preprocess = getattr(self.trainer.datamodule, "preprocess", None)
        if preprocess is not None:
            self.use_preprocess(preprocess)

    # -- training ------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        self._optimize(loss, batch_idx)
        self._record_train_loss(loss)
        return loss

    def _optimize(self, loss: torch.Tensor, batch_idx: int) -> None:
        accumulate = self.accumulate_grad_batches
        steps = (batch_idx + 1) % accumulate == 0 or self.trainer.is_last_batch
        # DDP: skip the gradient all-reduce on micro-batches that do not step
        blocked = getattr(self.trainer.strategy, "block_backward_sync", None)
        with contextlib.nullcontext() if steps or blocked is None else blocked():
            self.manual_backward(loss / accumulate if accumulate > 1 else loss)
        if not steps:
            return
        self._optimizer.step()  # clips in on_before_optimizer_step, once grads are unscaled
        self._optimizer.zero_grad(set_to_none=True)
        if self._step_scheduler is not None:
            self._step_scheduler.step()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this inside optimizer.step(), after the precision plugin has
        # unscaled the gradients (16-mixed) and right where it clips in automatic
        # optimization; clipping before step() would bound the scaled gradients instead.
        if self.gradient_clip_val:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    def on_train_start(self) -> None:
        # looked up once: Lightning rebuilds these lists on every call
        self._optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        self._step_scheduler = scheduler if isinstance(scheduler, _STEPWISE) else None

    def on_train_epoch_end(self) -> None:
        self._count_window()
        total, count = self._epoch_loss
        if count:
            self.log("train/loss_epoch", total / count, sync_dist=True)
        self._epoch_loss[:] = [0.0, 0]
        scheduler = self.lr_schedulers()
        if scheduler is not None and not isinstance(scheduler, _STEPWISE):
            scheduler.step()

    def epoch_train_loss(self) -> float | None:
        """This rank's mean training loss so far this epoch (for the progress lines, which
        run before on_train_epoch_end logs train/loss_epoch)."""
        total, count = self._epoch_loss
        fresh, n = self._uncounted()
        if n:
            total, count = total + fresh, count + n
        return float(total) / count if count else None

    def rank_state_dict(self) -> dict:
        """This rank's running loss sums: a resumed epoch reports the same mean loss.
        (Saved per rank by trainyard.callbacks.resume.ResumeCheckpoint.)"""
        total, count = self._epoch_loss
        window = self._loss_window
        return {
            "epoch_loss": (float(total), count),
            "loss_window": [float(x) for x in window],
            "window_counted": self._counted,
            # each value is exact as a float; restored in its own dtype (bf16-true,
            # 64-true), a resumed run adds exactly what an unstopped one would
            "dtypes": {
                "epoch_loss": _dtype_name(total),
                "loss_window": _dtype_name(window[0]) if window else None,
            },
        }

    def load_rank_state_dict(self, state: dict) -> None:
        total, count = state["epoch_loss"]
        dtypes = state.get("dtypes") or {}  # saved before dtypes were: float32
        device = self.device
        total_as, window_as = _dtype(dtypes.get("epoch_loss")), _dtype(dtypes.get("loss_window"))
        self._epoch_loss[:] = [
            torch.tensor(total, dtype=total_as, device=device) if count else 0.0,
            count,
        ]
        self._loss_window[:] = [
            torch.tensor(x, dtype=window_as, device=device) for x in state["loss_window"]
        ]
        # saved before windows were counted a window at a time: its sum has them all
        self._counted = state.get("window_counted", len(self._loss_window))

    def _uncounted(self, stacked: torch.Tensor | None = None) -> tuple[torch.Tensor | None, int]:
        """The sum and number of the window's losses not yet in this epoch's sum
        (``stacked``: the window already stacked)."""
        n = len(self._loss_window) - self._counted
        if not n:
            return None, 0
        if stacked is None:
            stacked = torch.stack(self._loss_window)
        return _sum(stacked[self._counted :]), n

    def _count_window(self, stacked: torch.Tensor | None = None) -> None:
        """Add the window's losses not yet counted to this epoch's sum."""
        fresh, n = self._uncounted(stacked)
        if n:
            self._epoch_loss[0] = self._epoch_loss[0] + fresh
            self._epoch_loss[1] += n
        self._counted = len(self._loss_window)

    def _record_train_loss(self, loss: torch.Tensor) -> None:
        """Write the mean loss of each logging window straight to the loggers.

        ``self.log`` on every step costs about a quarter of a small model's step (the
        result collection, and its rebuild on every batch end once a key exists); the
        loggers only keep every ``log_every_n_steps``-th value anyway.
        """
        self._loss_window.append(loss.detach())
        if len(self._loss_window) < self.trainer.log_every_n_steps:
            return
        window = torch.stack(self._loss_window)
        self._count_window(window)
        mean = window.mean()
        self._loss_window.clear()
        self._counted = 0
        if self.trainer.is_global_zero:
            self.last_train_loss = mean.item()
            # with its epoch, as Lightning logs self.log values (metrics.csv's epoch column),
            # and at the step's index from 0, as it stamps them (its rows stay in order)
            row = {"train/loss": self.last_train_loss, "epoch": self.current_epoch}
            step = max(self.global_step - 1, 0)
            for logger in self.loggers:
                logger.log_metrics(row, step=step)

    # -- evaluation -------------------------------------------------------------------
    def _eval_step(self, batch, split: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self.net(x)
        self.log(f"{split}/loss", self.loss_fn(logits, y), sync_dist=True, batch_size=len(y))
        metric.update(logits, y)
        self.log(f"{split}/acc", metric, prog_bar=split == "val")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    # -- optimizers ---------------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        params = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        # named: the learning-rate monitor logs lr-<Optimizer>/<name> (not pg1, pg2)
        if self.decay_norm_and_bias:
            return [{"params": [p for _, p in params], "name": "all"}]
        # weight decay on matrices and kernels only: biases and norm scales are 1-d
        decay = [p for _, p in params if p.ndim > 1]
        no_decay = [p for _, p in params if p.ndim <= 1]
        return [
            {"params": decay, "name": "weights"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]

    def total_optimizer_steps(self) -> int:
        """Optimizer steps in this fit: per epoch ceil(batches / accumulation), capped."""
        trainer = self.trainer
        trainer.estimated_stepping_batches  # noqa: B018 (loads the train loader if needed)
        per_epoch = math.ceil(trainer.num_training_batches / self.accumulate_grad_batches)
        total = per_epoch * trainer.max_epochs if trainer.max_epochs > 0 else math.inf
        if trainer.max_steps > 0:
            total = min(total, trainer.max_steps)
        return int(total)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer, on torch's fused kernel where :func:`_fusable` allows
        it: one kernel per step instead of one per tensor and operation, measured at 25% of
        a small model's GPU step and 15% of its CPU step (issue 10). Lightning has moved the
        parameters to their device by now. A checkpoint's optimizer state carries its
        kernel choice: a resumed trial keeps the kernel it started with, so it resumes
        exactly (and a trial started before this choice existed stays on torch's default).

        Not with a GradScaler (16-mixed): a fused step unscales the gradients itself, so
        callbacks and optimizers would see them still scaled, and a checkpoint of the
        unfused optimizer could not be resumed."""
        factory, groups = self.optimizer_factory, self._param_groups()
        plugin = getattr(self._trainer, "precision_plugin", None)
        scaled = getattr(plugin, "scaler", None) is not None  # a GradScaler: 16-mixed
        # Lightning refuses to clip for an optimizer that unscales in its step, under any
        # mixed precision (scaler or not)
        refuses_clipping = bool(self.gradient_clip_val) and isinstance(plugin, MixedPrecision)
        params = [p for g in groups for p in g["params"]]
        if _fusable(factory, params, self.net) and not (scaled or refuses_clipping):
            return factory(params=groups, fused=True)
        return factory(params=groups)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError(
                "this Classifier has no optimizer (a checkpoint records one only when its "
                "target is a torch.optim.Optimizer class): pass optimizer=..."
            )
        optimizer = self._build_optimizer()
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        factory = self.scheduler_factory
        cls = factory.func if isinstance(factory, functools.partial) else factory
        keywords = set(getattr(factory, "keywords", {}))
        if cls is torch.optim.lr_scheduler.OneCycleLR and not {"total_steps", "epochs"} & keywords:
            kwargs["total_steps"] = self.total_optimizer_steps()
        scheduler = factory(optimizer=optimizer, **kwargs)
        interval = "step" if isinstance(scheduler, _STEPWISE) else "epoch"
        schedule = {"scheduler": scheduler, "interval": interval}
        return {"optimizer": optimizer, "lr_scheduler": schedule}


# Optimizers whose fused kernels exist on CPU and CUDA alike (Adagrad's is CPU-only).
_FUSED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def _fusable(factory, params: list[torch.Tensor], net: nn.Module) -> bool:
    """Whether ``factory`` can take ``fused=True`` for ``params``. torch checks devices,
    dtypes and sparse gradients only at the first step, so they are checked here, before
    training. Not where the config names ``fused``, ``foreach`` or ``differentiable``
    (``+optimizer.fused=false`` decides). A network that makes sparse gradients without a
    module saying so (``F.embedding(..., sparse=True)`` on its own parameter) needs
    ``+optimizer.fused=false``."""
    func = factory.func if isinstance(factory, functools.partial) else factory
    if not (isinstance(func, type) and issubclass(func, _FUSED)):
        return False
    if {"fused", "foreach", "differentiable"} & set(getattr(factory, "keywords", None) or {}):
        return False
    try:
        if "fused" not in inspect.signature(func).parameters:  # a subclass that drops it
            return False
    except (TypeError, ValueError):  # no signature to read
        return False
    if any(getattr(m, "sparse", False) is True for m in net.modules()):  # sparse embeddings
        return False
    return all(
        p.is_floating_point() and p.layout == torch.strided and p.device.type in ("cpu", "cuda")
        for p in params
    )


def _sum(losses: torch.Tensor) -> torch.Tensor:
    """A sum of losses in at least float32: a bf16 sum of an epoch's losses (bf16-true)
    would round away most of each later step's loss."""
    return losses.sum(dtype=torch.promote_types(losses.dtype, torch.float32))


def _dtype_name(value) -> str | None:
    return str(value.dtype).removeprefix("torch.") if isinstance(value, torch.Tensor) else None


def _dtype(name: str | None) -> torch.dtype:
    dtype = getattr(torch, name, None) if name else torch.float32
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"the saved training-loss state names no torch dtype: {name!r}")
    return dtype


def _built(value, name: str):
    """An argument given as a spec, built; an object (or None), as it is."""
    return specs.build(value, specs.KINDS[name]) if isinstance(value, Mapping) else value
