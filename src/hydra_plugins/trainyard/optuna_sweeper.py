"""``hydra/sweeper=trainyard_optuna``: grid, random and Bayesian (TPE) search on a current
Optuna, with pruning, for any Hydra app and any launcher; ``conf/sweep/`` selects it.

hydra-optuna-sweeper pins optuna<3, whose database storage breaks with SQLAlchemy 2: this
one is written against Optuna 4+ and keeps what a cluster sweep needs:

- **asynchronous**: with ``n_jobs`` > 1 and a launcher that can send trials without waiting
  (trainyard's: local background processes, Ray, Slurm, Kubernetes), a trial is asked for
  as soon as one ends, so nobody waits for the slowest of a batch. Other launchers get
  batches of ``n_jobs``.
- **on disk**: the study is Optuna's journal file in the sweep directory
  (:mod:`trainyard.search`). Relaunching the same command continues it: finished trials
  are not run again, trials left running by a driver that died are launched again (their
  run directories resume from ``last.ckpt``), failed ones are retried up to
  ``max_failures`` times (bad input never), and new ones are asked for until ``n_trials``
  have ended.
- **pruning**: trials report their monitored metric after each validation to the study
  (:class:`trainyard.callbacks.pruning.SweepPruning`) and stop when the pruner says so.
"""

# no `from __future__ import annotations`: Hydra imports plugin modules without putting
# them in sys.modules, and dataclasses then cannot resolve string annotations
import itertools
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper

log = logging.getLogger("trainyard")


@dataclass
class TrainyardOptunaConf:
    _target_: str = "hydra_plugins.trainyard.optuna_sweeper.TrainyardOptunaSweeper"
    sampler: str = "tpe"  # grid | random | tpe (Bayesian: Optuna's TPE)
    n_trials: int | None = None  # trials that end (completed, pruned, failed for good);
    #                                 null: the whole grid (grid), else 20
    n_jobs: int = 1  # trials in flight at once
    pruner: str | None = None  # none | median | asha (successive halving)
    min_resource: int = 1  # epochs a trial trains before it may be pruned
    reduction_factor: int = 3  # asha: the fraction kept at each rung is 1/reduction_factor
    seed: int | None = None  # the sampler's seed (null: a new search each study)
    direction: str | None = None  # maximize | minimize; null: from monitor_mode
    storage: str | None = None  # the study's journal file; null: <sweep dir>/study.journal
    study_name: str | None = None  # null: the sweep directory's name
    max_failures: int = 2  # a failed trial is run again this many times (bad input: never)
    poll_s: float = 1.0  # how often to look at trials in flight (asynchronous launchers)
    # the search space, as overrides: {optimizer.lr: "tag(log,interval(1e-5,1e-1))"};
    # sweep overrides on the command line are added to it
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="trainyard_optuna", node=TrainyardOptunaConf
)


@dataclass
class _Flight:
    number: int  # the Optuna trial's
    trial_id: int
    params: dict[str, Any]
    overrides: list[str]
    run_dir: Path | None
    job: int  # Hydra's job number (hydra.job.num)
    handle: Any = None  # what the launcher's start() returned


class TrainyardOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = TrainyardOptunaConf(**settings)
        self.launcher: Any = None
        self.config: Any = None
        self.hydra_context: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from trainyard.errors import Stopped, TrainyardError

        try:
            return _Search(self, arguments).run()
        except Stopped as exc:  # the trials in flight stay with their cluster
            where = self.config.hydra.sweep.dir
            print(
                f"trainyard: {exc.message}; launching the same command again continues "
                f"the study and follows them (trainyard status {where})",
                file=sys.stderr,
            )
            sys.exit(exc.exit_code)
        except TrainyardError as exc:
            print(f"trainyard: {exc.render()}", file=sys.stderr)
            _remove_empty(self.config)
            sys.exit(exc.exit_code)


class _Search:
    """One launch of a sweep: the study, the trials in flight, and the loop."""

    def __init__(self, sweeper: TrainyardOptunaSweeper, arguments: list[str]) -> None:
        from omegaconf import OmegaConf

        from trainyard import search

        self.sweeper, self.s = sweeper, sweeper.settings
        config = sweeper.config
        params = [f"{k}={v}" for k, v in (self.s.params or {}).items()]
        space, fixed = search.parse_space(params)
        cli_space, cli_fixed = search.parse_space(list(arguments))
        self.space, self.fixed = {**space, **cli_space}, fixed + cli_fixed
        if not self.space:
            from trainyard.errors import ConfigError

            raise ConfigError(
                "nothing to search: no override sweeps over values",
                fix="give a space, e.g. optimizer.lr='tag(log,interval(1e-5,1e-1))' "
                "model.hidden='choice(64,128)'",
            )
        self.metric = str(OmegaConf.select(config, "monitor", default="objective"))
        mode = OmegaConf.select(config, "monitor_mode", default="min")
        self.direction = self.s.direction or ("maximize" if mode == "max" else "minimize")
        self.trainyard_app = OmegaConf.select(config, "cluster.backend") is not None
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.in_flight: dict[int, _Flight] = {}
        self.next_job = 0
        self.returns: list[list[Any]] = []  # per launch, as Hydra's sweepers return them
        self.compositions: Any = None  # trainyard.sweep_launch.Compositions, made on use

    # --- setting up -------------------------------------------------------------------

    def run(self) -> Any:
        import optuna
        from omegaconf import OmegaConf

        from trainyard import search

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial: ours
        self._check_composes()
        sampler = search.sampler(self.s.sampler, self.space, self.s.seed)  # (checks a grid)
        pruner = search.pruner(self.s.pruner, self.s.min_resource, self.s.reduction_factor)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.sweeper.config, self.sweep_dir / "multirun.yaml")
        storage = Path(self.s.storage or self.sweep_dir / "study.journal").absolute()
        name = self.s.study_name or self.sweep_dir.name
        defined = search.definition(self.space, self.fixed, self.metric, self.direction)
        with _driving(self.sweep_dir):
            self.study = search.open_study(storage, name, defined, sampler, pruner)
            if self.study.trials and self.s.seed is not None:
                # a relaunch: the seeded sampler goes on, rather than drawing its first
                # points again
                seed = self.s.seed + len(self.study.trials)
                self.study.sampler = search.sampler(self.s.sampler, self.space, seed)
            self.storage = storage
            self.budget = self._budget()
            print(
                f"trainyard: sweep {self.sweep_dir} ({len(self.study.trials)} trial(s) in "
                f"its study; launching the same command again continues it)",
                flush=True,
            )
            if self.s.sampler == "grid" and not self.study.trials:
                # the grid in the order it was written, as Hydra's basic sweeper walks it
                for point in itertools.product(*search.grid(self.space).values()):
                    self.study.enqueue_trial(dict(zip(self.space, point, strict=True)))
            self._loop()
        self._finish()
        return self.returns

    def _budget(self) -> int:
        from trainyard import search

        if self.s.sampler == "grid":
            size = math.prod(len(v) for v in search.grid(self.space).values())
            return min(size, int(self.s.n_trials)) if self.s.n_trials is not None else size
        return int(self.s.n_trials) if self.s.n_trials is not None else 20

    def _check_composes(self) -> None:
        """Compose one point of the space before anything is written: a key that does not
        exist or a value the config refuses stops the sweep here, naming it."""
        from hydra.core.hydra_config import HydraConfig

        from trainyard.errors import ConfigError

        sample = [f"{k}={_first(d)}" for k, d in self.space.items()]
        loader = self.sweeper.hydra_context.config_loader
        try:
            cfg = loader.load_sweep_config(self.sweeper.config, self.fixed + sample)
            HydraConfig.instance().set_config(cfg)
            if self.trainyard_app:  # and what trainyard checks of a config (the metric, ...)
                _check_trainyard(cfg)
        except ConfigError:
            raise
        except Exception as exc:
            hint = _did_you_mean(self.sweeper.config, [*self.space, *self.fixed])
            raise ConfigError(
                f"the search space does not compose ({type(exc).__name__}: {exc})",
                fix=hint or "check the swept keys against the config (trainyard-train --cfg job)",
            ) from None
        finally:
            HydraConfig.instance().set_config(self.sweeper.config)

    # --- the loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        from optuna.trial import TrialState

        stale = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for frozen in stale:  # a driver that died left them: launched again, they resume
            log.info("trainyard: trial %d was left running; launching it again", frozen.number)
        relaunch = list(stale)
        asynchronous = (self.s.n_jobs > 1 and self.trainyard_app
                        and hasattr(self.sweeper.launcher, "start"))  # fmt: skip
        while True:
            room = self.s.n_jobs - len(self.in_flight)
            batch: list[_Flight] = []
            ended = self._ended()  # one read of the study per round, not per trial asked
            while room > 0 and (relaunch or ended + len(self.in_flight) + len(batch)
                                < self.budget):  # fmt: skip
                batch.append(self._flight(relaunch.pop(0) if relaunch else None))
                room -= 1
            if not batch and not self.in_flight:
                return
            if asynchronous:
                for flight in batch:
                    flight.handle = self.sweeper.launcher.start([flight.overrides], flight.job)
                    self.in_flight[flight.number] = flight
                self._collect()
            elif batch:
                overrides = [f.overrides for f in batch]
                returns = self.sweeper.launcher.launch(overrides, batch[0].job)
                self.returns.append(list(returns))
                for flight, ret in zip(batch, returns, strict=True):
                    self._tell(flight, ret)

    def _collect(self) -> None:
        """Wait until at least one trial in flight has ended (then there is room for the
        next), looking every poll_s seconds; a stop signal ends the wait."""
        from trainyard import signals

        while self.in_flight:
            ended = 0
            for number, flight in list(self.in_flight.items()):
                returns = self.sweeper.launcher.collect(flight.handle)
                if returns is not None:
                    del self.in_flight[number]
                    self.returns.append(list(returns))
                    self._tell(flight, returns[0])
                    ended += 1
            if ended:
                return
            request = signals.requested()
            if request is not None:  # the trials stay with the cluster; a relaunch follows them
                raise request.error(f"with {len(self.in_flight)} trial(s) in flight")
            time.sleep(self.s.poll_s)

    def _flight(self, stale: Any) -> _Flight | None:
        """The next trial: one left running, else one the sampler asks for."""
        from trainyard import search

        if stale is not None:
            params, number, trial_id = stale.params, stale.number, stale._trial_id
        else:
            trial = self.study.ask(self.space)
            # the study's own id of the trial, which a trial reports under from elsewhere
            params, number, trial_id = trial.params, trial.number, trial._trial_id
        params = {k: params[k] for k in self.space if k in params}  # the command's order
        overrides = self.fixed + [f"{k}={search.override_value(v)}" for k, v in params.items()]
        job = self.next_job
        self.next_job += 1
        flight = _Flight(number, trial_id, params, overrides, self._run_dir(overrides, job), job)
        self.study._storage.set_trial_user_attr(trial_id, "overrides", overrides)
        self.study._storage.set_trial_user_attr(trial_id, "run_dir", str(flight.run_dir))
        self._mark(flight)
        return flight

    def _run_dir(self, overrides: list[str], job: int) -> Path | None:
        """Where the launcher will put this trial: Hydra's sweep.dir / sweep.subdir."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict

        from trainyard.sweep_launch import Compositions

        if self.compositions is None:
            loader = self.sweeper.hydra_context.config_loader
            self.compositions = Compositions(loader, self.sweeper.config)
        try:
            sweep = self.compositions.load(overrides)
            with open_dict(sweep.hydra.job):
                sweep.hydra.job.num = job
            HydraConfig.instance().set_config(sweep)
            return Path(str(sweep.hydra.sweep.dir)) / str(sweep.hydra.sweep.subdir)
        except Exception:  # it fails again, with the full story, when launched
            return None
        finally:
            HydraConfig.instance().set_config(self.sweeper.config)

    def _mark(self, flight: _Flight) -> None:
        """Tell the trial where its study is, for pruning (before it can start)."""
        from trainyard.callbacks.pruning import SWEEP_FILE
        from trainyard.rundir import write_json

        if flight.run_dir is None:
            return
        flight.run_dir.mkdir(parents=True, exist_ok=True)
        # the pruner is not stored in the study: each process that asks builds its own
        info = {"storage": str(self.storage), "study": self.study.study_name,
                "trial_id": flight.trial_id, "number": flight.number,
                "pruner": self.s.pruner, "min_resource": self.s.min_resource,
                "reduction_factor": self.s.reduction_factor}  # fmt: skip
        write_json(flight.run_dir / SWEEP_FILE, info)

    # --- outcomes ---------------------------------------------------------------------

    def _tell(self, flight: _Flight, ret: Any) -> None:
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        from trainyard.callbacks.pruning import PRUNED_FILE

        value = ret.return_value if ret.status == JobStatus.COMPLETED else None
        pruned = flight.run_dir is not None and (flight.run_dir / PRUNED_FILE).exists()
        shown = " ".join(f"{k}={v}" for k, v in flight.params.items())
        if pruned:
            self.study.tell(flight.number, state=TrialState.PRUNED, skip_if_finished=True)
            print(f"[trial {flight.number}] {shown}: pruned", flush=True)
        elif isinstance(value, int | float) and math.isfinite(value):
            self.study.tell(flight.number, float(value), skip_if_finished=True)
            print(f"[trial {flight.number}] {shown}: {self.metric}={value:.6g}", flush=True)
        else:
            self.study.tell(flight.number, state=TrialState.FAIL, skip_if_finished=True)
            again = self._retry(flight)
            note = "; run again" if again else ""
            print(f"[trial {flight.number}] {shown}: failed{note}", flush=True)

    def _retry(self, flight: _Flight) -> bool:
        """Queue a failed trial's point again, unless its input is bad or it failed too
        often already."""
        from optuna.trial import TrialState

        from trainyard.errors import EXIT_CONFIG
        from trainyard.rundir import RunDir

        if flight.run_dir is not None and (flight.run_dir / "status.json").exists():
            last = RunDir(flight.run_dir).status()["history"][-1]
            if last.get("exit_code") == EXIT_CONFIG:
                return False
        failures = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                    if t.params == flight.params]  # fmt: skip
        if len(failures) > self.s.max_failures:
            return False
        self.study.enqueue_trial(flight.params, skip_if_exists=False)
        # this trial's point is not done: the queued one stands for it in the budget
        self.study._storage.set_trial_user_attr(flight.trial_id, "retried", True)
        return True

    def _ended(self) -> int:
        """Trials that have ended for the budget: completed, pruned, or failed and not run
        again (a point the sampler proposes twice is two trials: the second one finds the
        first's result)."""
        from optuna.trial import TrialState

        final = (TrialState.COMPLETE, TrialState.PRUNED)
        trials = self.study.get_trials(deepcopy=False)
        return sum(t.state in final or (t.state == TrialState.FAIL
                                        and not t.user_attrs.get("retried"))
                   for t in trials)  # fmt: skip

    def _finish(self) -> None:
        from omegaconf import OmegaConf

        from trainyard import train

        completed = [t for t in self.study.trials if t.value is not None]
        recovered = {t.user_attrs.get("run_dir") for t in completed}
        # a trial that failed, then completed when run again, is not a failure of the sweep
        train._failed_trials[:] = [f for f in train._failed_trials if f[0] not in recovered]
        if not completed:
            log.warning("trainyard: no trial of the study completed")
            return
        best = self.study.best_trial
        results = {"name": "trainyard_optuna", "metric": self.metric,
                   "direction": self.direction, "best_params": best.params,
                   "best_value": best.value, "best_trial": best.number,
                   "trials": len(self.study.trials)}  # fmt: skip
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        print(f"best: trial {best.number} {self.metric}={best.value:.6g} {best.params}")


def _did_you_mean(config: Any, keys: list[str]) -> str | None:
    """For a swept key the config lacks, the nearest keys it has (Hydra's own advice is to
    add the misspelt key with +)."""
    import difflib

    from omegaconf import OmegaConf

    known: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            known.append(prefix + str(key))
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    data = OmegaConf.to_container(config, resolve=False)
    data.pop("hydra", None)
    walk(data, "")
    for item in keys:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.") or key in known or "/" in key:
            continue
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
        if close:
            return f"{key} is not in the config; did you mean {' or '.join(close)}?"
    return None


def _remove_empty(config: Any) -> None:
    """A refused sweep leaves nothing behind: the sweep directory Hydra's start made (to
    check that it can write there) goes, with its parents that only held it."""
    from omegaconf import OmegaConf

    stop = Path(str(OmegaConf.select(config, "paths.root_dir", default="/"))).absolute()
    directory = Path(str(config.hydra.sweep.dir)).absolute()
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()  # only when empty
        except OSError:
            return
        directory = directory.parent


def _check_trainyard(cfg: Any) -> None:
    """trainyard's own checks of one trial's config, as its launch would make them."""
    from omegaconf import open_dict

    from trainyard import preflight
    from trainyard.freeze import freeze

    run_dir = Path(str(cfg.hydra.sweep.dir)) / "check"
    with open_dict(cfg):
        del cfg["hydra"]
    cfg.paths.run_dir = str(run_dir)
    preflight.check_config(freeze(cfg), build=False)


def _first(distribution: Any) -> Any:
    from trainyard import search

    if hasattr(distribution, "choices"):
        return search.override_value(distribution.choices[0])
    return search.override_value(distribution.low)


class _driving:
    """One driver per sweep: a second launch while the first still runs would launch its
    trials again."""

    def __init__(self, sweep_dir: Path) -> None:
        self.path = sweep_dir / ".driver.lock"

    def __enter__(self) -> "_driving":
        from filelock import FileLock, Timeout

        from trainyard.errors import RunDirError

        self.lock = FileLock(str(self.path))
        try:  # (a report --watch holds it for an instant to see whether a driver does)
            self.lock.acquire(timeout=2)
        except Timeout:
            raise RunDirError(
                f"another launch of this sweep is driving it ({self.path} is held)",
                fix="wait for it to end, or stop it first; then launch again to continue",
            ) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()


__all__: Sequence[str] = ["TrainyardOptunaConf", "TrainyardOptunaSweeper"]
