"""The classification task: any network, any loss, optimizer and scheduler from config.

The optimization loop is written out here (Lightning's manual optimization) rather than
left to Lightning's closure machinery, which costs about 60 µs a step on small models.
Accumulation, clipping and scheduler stepping therefore live here; the entrypoint hands
over ``trainer.accumulate_grad_batches`` and ``trainer.gradient_clip_*`` from the config.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

# Schedulers defined per optimizer step rather than per epoch.
_STEPWISE = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


class Classifier(pl.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., object] | None = None,
        loss: nn.Module | None = None,
        decay_norm_and_bias: bool = False,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ):
        super().__init__()
        self.automatic_optimization = False
        self.net = net
        self.loss_fn = loss if loss is not None else nn.CrossEntropyLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.decay_norm_and_bias = decay_norm_and_bias
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self._loss_window: list[torch.Tensor] = []  # detached losses since the last log
        self._epoch_loss = [0.0, 0]  # sum and count this epoch, for train/loss_epoch

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets this string attribute twice per hook call (44 times a step); it is
        # never a parameter, buffer or module, so nn.Module's bookkeeping can be skipped.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

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
        total, count = self._epoch_loss
        if count:
            self.log("train/loss_epoch", total / count, sync_dist=True)
        self._epoch_loss[:] = [0.0, 0]
        scheduler = self.lr_schedulers()
        if scheduler is not None and not isinstance(scheduler, _STEPWISE):
            scheduler.step()

    def rank_state_dict(self) -> dict:
        """This rank's running loss sums: a resumed epoch reports the same mean loss.
        (Saved per rank by trainyard.callbacks.resume.ResumeCheckpoint.)"""
        total, count = self._epoch_loss
        return {
            "epoch_loss": (float(total), count),
            "loss_window": [float(x) for x in self._loss_window],
        }

    def load_rank_state_dict(self, state: dict) -> None:
        total, count = state["epoch_loss"]
        device = self.device
        self._epoch_loss[:] = [torch.tensor(total, device=device) if count else 0.0, count]
        self._loss_window[:] = [torch.tensor(x, device=device) for x in state["loss_window"]]

    def _record_train_loss(self, loss: torch.Tensor) -> None:
        """Write the mean loss of each logging window straight to the loggers.

        ``self.log`` on every step costs about a quarter of a small model's step (the
        result collection, and its rebuild on every batch end once a key exists); the
        loggers only keep every ``log_every_n_steps``-th value anyway.
        """
        loss = loss.detach()
        self._epoch_loss[0] = self._epoch_loss[0] + loss
        self._epoch_loss[1] += 1
        self._loss_window.append(loss)
        if len(self._loss_window) < self.trainer.log_every_n_steps:
            return
        mean = torch.stack(self._loss_window).mean()
        self._loss_window.clear()
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({"train/loss": mean.item()}, step=self.global_step)

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
        if self.decay_norm_and_bias:
            return [{"params": [p for _, p in params]}]
        # weight decay on matrices and kernels only: biases and norm scales are 1-d
        decay = [p for _, p in params if p.ndim > 1]
        no_decay = [p for _, p in params if p.ndim <= 1]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def total_optimizer_steps(self) -> int:
        """Optimizer steps in this fit: per epoch ceil(batches / accumulation), capped."""
        trainer = self.trainer
        trainer.estimated_stepping_batches  # noqa: B018 (loads the train loader if needed)
        per_epoch = math.ceil(trainer.num_training_batches / self.accumulate_grad_batches)
        total = per_epoch * trainer.max_epochs if trainer.max_epochs > 0 else math.inf
        if trainer.max_steps > 0:
            total = min(total, trainer.max_steps)
        return int(total)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self._param_groups())
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
