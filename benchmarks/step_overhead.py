"""Per-step cost of trainyard against a hand-written PyTorch loop, side by side in one run.

Every variant trains the same network (built from the same config), on the same data,
batch size, optimizer (same parameter groups) and loss, on the CPU with 2 threads:

- plain:          a hand-written loop as a user writes it: a standard DataLoader over a
                  TensorDataset (zero_grad, forward, loss, backward, step), torch's default
                  optimizer kernel. The reference.
- plain-indexed:  the same loop with the data held in memory and batches taken by index
                  (what trainyard's data path does): where the win comes from
- plain-indexed-fused: that loop with the optimizer's fused kernel (``fused=True``, which
                  trainyard chooses): the rest of the win; trainyard against it is
                  trainyard's own overhead
- lightning-bare: a bare pytorch_lightning.Trainer with every extra switched off, a
                  minimal LightningModule and the standard DataLoader, Lightning as shipped
                  (its NVML setting, none of trainyard's patches)
- trainyard-bare: trainyard's task, data module and Trainer set-up, callbacks and logger off
- trainyard:      trainyard as users run it: default callbacks (checkpointing, early
                  stopping, LR monitor, progress), CSV logger, atomic checkpoint IO, run dir

A step's time is the interval between consecutive batch starts (loading, hooks, forward,
backward, optimizer), inside one long epoch, after warm-up; variants are interleaved and
each ratio to ``plain`` is reported for the median run and for the best (least disturbed)
run. The plain loops run without the NVML setting that importing Lightning makes, as they
would in a process of their own. Targets (issue 10): trainyard / plain <= 1.00 in every
case; trainyard / trainyard-bare <= 1.03.

``host8`` (a 16-8-10 MLP at batch 8) has no target: its step is almost all per-step
bookkeeping, so the microseconds trainyard adds there over ``plain-indexed-fused`` (printed
for every case) are trainyard's own cost per step, what a GPU step of a small model pays too.

Usage: python benchmarks/step_overhead.py [--repeats 5] [--steps 200] [--cases mlp64,...]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from _common import RATIOS, REPO, command_line, goal, names, pickers, report
from _loops import BARE_TRAINER, WARMUP, Timer, dataloader_loop, indexed_loop
from torch.utils.data import DataLoader, TensorDataset

MLP = ["data.shape=[784]", "model=mlp", "model.hidden=[128,64]"]
CASES = {  # name: (overrides, target ratio against the plain loop, or None)
    "mlp64": ([*MLP, "data.batch_size=64"], 1.00),
    "mlp256": ([*MLP, "data.batch_size=256"], 1.00),
    "cnn128": (["data.shape=[3,32,32]", "model=cnn", "data.batch_size=128"], 1.00),
    # a step of almost no arithmetic: what is left is each variant's own cost per step
    # (hooks, bookkeeping), the part that sets the pace of small models on a GPU
    "host8": (["data.shape=[16]", "model=mlp", "model.hidden=[8]", "data.batch_size=8"], None),
}
VARIANTS = (
    "plain", "plain-indexed", "plain-indexed-fused", "lightning-bare", "trainyard-bare", "trainyard"
)  # fmt: skip
CPU = torch.device("cpu")


def compose(overrides: list[str], root: Path, steps: int):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from trainyard import resolvers

    resolvers.register()
    batch = int(next(o for o in overrides if o.startswith("data.batch_size")).split("=")[1])
    samples = int((steps + WARMUP + 2) * batch / 0.99) + 1
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(
            "train",
            overrides=[
                "data=synthetic",
                f"data.num_samples={samples}",
                "data.val_fraction=0.01",
                "data.test_samples=64",
                "trainer.max_epochs=1",
                "test_after_fit=false",
                f"paths.root_dir={root}",
                f"paths.run_dir={root}/run",
                *overrides,
            ],
        )


NVML = "PYTORCH_NVML_BASED_CUDA_CHECK"


@contextlib.contextmanager
def environment(**settings: str | None):
    """Set (or, with None, unset) environment variables for one variant only."""
    saved = {k: os.environ.get(k) for k in settings}
    try:
        for key, value in settings.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@contextlib.contextmanager
def stock_lightning():
    """Lightning as shipped: its NVML setting and none of trainyard's patches (the
    reference). Each patch keeps Lightning's own function as ``__wrapped__``."""
    import pytorch_lightning.loops.training_epoch_loop as loop
    import pytorch_lightning.trainer.call as call

    from trainyard import lean

    places = [(loop, "is_param_in_hook_signature"), (call, "_call_callback_hooks")]
    places += [(enum, "__eq__") for enum in lean._trainer_enums()]
    patched = [getattr(owner, name) for owner, name in places]
    for (owner, name), fn in zip(places, patched, strict=True):
        setattr(owner, name, getattr(fn, "__wrapped__", fn))
    try:
        with environment(**{NVML: "1"}):
            yield
    finally:
        for (owner, name), fn in zip(places, patched, strict=True):
            setattr(owner, name, fn)


def machine(cfg) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype a hand-written loop uses for ``cfg.trainer``."""
    gpu = cfg.trainer.accelerator in ("gpu", "cuda")
    device = torch.device("cuda", 0) if gpu else CPU
    return device, torch.bfloat16 if str(cfg.trainer.precision).startswith("bf16") else None


def run_plain(cfg, loop, fused: bool = False, timer: Timer | None = None) -> float:
    """The median step of ``loop``; ``timer``: one of the benchmarks' own (a profiling one)."""
    # a hand-written loop runs without Lightning, so without the NVML setting it imports
    with environment(**{NVML: None}):
        return _run_plain(cfg, loop, fused, timer or Timer())


def _run_plain(cfg, loop, fused: bool, timer: Timer) -> float:
    from hydra.utils import instantiate

    data = instantiate(cfg.data)
    data.setup()
    task = instantiate(cfg.task)(
        net=instantiate(cfg.model)(input_shape=data.input_shape, num_classes=data.num_classes),
        num_classes=data.num_classes,
        optimizer=instantiate(cfg.optimizer),
        loss=instantiate(cfg.loss),
    )
    # the optimizer as a user builds it (torch's default kernel unless asked), same groups
    kernel = {"fused": True} if fused else {}
    optimizer = task.optimizer_factory(params=task._param_groups(), **kernel)
    x, y = whole_batches(data)
    device, dtype = machine(cfg)
    loop(task.net.to(device), task.loss_fn, optimizer, x, y, data.batch_size, timer, device, dtype)
    return timer.median_step()


def whole_batches(data) -> tuple[torch.Tensor, torch.Tensor]:
    """The training tensors cut to whole batches, for the hand-written loops and the bare
    Trainer: a last batch of one sample stops a network with BatchNorm (ResNet-18) in
    training; trainyard's loader drops such a sample."""
    x, y = data.train_set.tensors
    whole = len(x) - len(x) % data.batch_size
    return x[:whole], y[:whole]


def _timer_callback(timer: Timer):
    from pytorch_lightning.callbacks import Callback

    class Tick(Callback):
        def on_train_batch_start(self, *args) -> None:
            timer.tick()

    return Tick()


def run_lightning_bare(cfg, timer: Timer | None = None) -> float:
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    data = instantiate(cfg.data)
    net = instantiate(cfg.model)(input_shape=data.input_shape, num_classes=data.num_classes)
    factory, loss_fn = instantiate(cfg.optimizer), instantiate(cfg.loss)

    class Bare(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return loss_fn(self.net(x), y)

        def configure_optimizers(self):
            return factory(params=self.parameters())

    timer = timer or Timer()
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        max_epochs=1,
        callbacks=[_timer_callback(timer)],
        **BARE_TRAINER,
    )
    loader = _standard_loader(data, gpu=machine(cfg)[0].type == "cuda")
    trainer.fit(Bare(), train_dataloaders=loader)
    return timer.median_step()


def _standard_loader(data, gpu: bool) -> DataLoader:
    """What a Lightning user passes: a shuffled DataLoader over a TensorDataset."""
    data.setup()
    dataset = TensorDataset(*whole_batches(data))
    return DataLoader(dataset, batch_size=data.batch_size, shuffle=True, pin_memory=gpu)


def run_trainyard(cfg, extras: bool, root: Path, timer: Timer | None = None) -> float:
    from omegaconf import OmegaConf

    from trainyard import preflight
    from trainyard.freeze import freeze
    from trainyard.rundir import RunDir
    from trainyard.worker import build, prepare_process

    overrides = [] if extras else ["callbacks=none", "logger=none"]
    if overrides:
        cfg = OmegaConf.merge(cfg, {"callbacks": None, "logger": None})
    frozen = preflight.check_config(freeze(cfg))
    run = RunDir(Path(frozen.paths.run_dir))
    prepare_process()
    datamodule, task, trainer = build(frozen, run, frozen.trainer.accelerator, 1)
    timer = timer or Timer()
    trainer.callbacks.append(_timer_callback(timer))
    trainer.fit(task, datamodule=datamodule)
    return timer.median_step()


def run_variant(name: str, cfg, root: Path) -> float:
    if name == "plain":
        return run_plain(cfg, dataloader_loop)
    if name == "plain-indexed":
        return run_plain(cfg, indexed_loop)
    if name == "plain-indexed-fused":
        return run_plain(cfg, indexed_loop, fused=True)
    if name == "lightning-bare":
        with stock_lightning():
            return run_lightning_bare(cfg)
    return run_trainyard(cfg, extras=name == "trainyard", root=root)


def measure(case: str, repeats: int, steps: int) -> None:
    overrides, target = CASES[case]
    results: dict[str, list[float]] = {}
    for rep in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose(overrides, Path(tmp), steps)
            shift = rep % len(VARIANTS)  # rotate the order so no variant always goes first
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                results.setdefault(name, []).append(run_variant(name, cfg, Path(tmp)))
    for label, pick in pickers(repeats):
        step = {name: pick(results[name]) for name in VARIANTS}
        ratio = {name: step[name] / step["plain"] for name in VARIANTS[1:]}
        extras = step["trainyard"] / step["trainyard-bare"]
        report(
            f"{case}: per-step time, {label} of {repeats} interleaved runs x {steps} steps "
            f"({RATIOS})",
            [
                *[(f"{name} [ms/step]", 1e3 * value, "") for name, value in step.items()],
                *[
                    (f"{name} / plain", value, "")
                    for name, value in ratio.items()
                    if name != "trainyard"
                ],
                (
                    "trainyard / plain",
                    ratio["trainyard"],
                    goal(ratio["trainyard"], target) if target else "",
                ),
                (
                    "trainyard / plain-indexed-fused (trainyard and Lightning)",
                    step["trainyard"] / step["plain-indexed-fused"],
                    "",
                ),
                (
                    "trainyard - plain-indexed-fused [us/step]",
                    1e6 * (step["trainyard"] - step["plain-indexed-fused"]),
                    "",
                ),
                (
                    "trainyard / trainyard-bare (callbacks, logger, run dir)",
                    extras,
                    goal(extras, 1.03),
                ),
            ],
        )


def step_command_line(doc: str, cases, repeats: int) -> argparse.ArgumentParser:
    """The options both step benchmarks take (this one and gpu_step.py)."""
    parser = command_line(doc)
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved runs per case")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per run")
    parser.add_argument(
        "--cases", type=names(cases), default=list(cases),
        help=f"comma-separated, of: {', '.join(cases)}",
    )  # fmt: skip
    return parser


def quiet() -> None:
    """No warnings or Lightning info lines between the tables."""
    import pytorch_lightning  # noqa: F401  (its import sets its logger's level: first)

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


def main() -> None:
    args = step_command_line(__doc__, CASES, repeats=5).parse_args()
    torch.set_num_threads(2)
    quiet()
    for case in args.cases:
        measure(case, args.repeats, args.steps)


if __name__ == "__main__":
    main()
