"""Slurm: a job per trial, a sweep as job arrays, one srun task per device.

The rendered request is a complete sbatch script plus the sbatch command-line options that
must not be written into it (paths may hold any character; ``#SBATCH`` lines cannot be
quoted). Trials travel as the paths of their prepared run directories in a bash array, each
quoted with :func:`shlex.quote`; no override, argv or config value reaches the script.

Inside the job, srun starts every rank (one task per device, on every node) on
``python -m trainyard.worker <config.yaml>``; Lightning reads the Slurm environment and
launches nothing. Preemption has one owner per case:

- the time limit: Slurm sends ``cluster.signal`` (e.g. USR1, 90 s before) to the ranks,
  which checkpoint at a step boundary and exit 75; the job script then requeues its own
  task (``scontrol requeue``), and the next attempt resumes from ``last.ckpt``;
- preemption and ``scontrol requeue``: Slurm sends SIGTERM, the ranks checkpoint the same
  way within KillWait, and Slurm requeues the job itself.

Lightning's own Slurm auto-requeue is off (trainyard owns the signals).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainyard.backends.base import Backend, Job
from trainyard.errors import EXIT_PREEMPTED, ConfigError, TrainyardError


class SlurmError(TrainyardError):
    """The Slurm controller refused or could not take the request."""

    exit_code = 2


@dataclass
class SlurmRequest:
    """One sbatch call: ``sbatch <options> <script file>`` with ``script`` as the file."""

    script: str
    options: list[str]
    script_path: Path

    def __str__(self) -> str:
        command = shlex.join(["sbatch", *self.options, str(self.script_path)])
        return f"# {command}\n{self.script}"


# A #SBATCH value is read by sbatch, not by a shell, but a newline would end the comment and
# start a command, and whitespace splits it: values are refused unless they are one plain
# token (constraints keep their & | ( ) [ ] * operators).
_TOKEN = re.compile(r"^[A-Za-z0-9_.,:@%+=/&|()\[\]*!-]+$")
_OPTION = re.compile(r"^[a-z][a-z0-9_-]*$")


def _token(key: str, value) -> str:
    text = str(value)
    if not _TOKEN.match(text):
        raise ConfigError(
            f"cluster.{key}={text!r} cannot go into an sbatch option (whitespace, quotes, "
            "newlines and shell characters are refused)",
            fix=f"cluster.{key}=<a plain value, as sbatch --{key.replace('_', '-')} takes it>",
        )
    return text


def check_signal(cluster: dict, preempt: list[str]) -> None:
    """``cluster.signal`` must reach the ranks (not the batch shell, which it would kill),
    be one trainyard stops on, and leave time to train before it arrives."""
    spec = cluster.get("signal")
    if not spec:
        return
    name, _, lead = str(spec).partition("@")
    names = {str(p).upper().removeprefix("SIG") for p in preempt}
    if name.startswith(("B:", "R:")) or name.upper().removeprefix("SIG") not in names:
        raise ConfigError(
            f"cluster.signal={spec!r}: the ranks must receive it (no B: prefix) and it must be "
            f"one of signals.preempt ({', '.join(sorted(names))})",
            fix="cluster.signal=USR1@90",
        )
    if lead and lead.isdigit() and int(cluster.get("time_min") or 60) * 60 <= int(lead):
        raise ConfigError(
            f"cluster.signal={spec!r} comes {lead} s before a time limit of "
            f"{cluster.get('time_min')} min: it would arrive at the start",
            fix="cluster.time_min larger than the signal's lead time",
        )


def _directives(job: Job, count: int) -> list[str]:
    c, r = job.cluster, job.resources
    lines = [
        f"--job-name=trainyard-{job.name}",
        f"--nodes={r.nodes}",
        f"--ntasks-per-node={r.tasks_per_node}",
        f"--cpus-per-task={r.cpus_per_task}",
        f"--time={int(c.get('time_min') or 60)}",
        "--requeue",
        "--open-mode=append",
    ]
    if count > 1:
        parallel = c.get("array_parallelism")
        lines.append(f"--array=0-{count - 1}" + (f"%{int(parallel)}" if parallel else ""))
    if r.gpus_per_node:
        lines.append(f"--gpus-per-node={r.gpus_per_node}")
    for key in ("partition", "account", "qos", "constraint", "mem", "mem_per_gpu", "signal"):
        if c.get(key):
            lines.append(f"--{key.replace('_', '-')}={_token(key, c[key])}")
    for key, value in sorted((c.get("additional_parameters") or {}).items()):
        if not _OPTION.match(str(key)):
            raise ConfigError(f"cluster.additional_parameters: {key!r} is not an sbatch option")
        option = f"--{key.replace('_', '-')}"  # a flag without a value: {exclusive: ""}
        lines.append(f"{option}={_token(key, value)}" if value not in ("", None) else option)
    return lines


def _srun(job: Job) -> str:
    c = job.cluster
    python = c.get("python") or sys.executable
    worker = f'{shlex.quote(str(python))} -u -m trainyard.worker "$config"'
    container = c.get("container") or {}
    engine, image = container.get("engine"), container.get("image")
    mounts = ",".join(container.get("mounts") or [])
    srun = "srun --kill-on-bad-exit=1"
    if engine == "pyxis":
        srun += f" --container-image={shlex.quote(str(image))}"
        if mounts:
            srun += f" --container-mounts={shlex.quote(mounts)}"
        return f"{srun} {worker}"
    if engine == "apptainer":
        binds = f" --bind {shlex.quote(mounts)}" if mounts else ""
        return f"{srun} apptainer exec --nv{binds} {shlex.quote(str(image))} {worker}"
    if engine:
        raise ConfigError(
            f"cluster.container.engine={engine!r} is not supported on Slurm",
            fix="cluster.container.engine=pyxis, apptainer or null",
        )
    return f"{srun} {worker}"


def render_script(job: Job, trials: list[Path]) -> str:
    directives = "\n".join(f"#SBATCH {d}" for d in _directives(job, len(trials)))
    setup = "\n".join(job.cluster.get("setup") or [])
    paths = "\n".join(f"  {shlex.quote(str(t))}" for t in trials)
    return f"""#!/bin/bash
# Rendered by trainyard: one array task per trial, one srun task per device.
{directives}

{setup}
trials=(
{paths}
)
config="${{trials[${{SLURM_ARRAY_TASK_ID:-0}}]}}/config.yaml"
# the ranks' rendezvous port, free on this (the first) node: Lightning would derive it from
# the job id, and two jobs whose ids end alike on one node would collide
for port in $(shuf -i 20000-60000 -n 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || {{ export MASTER_PORT=$port; break; }}
done
{_srun(job)}
code=$?
# exit {EXIT_PREEMPTED}: the ranks saved last.ckpt after Slurm's warning signal; requeue
# this task so that it resumes (preemption and scontrol requeue are requeued by Slurm)
if [ "$code" -eq {EXIT_PREEMPTED} ]; then
  task="${{SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}${{SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}}"
  scontrol requeue "$task"
fi
exit "$code"
"""


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
        log_dir = job.log_dir or job.trials[0].parent
        chunks = split(job.trials, job.cluster.get("max_array_size") or 1001)
        requests = []
        for index, trials in enumerate(chunks):
            suffix = f"-{index}" if len(chunks) > 1 else ""
            # sbatch expands %-patterns in the output path: a literal % is written %%
            escaped = str(log_dir).replace("%", "%%")
            out = f"{escaped}/" + ("slurm-%A_%a.out" if len(trials) > 1 else "slurm-%j.out")
            requests.append(
                SlurmRequest(
                    script=render_script(job, trials),
                    options=["--parsable", f"--output={out}", f"--chdir={log_dir}"],
                    script_path=log_dir / f"{job.name}{job.tag}{suffix}.sbatch",
                )
            )
        return requests

    def check(self, request: SlurmRequest) -> None:
        """``sbatch --test-only``: the controller validates partition, account, QOS, time
        and resource limits and answers without queueing anything. Without sbatch (a
        laptop) there is nothing to ask: the dry run says so and goes on."""
        if shutil.which("sbatch") is None:
            print("trainyard: sbatch is not installed here: the request is not checked by Slurm")
            return
        with tempfile.NamedTemporaryFile("w", suffix=".sbatch") as script:
            script.write(request.script)
            script.flush()
            options = [o for o in request.options if not o.startswith(("--output", "--chdir"))]
            try:
                _run(["sbatch", "--test-only", *options, script.name], "sbatch --test-only")
            except SlurmError as exc:
                raise SlurmError(
                    f"Slurm would refuse this job: {exc.message}",
                    fix="check cluster.partition/account/qos/time_min and trainer.devices / "
                    "num_nodes against the site (sinfo, sacctmgr show assoc)",
                ) from None

    def submit(self, request: SlurmRequest) -> str:
        request.script_path.parent.mkdir(parents=True, exist_ok=True)
        request.script_path.write_text(request.script)
        out = _run(["sbatch", *request.options, str(request.script_path)], "sbatch")
        return out.strip().split(";")[0]

    def status(self, job_id: str) -> dict[str, str]:
        fields = "JobID,State"
        out = _run(["sacct", "-j", job_id, "-X", "-n", "-P", f"--format={fields}"], "sacct")
        states: dict[str, str] = {}
        for line in out.splitlines():
            task, _, state = line.partition("|")
            for one in _array_tasks(task):
                states.setdefault(one, state.split()[0] if state else "UNKNOWN")
        # tasks still queued or running, one line each (sacct folds pending array ranges
        # into one row like 12_[3-5%2], and may lag the controller by a moment)
        out = _run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i|%T"], "squeue")
        for line in out.splitlines():
            task, _, state = line.partition("|")
            if task:
                states[task] = state
        return states

    def logs(self, job_id: str, log_dir: Path | None = None) -> str:
        """The job's output files: found in ``log_dir`` (where :meth:`render` sends them),
        else where the controller says (only while it still remembers the job)."""
        paths: set[Path] = set()
        if log_dir is not None:
            paths.update(log_dir.glob(f"slurm-{job_id}.out"))
            paths.update(log_dir.glob(f"slurm-{job_id}_*.out"))
        if not paths:
            out = _run(["scontrol", "show", "job", job_id], "scontrol show job")
            paths = {Path(t.split("=", 1)[1]) for t in out.split() if t.startswith("StdOut=")}
        return "".join(f"==> {p} <==\n{p.read_text()}" for p in sorted(paths) if p.exists())

    def cancel(self, job_id: str) -> None:
        """``job_id`` may name one array task (``12_3``): only that trial is cancelled."""
        _run(["scancel", job_id], "scancel")
