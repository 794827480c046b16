"""One trial on one rank, built from the frozen config and nothing else.

Whoever starts the ranks (trainyard's local launcher, srun, a Kubernetes pod, a Ray task)
calls :func:`run_rank` with the path of ``config.yaml`` in the run directory. Ranks never
see argv or Hydra overrides, so they cannot disagree about hyperparameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainyard import signals
from trainyard.errors import CheckpointError, ConfigError, InterruptNow, Stopped, TrainingFailed
from trainyard.freeze import load_frozen
from trainyard.rendezvous import global_rank
from trainyard.rundir import RunDir, read_json, write_json


def _limit_threads() -> None:
    """Ranks sharing a machine split its cores instead of each taking all of them."""
    import torch

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        # the Tensor Cores advice asks for a choice trainer.float32_matmul_precision made
        return not message.startswith("💡 Tip") and "that has Tensor Cores" not in message


def _quiet_lightning() -> None:
    """Drop Lightning's advertising, advice the config already answers (matmul precision)
    and a deprecation Lightning triggers itself."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*recommended to use `Trainer\(devices=1.*")
    # trainyard starts the ranks (or srun does, and Lightning then uses it): nothing to hint
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")
    # trainer.accelerator=cpu on a GPU machine is the config's choice, not an oversight
    warnings.filterwarnings("ignore", message=r"GPU available but not used")
    # a resume finds its own best.ckpt there: expected, and said in its own line
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's


@contextlib.contextmanager
def run_logging(run: RunDir, rank: int) -> Iterator[None]:
    """While rank 0 trains, the ``trainyard`` lines (epochs, test, stops) reach the run's
    ``train.log`` and the console however the ranks were started: Hydra already writes
    that file for a run it started; a rank started by trainyard's launcher, srun or
    torchrun, or a process that trains several trials in turn, gets a handler for this
    run only, removed when it ends."""
    if rank != 0:
        yield
        return
    root = logging.getLogger()
    target = (run.root / "train.log").resolve()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    added: list[logging.Handler] = []
    if not any(Path(h.baseFilename).resolve() == target for h in files):
        added.append(logging.FileHandler(target))
    if len(root.handlers) == len(files):  # no console yet
        added.append(logging.StreamHandler(sys.stdout))
    level = root.level
    for handler in added:
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        root.addHandler(handler)
    if added and (level == logging.NOTSET or level > logging.INFO):
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)


def prepare_process() -> None:
    """Per-process settings, made once before anything is built."""
    from trainyard import lean

    _limit_threads()
    _quiet_lightning()
    lean.apply()


def _digest(named_tensors) -> str:
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors):
        digest.update(name.encode())
        # the raw bytes, in any dtype (numpy has no bfloat16: a bf16-true run ended here)
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def state_digest(module) -> str:
    """A hash of every parameter and buffer: what a bit-identical resume must reproduce."""
    return _digest(module.state_dict().items())


def weights_digest(module) -> str:
    """A hash of every parameter: equal on all ranks iff DDP kept them in sync.

    Buffers are left out on purpose: BatchNorm running statistics are updated by each
    rank's own last forward pass, so they legitimately differ (checkpoints keep rank 0's;
    trainer.sync_batchnorm=true synchronises them).
    """
    return _digest(module.named_parameters())


def build_strategy(cfg: DictConfig) -> Any:
    strategy = cfg.trainer.get("strategy", "auto")
    if strategy != "ddp":
        return strategy
    from pytorch_lightning.strategies import DDPStrategy

    return DDPStrategy(
        timeout=timedelta(seconds=float(cfg.dist.timeout_s)),
        process_group_backend=cfg.dist.get("backend"),
        find_unused_parameters=bool(cfg.dist.get("find_unused_parameters", False)),
    )


def build_net(cfg: DictConfig, datamodule) -> Any:
    """The network, sized from the data; a model that cannot take it is a ConfigError."""
    from hydra.utils import instantiate

    from trainyard.models.resnet import WeightsError

    try:
        return instantiate(cfg.model)(
            input_shape=datamodule.input_shape, num_classes=datamodule.num_classes
        )
    except WeightsError as exc:
        raise CheckpointError(
            str(exc), fix="point model.weights at a torchvision resnet18 state_dict, or null"
        ) from exc
    except ValueError as exc:  # the model cannot take this data's shape
        raise ConfigError(
            f"model {cfg.model._target_.rsplit('.', 1)[-1]} does not fit the data: {exc}",
            fix="pick a model for this input (images: cnn, mlp, resnet18; sequences: rnn, mlp)",
        ) from exc


def task_specs(cfg: DictConfig, datamodule) -> dict[str, dict | None]:
    """The task's network, optimizer, scheduler and loss as plain data (trainyard.tasks.specs):
    their config sections, the network sized from the data as :func:`build_net` sizes it."""

    def plain(key: str) -> dict | None:
        node = cfg.get(key)
        # unresolved: an ${oc.env:...} secret that config.yaml keeps as a reference must not
        # be written into checkpoints resolved (a spec left with it is not recorded)
        return OmegaConf.to_container(node, resolve=False) if node else None

    net = {k: v for k, v in plain("model").items() if k != "_partial_"}
    net.update(input_shape=list(datamodule.input_shape), num_classes=datamodule.num_classes)
    return {
        "net": net,
        "optimizer": plain("optimizer"),
        "scheduler": plain("scheduler"),
        "loss": plain("loss"),
    }


def own_signals(trainer) -> None:
    """trainyard owns the stop signals (:mod:`trainyard.signals`): Lightning's own handlers
    broadcast a tensor from inside the signal handler (a collective that can meet another
    one mid-flight) and on every training step, and Slurm auto-requeue would requeue from a
    checkpoint written mid-step. Turned off on this trainer only."""
    from trainyard import lean

    if not lean.verified():
        return
    trainer._signal_connector.register_signal_handlers = lambda: None
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None


def build(cfg: DictConfig, run: RunDir, accelerator: str, devices: int) -> tuple[Any, Any, Any]:
    """Instantiate datamodule, task and trainer from the frozen config and this machine."""
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import ProgressBar

    from trainyard import compute
    from trainyard.callbacks.checkpoint_io import AtomicCheckpointIO
    from trainyard.callbacks.resume import ResumeCheckpoint
    from trainyard.data.base import ClassificationDataModule
    from trainyard.lean import FastPassThroughProfiler

    datamodule = instantiate(cfg.data)
    net = build_net(cfg, datamodule)
    trainer_cfg = dict(cfg.trainer)
    settings = compute.take_settings(trainer_cfg)  # trainyard's keys, not the Trainer's
    compute.set_matmul_precision(settings.get("float32_matmul_precision"))
    trainer_cfg["benchmark"] = compute.cudnn_benchmark(trainer_cfg, accelerator)
    if settings.get("compile"):
        compute.compile_network(net, settings.get("compile_mode"))
    # The task runs the optimization loop itself (see trainyard.tasks.classifier), so these
    # trainer settings go to it; Lightning refuses them under manual optimization.
    optimization = {
        "accumulate_grad_batches": trainer_cfg.pop("accumulate_grad_batches", 1),
        "gradient_clip_val": trainer_cfg.pop("gradient_clip_val", None),
        "gradient_clip_algorithm": trainer_cfg.pop("gradient_clip_algorithm", None) or "norm",
    }
    task = instantiate(cfg.task)(
        net=net,
        num_classes=datamodule.num_classes,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        loss=instantiate(cfg.loss),
        **optimization,
    )
    if hasattr(task, "record_specs"):  # so that a checkpoint alone rebuilds the task
        task.record_specs(**task_specs(cfg, datamodule))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    every = OmegaConf.select(cfg, "signals.check_every_n_steps", default=10)
    callbacks.append(ResumeCheckpoint(run.last_ckpt, check_every_n_steps=every))
    from trainyard.callbacks.pruning import SWEEP_FILE, SweepPruning

    if (run.root / SWEEP_FILE).exists():  # a trial of trainyard's Optuna sweeper
        callbacks.append(SweepPruning(run.root, cfg.monitor))
    logger = instantiate(cfg.logger, **_logger_version(cfg, run)) if cfg.get("logger") else False
    if logger is False:  # nothing to log learning rates to: Lightning would refuse the monitor
        from pytorch_lightning.callbacks import LearningRateMonitor

        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer_cfg.setdefault("profiler", FastPassThroughProfiler())
    trainer_cfg.update(accelerator=accelerator, devices=devices)
    if isinstance(datamodule, ClassificationDataModule):
        # its loaders shard per rank themselves, resumably (trainyard.data.loader)
        trainer_cfg["use_distributed_sampler"] = False
    trainer = instantiate(
        trainer_cfg,
        strategy=build_strategy(cfg),
        callbacks=callbacks,
        logger=logger,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run.root),
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
    )
    own_signals(trainer)
    # in the dtype the precision trains in (64-true, bf16-true) before anything loads into
    # it: Lightning restores a checkpoint before its precision converts the module, which
    # rounded 64-true weights through float32 on every resume
    trainer.precision_plugin.convert_module(task)
    return datamodule, task, trainer


_VERSIONED_LOGGERS = ("CSVLogger", "TensorBoardLogger")


def _logger_version(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """logs/version_N numbered like the attempts (from 1): version_2 holds attempt 2's
    metrics, whatever versions an earlier attempt left (Lightning would count from 0)."""
    target = str(OmegaConf.select(cfg, "logger._target_", default=""))
    if OmegaConf.select(cfg, "logger.version") is not None or not target.endswith(
        _VERSIONED_LOGGERS
    ):
        return {}
    status = read_json(run.status_file) if run.status_file.exists() else {}
    # rank 0 records the new attempt only after building: this is the one about to start
    return {"version": int(status.get("attempt", 0)) + 1}


def checked_resume_path(run: RunDir) -> str | None:
    """``last.ckpt`` if there is one and it loads; a corrupt one stops the run, untouched."""
    path = run.last_ckpt
    if not path.exists():
        return None
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError("no state_dict in it")
    except Exception as exc:
        raise CheckpointError(
            f"{path} is corrupt and cannot be resumed from ({exc}); it was left as it is",
            fix=f"move it away to start this trial over (mv {path} {path}.bad), "
            "or restore a good copy",
        ) from exc
    return str(path)


def _metrics(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def best_checkpoint(trainer) -> str | None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
            return callback.best_model_path
    return None


def init_weights(cfg: DictConfig, net, quiet: bool = False) -> None:
    """Start ``net`` from ``init_from``'s weights (every rank loads the same file); a file
    that is not a trainyard checkpoint, or weights that do not fit the network, are a
    ConfigError naming what differs."""
    from trainyard import preflight

    source = preflight.init_source(cfg)
    if source is None:
        return
    import torch

    def refuse(problem: str) -> ConfigError:
        return ConfigError(
            f"init_from={cfg.init_from}: {source} {problem}",
            fix="init_from a run (or .ckpt) of the same model and data, or init_from=null",
        )

    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise refuse(f"cannot be read as a checkpoint ({str(exc).splitlines()[0]})") from None
    found = state.get("state_dict", {}) if isinstance(state, dict) else {}
    weights = {k[4:]: v for k, v in found.items() if k.startswith("net.")}
    if not weights:
        raise refuse("holds no network weights (net.*): not a trainyard checkpoint")
    try:
        result = net.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes that differ
        sizes = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise refuse(f"does not fit this network: {'; '.join(sizes[:3]) or exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise refuse(
            f"does not fit this network: {len(result.missing_keys)} weights missing "
            f"({', '.join(result.missing_keys[:3])}), {len(result.unexpected_keys)} "
            f"unexpected ({', '.join(result.unexpected_keys[:3])})"
        )
    if not quiet:
        logging.getLogger("trainyard").info("network weights from %s", source)


def apply_dist_environment(cfg: DictConfig) -> None:
    """Set ``dist.*`` debug switches before the process group starts. torch.distributed
    reads TORCH_DISTRIBUTED_DEBUG when it is imported, which has happened by now: it is
    told again."""
    from trainyard import preflight

    env = preflight.dist_environment(cfg)
    os.environ.update(env)
    if "TORCH_DISTRIBUTED_DEBUG" in env:
        import torch.distributed as dist

        dist.set_debug_level_from_env()


def _process_group_backend() -> str | None:
    """The collectives' backend this rank used (gloo, nccl); None when it trained alone."""
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None


def run_rank(config_path: str) -> float | None:
    """Train one trial on this rank; rank 0 records status and result. Returns the metric.

    A stop request (a preemption signal, Ctrl-C) ends it with :class:`Stopped` after
    ``last.ckpt`` was saved at a step boundary; rank 0 records ``preempted`` or
    ``interrupted``, and the next attempt resumes from that checkpoint.
    """
    cfg = load_frozen(config_path)
    signals.install(OmegaConf.select(cfg, "signals.preempt", default=signals.DEFAULT_PREEMPT))
    run = RunDir(Path(config_path).parent)
    rank = global_rank()
    # which frozen config this rank trains from: the same bytes on every rank and attempt
    digest = hashlib.sha256(Path(config_path).read_bytes()).hexdigest()[:16]
    # srun sets no LOCAL_RANK (Lightning's Slurm environment reads SLURM_LOCALID too)
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    run.write_rank_info(rank, local_rank=local_rank, config_sha256=digest)
    with run_logging(run, rank):
        try:
            return _run_rank(cfg, run, rank)
        except Stopped as exc:
            if rank == 0:  # however this rank was started: in-process, launched, srun
                note_in_train_log(run, exc.render())
            raise


def _run_rank(cfg: DictConfig, run: RunDir, rank: int) -> float | None:
    from trainyard import preflight

    accelerator, devices = preflight.check_machine(cfg)
    # what this rank trains on, and the GPUs its scheduler left it (null: not restricted)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    run.write_rank_info(rank, accelerator=accelerator, cuda_visible_devices=visible)
    apply_dist_environment(cfg)
    # ranks a scheduler started directly (srun): rank 0 becomes the one trainer of the trial
    claim = run.claim() if rank == 0 and os.environ.get("TRAINYARD_CLAIMED") != "1" else None
    prepare_process()
    try:
        return _fit_and_test(cfg, run, rank, accelerator, devices)
    except (Stopped, InterruptNow) as exc:
        if rank == 0:
            state = exc.state if isinstance(exc, Stopped) else "interrupted"
            reason = getattr(exc, "message", "a second Ctrl-C")
            run.transition(state, reason=reason, step=getattr(exc, "step", None))
        raise
    finally:
        if claim is not None:
            claim.release()


def _fit_and_test(cfg, run: RunDir, rank: int, accelerator: str, devices: int):
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_path = checked_resume_path(run)
    datamodule, task, trainer = build(cfg, run, accelerator, devices)
    if ckpt_path is None:  # a resume has the weights it reached in last.ckpt
        init_weights(cfg, task.net)
    if trainer.world_size == 1:  # several ranks agree on it at train start instead
        signals.raise_if_requested("before training started")
    if rank == 0:
        digest = read_json(run.ranks / "rank0.json").get("config_sha256")
        job = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job_id = f"{job[0]}_{job[1]}" if all(job) else os.environ.get("SLURM_JOB_ID")
        status = run.transition("running", resumed_from=ckpt_path, config_sha256=digest, job=job_id)
        if ckpt_path:
            logging.getLogger("trainyard").info(
                "resuming (attempt %s) from %s", status["attempt"], Path(ckpt_path).name
            )
    started = time.time()
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.interrupted:
        raise TrainingFailed("training was interrupted before it finished")
    # before testing reloads the best checkpoint on every rank (which would hide a drift)
    run.write_rank_info(
        rank,
        state="fitted",
        lr=[group["lr"] for group in trainer.optimizers[0].param_groups],
        global_step=trainer.global_step,
        weights=weights_digest(task),
        full_state=state_digest(task),
        backend=_process_group_backend(),
    )
    fit_metrics = _metrics(trainer)
    from trainyard.callbacks.resume import agreed_stop

    if agreed_stop(trainer):
        signals.raise_if_requested("after training, before testing (last.ckpt is final)")
    test_metrics: dict[str, float] = {}
    if cfg.get("test_after_fit", True):
        best = best_checkpoint(trainer)
        trainer.test(task, datamodule=datamodule, ckpt_path=best, verbose=False)
        test_metrics = _metrics(trainer)
    result = _result(cfg, trainer, fit_metrics, test_metrics, started)
    metric = result["value"]  # the best monitored value: the checkpoint that was tested
    if rank == 0:
        write_json(run.result_file, result)
        pruned = run.root / "pruned.json"  # stopped early by its sweep (callbacks/pruning.py)
        extra = {"pruned_at_epoch": read_json(pruned).get("epoch")} if pruned.exists() else {}
        run.transition("completed", metric=metric, **extra)
    leave_process_group()
    return metric


def leave_process_group() -> None:
    """Close the process group once the trial is done: left to interpreter teardown, gloo's
    threads can abort the process (``terminate called without an active exception``) and
    turn a finished rank into a failed one under torchrun or srun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _result(cfg, trainer, fit_metrics, test_metrics, started) -> dict[str, Any]:
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    best = float(ckpt.best_model_score) if ckpt and ckpt.best_model_score is not None else None
    last = fit_metrics.get(cfg.monitor)
    return {
        "monitor": cfg.monitor,
        # what status shows and sweepers get: the best epoch's value (its checkpoint is the
        # one tested), or the last epoch's when no checkpoint watches the metric
        "value": best if best is not None else last,
        "best_value": best,
        "last_value": last,
        "best_checkpoint": ckpt.best_model_path if ckpt else None,
        "metrics": {**fit_metrics, **test_metrics},
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "duration_s": round(time.time() - started, 3),
    }


def _error_file(run: RunDir, rank: int, kind: str, message: str, code: int) -> None:
    info = {"type": kind, "message": message, "exit_code": code}
    write_json(run.ranks / f"rank{rank}.error.json", info)


def exit_now(code: int) -> None:
    """Leave without running interpreter teardown: gloo's threads can abort the process
    (``terminate called without an active exception``) when destructors run at exit, which
    would turn a finished rank into a failed one. Everything worth keeping is on disk."""
    import contextlib
    import sys

    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_rank_and_exit(config_path: str, report_stop: bool = True) -> None:
    """Train this rank and exit with the code :func:`run_rank_code` returns."""
    exit_now(run_rank_code(config_path, report_stop))


def run_rank_code(config_path: str, report_stop: bool = True) -> int:
    """Train this rank; return a code that says how it ended (0, 2 bad input, 3 failed,
    75 preempted, 130 interrupted), leaving an error file for the launcher and, on rank 0,
    the state in status.json. Nothing escapes but the code.

    ``report_stop``: rank 0 prints why training stopped; False where the launcher that
    started the ranks prints it to the same console (it would be there twice)."""
    import sys
    import traceback

    from trainyard.errors import EXIT_FAILED, EXIT_INTERRUPTED, TrainyardError, TrialBusy

    run, rank, code = RunDir(Path(config_path).parent), global_rank(), EXIT_FAILED
    try:
        run_rank(config_path)
        code = 0
    except Stopped as exc:
        code = exc.exit_code
        if rank == 0 and report_stop:
            print(f"trainyard: {exc.render()}", file=sys.stderr)
    except InterruptNow:
        code = EXIT_INTERRUPTED
    except TrialBusy as exc:  # someone else's attempt: record nothing in its directory
        code = exc.exit_code
        print(f"trainyard: rank {rank}: {exc.render()}", file=sys.stderr)
    except TrainyardError as exc:
        code = exc.exit_code
        print(f"trainyard: rank {rank}: {exc.render()}", file=sys.stderr)
        _failed(run, rank, type(exc).__name__, exc.render(), code)
    except Exception as exc:
        traceback.print_exc()
        _failed(run, rank, type(exc).__name__, f"{type(exc).__name__}: {exc}", code)
    return code


def note_in_train_log(run: RunDir, message: str) -> None:
    """A line at the end of train.log, where the run's epochs are, without a console copy
    (whoever catches the stop prints it there)."""
    record = logging.LogRecord("trainyard", logging.INFO, __file__, 0, message, None, None)
    with contextlib.suppress(OSError), open(run.root / "train.log", "a") as log:
        log.write(logging.Formatter(_LOG_FORMAT).format(record) + "\n")


def _failed(run: RunDir, rank: int, kind: str, message: str, code: int) -> None:
    _error_file(run, rank, kind, message, code)
    if rank == 0 and run.state != "failed":
        # the whole message (bounded): Hydra's first line often only names the target
        run.transition("failed", error=message.strip()[-2000:], exit_code=code, rank=rank)


def main(argv: list[str] | None = None) -> None:
    """``python -m trainyard.worker <run_dir>/config.yaml``: one rank, as a scheduler
    starts it (srun, a Kubernetes container)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m trainyard.worker <run_dir>/config.yaml", file=sys.stderr)
        sys.exit(2)
    run_rank_and_exit(args[0])


if __name__ == "__main__":
    main()
