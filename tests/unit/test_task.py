"""The LightningModule wiring: logging cadence, schedulers, weight-decay groups."""

import csv
import functools

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from tests.helpers.trainers import quiet_trainer
from trainyard.data import DigitsDataModule
from trainyard.models import MLP
from trainyard.tasks import Classifier


def _task(**kwargs):
    kwargs.setdefault("optimizer", lambda params: torch.optim.SGD(params, lr=0.1, weight_decay=0.1))
    return Classifier(
        net=MLP((1, 8, 8), 10, hidden=[16], batch_norm=True), num_classes=10, **kwargs
    )


def test_train_loss_reaches_the_logger_once_per_window(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    trainer = quiet_trainer(max_steps=23, log_every_n_steps=5, logger=logger)
    trainer.fit(_task(), datamodule=DigitsDataModule(batch_size=32))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == [4, 9, 14, 19]  # each window's last step, counted from 0 as Lightning does
    assert all(0 < float(r["train/loss"]) < 5 for r in rows if r.get("train/loss"))


def test_metrics_csv_rows_follow_the_steps_like_lightnings_own(tmp_path):
    # Lightning stamps what self.log records (validation, epoch values) with the step's
    # index from 0; the loss windows stamped with the count of steps came out of order
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    trainer = quiet_trainer(max_epochs=2, log_every_n_steps=3, logger=logger, limit_val_batches=1.0)
    trainer.fit(_task(), datamodule=DigitsDataModule(batch_size=256))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert any(r.get("val/acc") for r in rows) and any(r.get("train/loss") for r in rows)
    assert steps == sorted(steps), steps
    last_of_epoch_0 = {int(r["step"]) for r in rows if r.get("val/acc") and r["epoch"] == "0"}
    assert last_of_epoch_0 == {trainer.num_training_batches - 1}


class _StepLosses(pl.Callback):
    def __init__(self):
        self.by_epoch: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_epoch.setdefault(trainer.current_epoch, []).append(float(outputs["loss"]))


def test_the_epoch_loss_is_the_mean_of_that_epochs_steps_when_windows_span_epochs(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    losses = _StepLosses()
    task = _task()
    trainer = quiet_trainer(max_epochs=3, log_every_n_steps=5, logger=logger, callbacks=[losses])
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=256))
    with open(tmp_path / "metrics.csv") as f:
        logged = {
            int(r["epoch"]): float(r["train/loss_epoch"])
            for r in csv.DictReader(f)
            if r.get("train/loss_epoch")
        }
    [per_epoch] = {len(v) for v in losses.by_epoch.values()}
    assert sorted(logged) == [0, 1, 2] and per_epoch % 5  # so a window spans two epochs
    for epoch, steps in losses.by_epoch.items():
        assert logged[epoch] == pytest.approx(sum(steps) / len(steps), rel=1e-6), epoch
    assert task.epoch_train_loss() is None  # the epoch's sum was handed on and cleared


def test_a_resumed_rank_keeps_its_epoch_loss_from_either_kind_of_saved_state():
    # written before losses were counted a window at a time: the sum holds the window
    older = _task()
    older.load_rank_state_dict({"epoch_loss": (6.0, 3), "loss_window": [1.0, 2.0]})
    assert older.epoch_train_loss() == 2.0
    # now: the window's losses after window_counted are not in the sum yet
    task = _task()
    state = {"epoch_loss": (3.0, 1), "loss_window": [3.0, 1.0, 2.0], "window_counted": 1}
    task.load_rank_state_dict(state)
    assert task.epoch_train_loss() == 2.0
    dtypes = {"epoch_loss": "float32", "loss_window": "float32"}
    assert task.rank_state_dict() == {**state, "dtypes": dtypes}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_resumed_rank_adds_its_losses_in_the_precision_it_trained_in(dtype):
    # bf16-true and 64-true losses: restored as float32, a resumed run would add
    # differently rounded values than one never stopped
    task = _task()
    task._loss_window[:] = [torch.tensor(x, dtype=dtype) for x in (2.3046875, 1.1)]
    task._count_window()
    task._loss_window.append(torch.tensor(0.7, dtype=dtype))
    resumed = _task()
    resumed.load_rank_state_dict(task.rank_state_dict())
    pairs = zip(resumed._loss_window, task._loss_window, strict=True)
    for ours, theirs in [(resumed._epoch_loss[0], task._epoch_loss[0]), *pairs]:
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert resumed.epoch_train_loss() == task.epoch_train_loss()
    # the epoch's sum is kept in at least float32 (a bf16 sum would round each new loss)
    assert task._epoch_loss[0].dtype == torch.promote_types(dtype, torch.float32)


def test_a_saved_loss_state_naming_no_dtype_is_refused():
    state = {"epoch_loss": (1.0, 1), "loss_window": [], "dtypes": {"epoch_loss": "load"}}
    with pytest.raises(ValueError, match="names no torch dtype: 'load'"):
        _task().load_rank_state_dict(state)


def test_weight_decay_spares_biases_and_norm_scales():
    groups = _task()._param_groups()
    assert all(p.ndim > 1 for p in groups[0]["params"])
    assert all(p.ndim <= 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    assert len(_task(decay_norm_and_bias=True)._param_groups()) == 1


def _fitted_optimizer(task, **trainer_settings) -> torch.optim.Optimizer:
    trainer = quiet_trainer(max_steps=3, **trainer_settings)
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    [optimizer] = trainer.optimizers
    return optimizer


def _adam(**settings):
    return functools.partial(torch.optim.Adam, lr=1e-3, **settings)


def test_the_optimizer_runs_torchs_fused_kernel_unless_the_config_chose_one():
    optimizer = _fitted_optimizer(_task(optimizer=_adam()))
    assert [g["fused"] for g in optimizer.param_groups] == [True, True]
    for chosen in ({"fused": False}, {"foreach": True}):
        optimizer = _fitted_optimizer(_task(optimizer=_adam(**chosen)))
        assert not any(g["fused"] for g in optimizer.param_groups), chosen
    # a factory that takes no such argument, or an optimizer without a fused kernel, is
    # built as configured
    assert not _fitted_optimizer(_task()).param_groups[0]["fused"]  # a lambda
    rmsprop = _task(optimizer=functools.partial(torch.optim.RMSprop, lr=1e-3))
    assert not _fitted_optimizer(rmsprop).param_groups[0].get("fused")


@pytest.mark.parametrize(
    ("precision", "clip"), [("bf16-mixed", 1.0), ("16-mixed", None), ("16-mixed", 1.0)]
)
def test_no_fused_kernel_where_it_would_see_scaled_gradients_or_refuse_clipping(precision, clip):
    # a fused step unscales fp16 gradients itself: callbacks and optimizers would see them
    # still scaled; and Lightning refuses to clip for such optimizers under mixed precision
    task = _task(optimizer=_adam(), gradient_clip_val=clip)
    optimizer = _fitted_optimizer(task, **_precision(precision))
    assert not any(g["fused"] for g in optimizer.param_groups)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_a_checkpoint_of_the_unfused_optimizer_resumes_on_its_own_kernel(tmp_path, precision):
    """A trial stopped before trainyard chose fused kernels resumes as it started."""
    unfused = lambda params: torch.optim.Adam(params, lr=1e-3)  # noqa: E731 (torch's default)
    trainer = quiet_trainer(max_steps=3, **_precision(precision))
    trainer.fit(_task(optimizer=unfused), datamodule=DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = quiet_trainer(max_steps=6, **_precision(precision))
    task = _task(optimizer=_adam())
    resumed.fit(task, datamodule=DigitsDataModule(batch_size=32), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 6
    assert not any(g["fused"] for g in resumed.optimizers[0].param_groups)


class _TakesNoFused(torch.optim.Adam):
    def __init__(self, params, **settings):  # a subclass that forwards no fused argument
        super().__init__(params, lr=settings.get("lr", 1e-3))


@pytest.mark.parametrize(
    ("factory", "param", "fusable"),
    [
        (_adam(), torch.zeros(2), True),
        (functools.partial(torch.optim.SGD, lr=0.1), torch.zeros(2), True),
        (_adam(differentiable=False), torch.zeros(2), False),  # the config names it
        (_adam(), torch.zeros(2, dtype=torch.complex64), False),  # complex: no fused kernel
        (_adam(), torch.zeros(2, device="meta"), False),  # no fused kernel on that device
        (_adam(), torch.zeros(2).to_sparse(), False),  # a sparse parameter
        (functools.partial(torch.optim.Adagrad, lr=0.1), torch.zeros(2), False),  # CPU-only
        (functools.partial(_TakesNoFused, lr=0.1), torch.zeros(2), False),
    ],
    ids=["adam", "sgd", "differentiable", "complex", "meta", "sparse", "adagrad", "subclass"],
)
def test_which_optimizers_and_parameters_get_the_fused_kernel(factory, param, fusable):
    from trainyard.tasks.classifier import _fusable

    assert _fusable(factory, [torch.nn.Parameter(param)], torch.nn.Linear(2, 2)) is fusable


def test_bf16_mixed_without_clipping_trains_on_the_fused_kernel():
    optimizer = _fitted_optimizer(_task(optimizer=_adam()), precision="bf16-mixed")
    assert all(g["fused"] for g in optimizer.param_groups)


class _SparseNet(torch.nn.Module):
    """Digits through an embedding with sparse gradients, which fused kernels refuse."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 4, sparse=True)
        self.head = torch.nn.Linear(64 * 4, 10)

    def forward(self, x):
        positions = torch.arange(64, device=x.device).expand(len(x), 64)
        return self.head((self.embed(positions) * x.flatten(1).unsqueeze(-1)).flatten(1))


def test_a_network_with_sparse_gradients_trains_on_the_unfused_kernel():
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    task = Classifier(net=_SparseNet(), num_classes=10, optimizer=sgd)
    optimizer = _fitted_optimizer(task)
    assert not optimizer.param_groups[0]["fused"]


def test_onecycle_gets_total_steps_from_the_trainer_and_steps_per_batch():
    from functools import partial

    task = _task(scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1))
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=7)
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    [config] = trainer.lr_scheduler_configs
    assert config.interval == "step"
    assert config.scheduler.total_steps == 14
    assert config.scheduler.last_epoch == 14  # stepped after every optimizer step


class _Automatic(pl.LightningModule):
    """The same training written for Lightning's automatic optimization."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def _fit(module, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_epochs=2, **trainer_kwargs)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=50, seed=0))
    return trainer


def _precision(precision: str) -> dict:
    """Trainer arguments for ``precision`` on CPU, with the real GradScaler for 16-mixed.

    ``Trainer(accelerator="cpu", precision="16-mixed")`` silently falls back to bf16-mixed;
    the plugin with torch's CPU GradScaler runs Lightning's actual fp16 scaling path.
    """
    if precision != "16-mixed":
        return {"precision": precision}
    scaler = torch.amp.GradScaler("cpu")
    return {"plugins": [MixedPrecision("16-mixed", device="cpu", scaler=scaler)]}


class _NormRecordingSGD(torch.optim.SGD):
    """SGD that records the gradient norm and largest entry that reach each step."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.seen: list[tuple[float, float]] = []

    def step(self, closure=None):
        # Lightning's closure runs on_before_optimizer_step (32-true, bf16-mixed): run it
        # first, as torch's optimizers do, to see the gradients the update will use
        loss = None if closure is None else closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads).item()
        self.seen.append((norm, max(g.abs().max().item() for g in grads)))
        super().step()
        return loss


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_bounds_the_unscaled_gradients_that_reach_the_step(precision, algorithm):
    task = _task(gradient_clip_val=0.01, gradient_clip_algorithm=algorithm)
    task.optimizer_factory = functools.partial(_NormRecordingSGD, lr=0.1)
    trainer = quiet_trainer(max_steps=6, **_precision(precision))
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    assert scaler is None or scaler.get_scale() > 1  # the fp16 gradients were really scaled
    [optimizer] = trainer.optimizers
    assert optimizer.seen  # steps the scaler skipped for overflow record nothing
    # unclipped gradients here are far above 0.01 (norm ~1), so clipping always binds
    index = 0 if algorithm == "norm" else 1
    for seen in optimizer.seen:
        assert seen[index] == pytest.approx(0.01, rel=1e-3)


# Both runs execute the same operations (Lightning unscales, then clips, then steps; so
# does our loop), so they agree to float32 rounding (32-true: exactly; mixed: ~6e-8 seen).
# The mixed tolerances allow a few half-precision roundings to land differently: each moves
# a gradient by that format's epsilon (bf16 2**-8, fp16 2**-11) of an update of at most
# lr x clip = 0.01. Clipping still-scaled fp16 gradients misses by about 0.09.
_WEIGHT_ATOL = {"32-true": 1e-6, "bf16-mixed": 1e-4, "16-mixed": 1e-5}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_our_loop_matches_lightnings_automatic_optimization_with_accumulation_and_clipping(
    precision,
):
    def net():
        torch.manual_seed(0)
        return MLP((1, 8, 8), 10, hidden=[32], batch_norm=True)

    ours = Classifier(
        net=net(),
        num_classes=10,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9),
        accumulate_grad_batches=3,
        gradient_clip_val=0.05,
    )
    theirs = _Automatic(net())
    ours_trainer = _fit(ours, **_precision(precision))
    clipping = {"accumulate_grad_batches": 3, "gradient_clip_val": 0.05}
    theirs_trainer = _fit(theirs, **clipping, **_precision(precision))
    assert ours_trainer.global_step == theirs_trainer.global_step == 2 * 9  # ceil(26/3) x 2
    for (name, a), (_, b) in zip(
        ours.net.state_dict().items(), theirs.net.state_dict().items(), strict=True
    ):
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= _WEIGHT_ATOL[precision], (name, diff)


def test_the_terminal_bar_shows_the_training_loss_not_the_loggers_version(tmp_path, caplog):
    from trainyard.callbacks.progress import TerminalProgressBar

    bar = TerminalProgressBar(refresh_rate=1)
    logger = pl.loggers.CSVLogger(tmp_path, name="logs")
    trainer = quiet_trainer(max_epochs=2, log_every_n_steps=5, logger=logger, callbacks=[bar],
                            enable_progress_bar=True, limit_val_batches=2)  # fmt: skip
    task = _task()
    with caplog.at_level("INFO", logger="trainyard"):
        trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    shown = bar.get_metrics(trainer, task)
    assert "v_num" not in shown and shown["loss"] == task.last_train_loss > 0
    lines = [r.getMessage() for r in caplog.records if r.name == "trainyard"]
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("train/loss" in line and "val/acc" in line for line in lines)
