"""Slurm through submitit: a job per trial, a sweep as job arrays, one srun task per device.

The request is submitit's own sbatch script (``submitit.SlurmExecutor``, the executor that
hydra-submitit-launcher drives), rendered with the same function submitit uses when it
submits, so the dry run shows exactly what sbatch receives. Every srun task runs
``python -u -m submitit.core._submit <folder>``, which calls
:class:`~trainyard.backends.slurm_task.SlurmTrial` with the trial's run directory: the
trial's frozen config travels as a path, never as overrides, argv or config values in the
script. Requeueing after the time-limit warning and after preemption is described in
:mod:`trainyard.backends.slurm_task`; Lightning's own Slurm auto-requeue is off.

Values that go into ``#SBATCH`` lines are refused unless they are one plain token: sbatch
reads those lines itself, and a newline would end the comment and start a command.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainyard.backends.base import Backend, Job
from trainyard.errors import ConfigError, TrainyardError

# submitit's warning signal before the time limit (its default; submitit reads the same
# SUBMITIT_PREEMPT_SIGNAL variable on both sides)
WARNING_SIGNAL = "USR2"


class SlurmError(TrainyardError):
    """The Slurm controller refused or could not take the request."""

    exit_code = 2


@dataclass
class SlurmRequest:
    """One submission: submitit's executor ``params`` and ``folder`` for ``trials``, and
    the exact sbatch ``script`` submitit writes for them."""

    script: str
    params: dict[str, Any]
    trials: list[Path]
    folder: Path  # submitit's folder (with %j): job pickles, results and logs
    python: str  # the command that starts Python on the nodes
    max_num_timeout: int = 3
    options: list[str] = field(default_factory=list)  # none: everything is in the script

    def __str__(self) -> str:
        """The dry run: which trial each array task runs, then the script sbatch gets."""
        shown = list(enumerate(self.trials))
        if len(shown) > 20:  # a 10,000-trial array: the first and the last few
            shown = [*shown[:10], (None, f"... {len(shown) - 20} more ..."), *shown[-10:]]
        tasks = "".join(f"#   task {i}: {t}\n" if i is not None else f"#   {t}\n" for i, t in shown)
        if len(self.trials) == 1:
            return f"# sbatch <this script>, one job for the trial {self.trials[0]}\n{self.script}"
        return f"# sbatch <this script>, one array task per trial:\n{tasks}{self.script}"


_TOKEN = re.compile(r"^[A-Za-z0-9_.,:@+=/&|()\[\]*!-]+$")  # constraints keep & | ( ) [ ] *
_OPTION = re.compile(r"^[a-z][a-z0-9_-]*$")


def _token(key: str, value) -> str:
    text = str(value)
    if not _TOKEN.match(text):
        raise ConfigError(
            f"cluster.{key}={text!r} cannot go into an sbatch option (whitespace, quotes, "
            "newlines, % and shell characters are refused)",
            fix=f"cluster.{key}=<a plain value, as sbatch --{key.replace('_', '-')} takes it>",
        )
    return text


def _setting(cluster: dict, key: str, default):
    """``cluster[key]``, or ``default`` when it is unset (0 is a setting, not unset)."""
    value = cluster.get(key)
    return default if value is None else value


def check_signal(cluster: dict, preempt: list[str]) -> None:
    """The time-limit warning must be a signal trainyard stops on, and leave time to
    train before it arrives."""
    names = {str(p).upper().removeprefix("SIG") for p in preempt}
    if WARNING_SIGNAL not in names:
        raise ConfigError(
            f"signals.preempt does not include SIG{WARNING_SIGNAL}, Slurm's warning before "
            "the time limit (submitit's): the job would be killed without a checkpoint",
            fix=f"signals.preempt=[SIGTERM,SIG{WARNING_SIGNAL}]",
        )
    lead = int(_setting(cluster, "signal_delay_s", 90))
    if int(_setting(cluster, "array_parallelism", 1)) < 1:
        raise ConfigError(
            "cluster.array_parallelism must be at least 1 (null: no cap)",
            fix="cluster.array_parallelism=8",
        )
    time_min = int(_setting(cluster, "time_min", 60))
    if time_min and time_min * 60 <= lead:  # 0: no time limit, no warning
        raise ConfigError(
            f"cluster.signal_delay_s={lead}: the warning would come at the start of a job "
            f"with cluster.time_min={cluster.get('time_min')}",
            fix="cluster.time_min larger than the warning's lead time (in minutes)",
        )


# the ranks' rendezvous port, free on the first node: Lightning would derive it from the
# job id, and two jobs whose ids end alike on one node would collide. Drawn below the
# kernel's ephemeral range, which outgoing connections take ports from at any moment (a
# port free when tested was once taken before rank 0 listened: EADDRINUSE)
PORT_SETUP = [
    "read -r low _ < /proc/sys/net/ipv4/ip_local_port_range || low=32768",
    "for port in $(shuf -i 10000-$((low - 1)) -n 50); do",
    '  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { export MASTER_PORT=$port; break; }',
    "done",
]


# A job that asked for no GPU must use none. Where the nodes do not confine devices
# (ConstrainDevices=no) its tasks see every GPU of the node, and `accelerator: auto` would
# take GPUs Slurm gave to other jobs. Exporting CUDA_VISIBLE_DEVICES from the script is not
# enough: slurmstepd unsets it in steps without GPUs wherever gres.conf lists some, so each
# task's own command sets it (python_command), and a container gets no GPU to start with.
NO_GPU_SETUP = [
    "export NVIDIA_VISIBLE_DEVICES=void  # no GPU asked for: containers get none either"
]


def asks_for_gpus(job: Job) -> bool:
    """GPUs asked for by the trainer, or by the site's own options (gres=gpu:4,
    tres_per_task=gres/gpu:1, gpus_per_task=1...)."""
    extra = job.cluster.get("additional_parameters") or {}
    named = any("gpu" in f"{key}={value}".lower() for key, value in extra.items())
    return bool(job.resources.gpus_per_node) or named


def executor_params(job: Job, count: int) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters (sbatch's names) for ``count`` trials."""
    c, r = job.cluster, job.resources
    no_gpu = [] if asks_for_gpus(job) else NO_GPU_SETUP  # first: a site's setup may differ
    params: dict[str, Any] = {
        "job_name": f"trainyard-{job.name}",
        "nodes": r.nodes,
        "ntasks_per_node": r.tasks_per_node,
        "cpus_per_task": r.cpus_per_task,
        "time": int(_setting(c, "time_min", 60)),
        "signal_delay_s": int(_setting(c, "signal_delay_s", 90)),
        "setup": [*no_gpu, *(str(line) for line in c.get("setup") or []), *PORT_SETUP],
        "srun_args": ["--kill-on-bad-exit=1", *_container_srun_args(c)],
        "wckey": None,  # submitit would tag every job "submitit"
        "array_parallelism": int(_setting(c, "array_parallelism", count)),
    }
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "mem", "mem_per_gpu"):
        if c.get(key):
            params[key] = _token(key, c[key])
    extra: dict[str, Any] = {"requeue": True}
    for key, value in sorted((c.get("additional_parameters") or {}).items()):
        if not _OPTION.match(str(key)):
            raise ConfigError(f"cluster.additional_parameters: {key!r} is not an sbatch option")
        # a bare flag; not `value in (...)`: 1 == True would turn `gpus_per_task: 1` into one
        flag = value is True or value is None or value == ""
        extra[key] = True if flag else _token(key, value)
    params["additional_parameters"] = extra
    return params


def _image(container: dict) -> str:
    """The image every task runs: with the submitting commit's tag unless one is given."""
    from trainyard.image import ImageError, reference

    try:
        return reference(str(container["image"]), str(container.get("variant") or "cuda"),
                         bool(container.get("allow_dirty")))  # fmt: skip
    except ImageError as exc:
        raise ConfigError(f"cluster.container.image: {exc}") from None


def _container_srun_args(c: dict) -> list[str]:
    container = c.get("container") or {}
    if container.get("engine") != "pyxis":
        return []
    args = [f"--container-image={_image(container)}"]
    if container.get("mounts"):
        args.append(f"--container-mounts={','.join(container['mounts'])}")
    return args


def python_command(c: dict, gpus: bool = True) -> str:
    """How the nodes start Python: the submitting interpreter on a shared filesystem, the
    image's ``python`` under pyxis, or ``apptainer exec`` of the image. Without ``gpus``,
    with no GPU visible (set in the task itself, after slurmstepd set up its environment)."""
    container = c.get("container") or {}
    engine, image = container.get("engine"), container.get("image")
    if engine and not image:
        raise ConfigError(
            f"cluster.container.engine={engine} needs an image",
            fix="cluster.container.image=<the tag `make image` printed, or a .sif file>",
        )
    python = str(c.get("python") or ("python" if engine else sys.executable))
    # in the image, through its entrypoint (pyxis and `apptainer exec` skip ENTRYPOINT):
    # the versions are logged and a driver too old for the image's CUDA is refused
    hide = [] if gpus else ["env", "CUDA_VISIBLE_DEVICES="]
    entry = [*hide, *(["trainyard-entry"] if engine else [])]
    if engine == "apptainer":
        binds = ["--bind", ",".join(container["mounts"])] if container.get("mounts") else []
        nv = ["--nv"] if gpus else []  # the driver and devices, bound in for GPU jobs only
        return shlex.join(["apptainer", "exec", *nv, *binds, _image(container), *entry, python])
    if engine not in (None, "pyxis"):
        raise ConfigError(
            f"cluster.container.engine={engine!r} is not supported on Slurm",
            fix="cluster.container.engine=pyxis, apptainer or null",
        )
    return shlex.join([*entry, python])


def render_script(request_params: dict[str, Any], folder: Path, python: str, count: int) -> str:
    """submitit's sbatch script, from the function its executor submits with."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(
        command=command, folder=folder, map_count=count if count > 1 else None, **request_params
    )


def split(trials: list[Path], max_array_size: int) -> list[list[Path]]:
    """A sweep larger than the site's MaxArraySize goes out as several arrays."""
    size = max(1, int(max_array_size))
    return [trials[i : i + size] for i in range(0, len(trials), size)] or [[]]


def _run(argv: list[str], what: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(
            f"{argv[0]} is not installed here", fix="submit from a Slurm login node"
        ) from None
    except subprocess.TimeoutExpired:
        raise SlurmError(
            f"{what}: the Slurm controller did not answer within 60 s",
            fix="check the controller (scontrol ping)",
        ) from None
    if out.returncode != 0:
        raise SlurmError(f"{what} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def _controller_states(job_id: str) -> dict[str, str]:
    """Task id -> JobState from ``scontrol show job`` (empty once the job is forgotten)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states: dict[str, str] = {}
    for line in out.splitlines():
        fields = dict(t.split("=", 1) for t in line.split() if "=" in t)
        array, task, state = (
            fields.get("ArrayJobId"),
            fields.get("ArrayTaskId"),
            fields.get("JobState"),
        )
        if not state:
            continue
        name = fields.get("JobId", "")
        if array and task:
            name = f"{array}_{task}" if task.isdigit() else f"{array}_[{task}]"
        for one in _array_tasks(name):
            states[one] = state
    return states


def controller_up() -> bool:
    """``scontrol ping`` answers at once, even when the controller is down."""
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"trainyard: {message}", file=sys.stderr)


def _array_tasks(task: str) -> list[str]:
    """sacct's ``12_[3-5,7%2]`` (array tasks that never started) as ``12_3`` ... ``12_7``."""
    if "_[" not in task:
        return [task] if task else []
    base, _, spec = task.partition("_[")
    out = []
    for part in spec.rstrip("]").split("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit():
            out += [f"{base}_{i}" for i in range(int(low), int(high or low) + 1)]
    return out


class SlurmBackend(Backend):
    name = "slurm"

    def render(self, job: Job) -> list[SlurmRequest]:
        log_dir = Path(job.log_dir or job.trials[0].parent)
        if "%" in str(log_dir):  # sbatch would expand it in the output paths
            raise ConfigError(
                f"{log_dir}: sbatch expands % in paths",
                fix="paths.output_dir=<a directory without %>",
            )
        python = python_command(job.cluster, gpus=asks_for_gpus(job))
        timeouts = int(_setting(job.cluster, "max_requeues_without_progress", 3))
        requests = []
        for trials in split(job.trials, _setting(job.cluster, "max_array_size", 1001)):
            folder = log_dir / ".submitit" / "%j"
            params = executor_params(job, len(trials))
            script = render_script(params, folder, python, len(trials))
            requests.append(SlurmRequest(script, params, trials, folder, python, timeouts))
        return requests

    def check(self, request: SlurmRequest) -> None:
        """``sbatch --test-only``: the controller validates partition, account, QOS, time
        and resource limits and answers without queueing anything. Without sbatch (a
        laptop) there is nothing to ask: the dry run says so and goes on."""
        if shutil.which("sbatch") is None:
            print("trainyard: sbatch is not installed here: the request is not checked by Slurm")
            return
        if not controller_up():  # sbatch would retry for ~20 s before saying so
            raise SlurmError(
                "the Slurm controller is not answering (scontrol ping): nothing was prepared "
                "or queued",
                fix="try again once `scontrol ping` says UP (or ask your cluster's admins)",
            )
        with tempfile.NamedTemporaryFile("w", suffix=".sbatch") as script:
            script.write(request.script)
            script.flush()
            try:
                _run(["sbatch", "--test-only", script.name], "sbatch --test-only")
            except SlurmError as exc:
                raise SlurmError(
                    f"Slurm would refuse this job: {exc.message}",
                    fix="check cluster.partition/account/qos/time_min and trainer.devices / "
                    "num_nodes against the site (sinfo, sacctmgr show assoc)",
                ) from None

    def submit(self, request: SlurmRequest) -> str:
        """submitit's executor pickles one :class:`SlurmTrial` call per trial and submits
        them as one array (one job for a single trial)."""
        import submitit

        from trainyard.backends.slurm_task import SlurmTrial

        executor = submitit.SlurmExecutor(
            request.folder, max_num_timeout=request.max_num_timeout, python=request.python
        )
        executor.update_parameters(**request.params)
        trials = [str(t) for t in request.trials]
        try:
            if len(trials) == 1:
                return executor.submit(SlurmTrial(), trials[0]).job_id
            return executor.map_array(SlurmTrial(), trials)[0].job_id.split("_")[0]
        except Exception as exc:  # submitit raises its own errors with sbatch's stderr
            message = str(exc).strip().splitlines()
            raise SlurmError(
                f"sbatch failed: {message[-1] if message else type(exc).__name__}",
                fix="scontrol ping (is the controller up?), then check the request with "
                "trainyard submit --dry-run",
            ) from None

    def status(self, job_id: str) -> dict[str, str]:
        fields = "JobID,State"
        out = _run(["sacct", "-j", job_id, "-X", "-n", "-P", f"--format={fields}"], "sacct")
        states: dict[str, str] = {}
        for line in out.splitlines():
            task, _, state = line.partition("|")
            for one in _array_tasks(task):
                states.setdefault(one, state.split()[0] if state else "UNKNOWN")
        if not controller_up():  # accounting answers without it; squeue would hang ~20 s
            _warn_once("the Slurm controller is not answering: states come from accounting")
            return states
        # tasks still queued or running, one line each (sacct folds pending array ranges
        # into one row like 12_[3-5%2], and may lag the controller by a moment)
        try:
            out = _run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i|%T"], "squeue")
        except SlurmError as exc:  # a job the controller has forgotten (older than MinJobAge)
            if "Invalid job id" not in exc.message:
                raise
            return states
        for line in out.splitlines():
            task, _, state = line.partition("|")
            if task:
                states[task] = state
        # the controller's own word, while it remembers the job: a job cancelled while it
        # waited to run again after a requeue has no accounting row of its own (sacct still
        # says REQUEUED), and a task cancelled while pending may not be in sacct yet
        states.update(_controller_states(job_id))
        return states

    def logs(self, job_id: str, log_dir: Path | None = None) -> str:
        """The job's output files: found in ``log_dir`` (where :meth:`render` sends them),
        else where the controller says (only while it still remembers the job)."""
        paths: set[Path] = set()
        if log_dir is not None:  # submitit's folder: <job>[_<task>]/<job>_<rank>_log.out|err
            for pattern in (f"{job_id}/*_log.*", f"{job_id}_*/*_log.*"):
                paths.update((Path(log_dir) / ".submitit").glob(pattern))
        if not paths:
            out = _run(["scontrol", "show", "job", job_id], "scontrol show job")
            paths = {Path(t.split("=", 1)[1]) for t in out.split() if t.startswith("StdOut=")}
        return "".join(f"==> {p} <==\n{p.read_text()}" for p in sorted(paths) if p.exists())

    def cancel(self, job_id: str, settle_s: float = 20.0) -> None:
        """``job_id`` may name one array task (``12_3``): only that trial is cancelled.

        A job stopping for the time-limit warning at this very moment may requeue itself
        just before the cancel reaches it (Slurm then drops the cancel of a job it is
        requeueing): what comes back pending is cancelled again, until nothing is left."""
        _run(["scancel", job_id], "scancel")
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            try:
                out = _run(["squeue", "-h", "-r", "-j", job_id, "-o", "%T"], "squeue")
            except SlurmError:  # forgotten by the controller: long gone
                return
            states = out.split()
            if not states:
                return
            if any(s.startswith(("PENDING", "REQUEUE")) for s in states):
                _run(["scancel", job_id], "scancel")
            time.sleep(0.5)
