"""The classification task: any network, any loss, optimizer and scheduler from config."""

from __future__ import annotations

import functools
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
    ):
        super().__init__()
        self.net = net
        self.loss_fn = loss if loss is not None else nn.CrossEntropyLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.decay_norm_and_bias = decay_norm_and_bias
        self._train_loss_window: list = [0.0, 0]  # [sum of losses, steps] since last log
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        self._log_train_loss(loss)
        return loss

    def _log_train_loss(self, loss: torch.Tensor) -> None:
        """Log the mean loss of the last ``log_every_n_steps`` steps, once per window.

        ``self.log`` costs about as much as a small model's forward pass, and the logger
        only records every n-th call anyway; summing on the tensor and logging once per
        window keeps the same log with a smoother curve and no per-step cost.
        """
        window = self._train_loss_window  # mutated in place: no nn.Module.__setattr__
        window[0] = loss.detach() + window[0]
        window[1] += 1
        # the same condition Lightning uses to decide that this step reaches the logger
        if self.trainer._logger_connector.should_update_logs:
            self.log("train/loss", window[0] / window[1], on_step=True)
            window[:] = [0.0, 0]

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

    def _param_groups(self) -> list[dict]:
        params = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        if self.decay_norm_and_bias:
            return [{"params": [p for _, p in params]}]
        # weight decay on matrices and kernels only: biases and norm scales are 1-d
        decay = [p for _, p in params if p.ndim > 1]
        no_decay = [p for _, p in params if p.ndim <= 1]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self._param_groups())
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        factory = self.scheduler_factory
        cls = factory.func if isinstance(factory, functools.partial) else factory
        if cls is torch.optim.lr_scheduler.OneCycleLR and not {"total_steps", "epochs"} & set(
            getattr(factory, "keywords", {})
        ):
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = factory(optimizer=optimizer, **kwargs)
        interval = "step" if isinstance(scheduler, _STEPWISE) else "epoch"
        schedule = {"scheduler": scheduler, "interval": interval}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
