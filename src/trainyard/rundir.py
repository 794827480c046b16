"""A run directory is an identity.

Its path is derived from the experiment name, the sweep and a stable key made from the
overrides (never from a timestamp), so a requeued or re-run trial finds its own directory
and two different trials never share one. Layout::

    <run_dir>/config.yaml        frozen, resolved config every rank loads
    <run_dir>/provenance.json    git commit, dirty flag, versions, host, seed
    <run_dir>/status.json        current state and the history of transitions
    <run_dir>/result.json        final metrics (written once, by rank 0)
    <run_dir>/checkpoints/       last.ckpt (atomic) and the best checkpoint
    <run_dir>/logs/              logger output, one version per attempt
    <run_dir>/ranks/             one small file per rank (pid, host) for debugging
    <run_dir>/.train.lock        held (flock) by the one process that trains the trial now
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# What defines a trial: every setting of the resolved config except these (dotted keys;
# a key also covers everything below it). They say where files go, how data is read or how
# progress is shown, never what is trained, so changing one finds the same run directory
# (and resumes it with the new value) rather than starting another trial.
NON_IDENTITY_KEYS = (
    "hydra", "paths", "name", "resume", "test_after_fit", "fail_fast", "signals", "logger",
    "cluster", "sweep",
    "callbacks.progress", "callbacks.lr_monitor", "callbacks.checkpoint.dirpath",
    "data.root", "data.download", "data.mirror", "data.lock_timeout_s",
    "data.num_workers", "data.pin_memory", "data.on_device", "data.on_device_fraction",
    "dist.timeout_s", "dist.nccl_debug", "dist.nccl_debug_subsys", "dist.distributed_debug",
    "dist.nccl_socket_ifname", "dist.gloo_socket_ifname",
    "trainer.log_every_n_steps", "trainer.enable_model_summary",
)  # fmt: skip

STATES = ("created", "running", "completed", "failed", "preempted", "interrupted")

_UMASK = os.umask(0o022)
os.umask(_UMASK)

# Keys use only characters that are safe in paths, shells and Hydra override values
# ('=' and ',' would make a run directory path unusable as an override value).
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SLUG_MAX = 64


def is_identity_key(key: str) -> bool:
    """Whether a dotted config key (or a config group, ``model`` or ``hydra/launcher``)
    takes part in a trial's identity."""
    key = key.replace("/", ".")
    return not any(key == k or key.startswith(k + ".") for k in NON_IDENTITY_KEYS)


def one_path(value: str, root: str) -> str:
    """A path spelt one way: absolute (a relative one taken from ``root``), normalised
    (``init_from`` is part of a trial's identity, in its key and in config.yaml alike)."""
    return os.path.normpath(os.path.join(root, value))


def _canonical(override: str) -> str:
    """``key=value`` with the value spelled one way: ``1e-2`` and ``0.01`` are one trial.

    Values are read with Hydra's own override grammar (numbers, booleans, null, quoted
    strings, lists, dicts); ``+`` and ``++`` do not change what is trained, ``~`` does.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        [parsed] = OverridesParser.create().parse_overrides([override])
    except Exception:  # not Hydra's grammar (a test, a hand-made list): keep it verbatim
        return override.lstrip("+")
    key = parsed.key_or_group + (f"@{parsed.package}" if parsed.package else "")
    if parsed.is_delete():
        return f"~{key}"
    if parsed.is_sweep_override():  # a sweep's own key
        from hydra.core.override_parser.types import ChoiceSweep

        sweep = parsed.value()
        if isinstance(sweep, ChoiceSweep) and not sweep.shuffle and not sweep.tags:
            # a list of values: their order and spelling do not make another sweep
            values = (
                v if isinstance(v, str) else json.dumps(v, sort_keys=True) for v in sweep.list
            )
            return f"{key}={','.join(sorted(values))}"
        return f"{key}={parsed.get_value_string()}"  # ranges, intervals: as written
    value = parsed.value()
    if key == "init_from" and isinstance(value, str) and value:  # a path: one spelling
        value = one_path(value, os.environ.get("TRAINYARD_ROOT") or os.getcwd())  # root_dir
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return f"{key}={text}"


def identity_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides that define a trial, canonical and sorted (argument order and the
    spelling of values do not matter)."""
    kept = []
    for override in map(str, overrides):
        key = override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        if is_identity_key(key):
            kept.append(_canonical(override))
    return sorted(kept)


def trial_key(overrides: Iterable[str]) -> str:
    """A readable, filesystem-safe and stable key for a set of overrides.

    The readable part is shortened and sanitised (so a hostile value cannot walk out of
    the output directory); the hash of the exact overrides keeps keys unique.
    """
    kept = identity_overrides(overrides)
    if not kept:
        return "default"
    joined = ",".join(kept)
    digest = hashlib.sha256(joined.encode()).hexdigest()[:8]
    parts = []
    for override in kept:
        key, _, value = override.partition("=")
        parts.append(f"{key.split('.')[-1].lstrip('+~')}-{value}")
    slug = _UNSAFE.sub("_", "__".join(parts)).strip("._-")
    slug = slug[:_SLUG_MAX].rstrip("._-") or "trial"
    return f"{slug}__{digest}"


_fsync_each = True


@contextlib.contextmanager
def one_sync() -> Iterator[None]:
    """Write many files, then make them durable with one ``sync`` instead of an fsync each
    (preparing a 10,000-trial sweep writes 30,000 files; each fsync costs a disk flush,
    and far more on a shared filesystem). Files are still replaced atomically."""
    global _fsync_each
    previous, _fsync_each = _fsync_each, False
    try:
        yield
    finally:
        _fsync_each = previous
        os.sync()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see the old or the new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; keep what the user's umask says
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if _fsync_each:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json_text(data))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def stuck_attempts(history: list[dict[str, Any]]) -> int:
    """How many of the latest attempts ended preempted at the same step as the one before
    them (the first attempt counts as stuck when it saved no step at all): what every
    backend that restarts preempted trials (Slurm's requeue, a Kubernetes Job's new pod)
    bounds with ``cluster.max_requeues_without_progress``."""
    steps = [entry.get("step") for entry in history if entry.get("state") == "preempted"]
    if not steps:
        return 0
    count, last = 1, steps[-1]
    for step in reversed(steps[:-1]):
        if step != last:
            break
        count += 1
    return count - 1 if last else count


class RunDir:
    """Paths and bookkeeping inside one trial's run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    provenance = property(lambda self: self.root / "provenance.json")
    status_file = property(lambda self: self.root / "status.json")
    lock_file = property(lambda self: self.root / ".train.lock")
    result_file = property(lambda self: self.root / "result.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    last_ckpt = property(lambda self: self.root / "checkpoints" / "last.ckpt")
    ranks = property(lambda self: self.root / "ranks")

    def status(self) -> dict[str, Any]:
        if not self.status_file.exists():
            return {"state": None, "attempt": 0, "history": []}
        return read_json(self.status_file)

    @property
    def state(self) -> str | None:
        return self.status()["state"]

    @contextlib.contextmanager
    def _status_lock(self) -> Iterator[None]:
        """Serialise read-modify-write of status.json between processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".status.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def created_status(self) -> dict[str, Any]:
        """status.json of a trial just prepared (what ``transition("created")`` writes)."""
        entry = {"state": "created", "time": time.time(), "host": socket.gethostname()}
        return {"state": "created", "attempt": 0, "history": [entry]}

    def transition(self, state: str, **details: Any) -> dict[str, Any]:
        """Record a state change; `attempt` counts how often the trial was started."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; expected one of {STATES}")
        with self._status_lock():
            status = self.status()
            if state == "running":
                status["attempt"] = status.get("attempt", 0) + 1
            entry = {"state": state, "time": time.time(), "host": socket.gethostname()}
            entry.update({k: v for k, v in details.items() if v is not None})
            status["state"] = state
            status["history"].append(entry)
            write_json(self.status_file, status)
        return status

    def claim(self) -> TrainingClaim:
        """Become the one process that trains this trial, or say who already does."""
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_file, "a+")  # noqa: SIM115 (held until release or exit)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            from trainyard.errors import TrialBusy

            raise TrialBusy(
                f"{self.root} is being trained right now by {holder}",
                fix="wait for it to finish (trainyard status shows it), or stop that run",
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        return TrainingClaim(f)

    def claimed_here(self) -> bool | None:
        """Whether a process on this machine holds the claim (the flock of :meth:`claim`),
        read from /proc/locks without taking it (taking it, even for a moment, could turn
        away a trainer starting right then); None where that cannot be told."""
        try:
            inode = self.lock_file.stat().st_ino
            table = Path("/proc/locks").read_text()
        except OSError:
            return None
        for line in table.splitlines():
            fields = line.split()
            if "FLOCK" not in fields:
                continue
            # "FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> ..."; the device numbers
            # are left out: on overlay filesystems they differ from what stat() says
            where = fields[fields.index("FLOCK") + 4 :][:1]
            if where and where[0].rsplit(":", 1)[-1] == str(inode):
                return True
        return False

    def clear_rank_errors(self) -> None:
        """Error files belong to one attempt: a new attempt starts without them."""
        for stale in self.ranks.glob("rank*.error.json"):
            stale.unlink(missing_ok=True)

    def write_rank_info(self, rank: int, **info: Any) -> None:
        """Merge ``info`` into this rank's own file (each rank writes only its own)."""
        path = self.ranks / f"rank{rank}.json"
        merged = read_json(path) if path.exists() else {}
        merged.update(info, pid=os.getpid(), host=socket.gethostname(), time=time.time())
        write_json(path, merged)


class TrainingClaim:
    """An exclusive flock on ``.train.lock``; the kernel drops it if the process dies."""

    def __init__(self, handle):
        self._handle = handle

    def release(self) -> None:
        if not self._handle.closed:
            self._handle.close()
