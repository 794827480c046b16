"""The Slurm backend against the real loopback cluster (cluster/slurm/cluster.sh): sweeps as
arrays, multi-node DDP, requeues that resume exactly, hostile override values, and the
rendered script pinned by a golden file."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainyard.backends import Job, Resources
from trainyard.backends.slurm import SlurmBackend, split

GOLDEN = Path(__file__).parents[1] / "golden"


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


needs_cluster = pytest.mark.skipif(
    not _cluster_up(),
    reason="needs the loopback Slurm cluster (bash cluster/slurm/cluster.sh start)",
)


def _job(trials, **cluster) -> Job:
    settings = {
        "backend": "slurm", "partition": "debug", "account": "trainyard", "time_min": 10,
        "signal_delay_s": 90, "setup": ["export OMP_NUM_THREADS=1"], "python": "python3",
        "array_parallelism": 4, **cluster,
    }  # fmt: skip
    return Job("sweep", trials, Resources(nodes=2, tasks_per_node=2), settings, Path("/o"))


@pytest.mark.parametrize(
    ("name", "cluster"),
    [
        ("slurm_array.sbatch", {}),
        ("slurm_pyxis.sbatch", {"container": {"engine": "pyxis", "image": "trainyard:cuda",
                                              "mounts": ["/scratch:/scratch"]}}),
        ("slurm_apptainer.sbatch", {"container": {"engine": "apptainer",
                                                  "image": "/images/trainyard.sif"}}),
    ],
)  # fmt: skip
def test_rendered_script_matches_the_golden_file(name, cluster):
    # paths with spaces and both kinds of quotes, as on real shared filesystems
    trials = [Path("/scratch/o'brien/run 1"), Path('/scratch/say "hi"/$(run) 2')]
    job = _job(trials, **cluster)
    job.log_dir = Path("/scratch/o'brien/sweep $(x)")
    [request] = SlurmBackend().render(job)
    golden = GOLDEN / name
    if os.environ.get("TRAINYARD_REGENERATE_GOLDEN"):  # deliberately; review the diff
        golden.write_text(str(request))
    assert str(request) == golden.read_text()
    # trials travel in submitit's pickles, never in the script; paths in it are quoted
    assert not any(str(t) in request.script for t in trials)
    assert subprocess.run(["bash", "-n"], input=request.script, text=True).returncode == 0
    command = request.script.split("\n# command\n")[1]
    assert "'/scratch/o'\"'\"'brien/sweep $(x)/.submitit/%j'" in command


def test_only_jobs_that_asked_for_gpus_may_see_them():
    def render(gpus_per_node=0, **cluster):
        job = _job([Path("/o/t")], **cluster)
        job.resources = Resources(nodes=2, tasks_per_node=2, gpus_per_node=gpus_per_node)
        setup, command = SlurmBackend().render(job)[0].script.split("\n# command\n")
        return setup, command

    # slurmstepd unsets CUDA_VISIBLE_DEVICES in GPU-less steps: the task's command sets it
    setup, command = render(additional_parameters={"gres": "nvme:1"})  # not a GPU
    assert "srun " in command and " env CUDA_VISIBLE_DEVICES= python3 -u" in command
    assert setup.index("NVIDIA_VISIBLE_DEVICES=void") < setup.index("OMP_NUM_THREADS")
    for asked in ({"gpus_per_node": 2}, {"additional_parameters": {"gres": "gpu:2"}},
                  {"additional_parameters": {"tres_per_task": "gres/gpu:1"}}):  # fmt: skip
        setup, command = render(**asked)
        assert "CUDA_VISIBLE_DEVICES" not in command and "NVIDIA_VISIBLE_DEVICES" not in setup
    sif = {"engine": "apptainer", "image": "/images/t.sif"}
    assert "apptainer exec --nv" not in render(container=sif)[1]  # no driver bound in
    assert "apptainer exec --nv" in render(gpus_per_node=1, container=sif)[1]


def test_an_option_of_value_one_keeps_its_value_and_an_empty_one_is_a_flag():
    job = _job([Path("/o/t")], additional_parameters={"gpus_per_task": 1, "exclusive": ""})
    script = SlurmBackend().render(job)[0].script
    assert "#SBATCH --gpus-per-task=1\n" in script and "#SBATCH --exclusive\n" in script


def test_a_sweep_larger_than_max_array_size_goes_out_as_several_arrays():
    trials = [Path(f"/o/t{i}") for i in range(2500)]
    chunks = split(trials, 1001)
    assert [len(c) for c in chunks] == [1001, 1001, 498]
    assert [t for c in chunks for t in c] == trials
    requests = SlurmBackend().render(_job(trials, max_array_size=1001))
    assert len(requests) == 3 and "#SBATCH --array=0-497%4" in requests[2].script


# -- on the real loopback cluster --------------------------------------------------------


def _submit(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainyard.cli", "submit", "cluster=slurm_loopback", *overrides],
        cwd=root, env=_env(root), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _env(root: Path) -> dict:
    import os

    return {**os.environ, "TRAINYARD_ROOT": str(root), "PYTHONPATH": str(Path.cwd())}


def _statuses(root: Path) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "trainyard.cli", "status", str(root / "outputs"), "--json"],
        capture_output=True, text=True, env=_env(root),
    )  # fmt: skip
    return json.loads(out.stdout) if out.returncode == 0 else []


def _wait(root: Path, done, timeout: float = 240) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _statuses(root)
        if rows and done(rows):
            return rows
        assert time.monotonic() < deadline, f"timed out; last status: {rows}"
        time.sleep(1)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _ranks(run: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(run).glob("ranks/rank?.json"))]


def _running_with_checkpoint(rows) -> bool:
    return (
        rows[0]["state"].startswith("running")
        and (Path(rows[0]["run"]) / "checkpoints/last.ckpt").exists()
    )


LONG = ["trainer.max_epochs=150", "callbacks.early_stopping=null"]  # still training when stopped


def _submit_long(root: Path, *extra: str) -> str:
    """Submit one trial that trains long enough to be stopped; its job id."""
    out = _submit(root, *LONG, *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split()[-1]


DDP2 = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.num_nodes=2", "trainer.devices=1"]


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_a_sweep_of_two_node_ddp_jobs_runs_as_one_array(tmp_path):
    # composed once, on this machine: a time stamp resolves once, into the frozen config
    stamp = "+stamp='${now:%H%M%S%f}'"
    out = _submit(tmp_path, *DDP2, "trainer.max_epochs=2", "optimizer.lr=0.002,0.02", stamp)
    assert out.returncode == 0, out.stderr
    assert "submitted 2 trial(s) to slurm" in out.stdout
    rows = _wait(tmp_path, lambda rows: all(r["state"] == "completed" for r in rows))
    assert len(rows) == 2
    lrs = set()
    for row in rows:
        ranks = _ranks(row["run"])
        assert {r["host"] for r in ranks} == {"n1", "n2"}  # one rank per node
        assert {r["cuda_visible_devices"] for r in ranks} == {""}  # asked for no GPU: sees none
        assert ranks[0]["weights"] == ranks[1]["weights"]
        frozen = (Path(row["run"]) / "config.yaml").read_bytes()
        assert {r["config_sha256"] for r in ranks} == {_sha(frozen)}
        assert re.search(rb"\nstamp: '?\d{12}'?\n", frozen)
        lrs.update(lr for r in ranks for lr in r["lr"])
    assert lrs == {0.002, 0.02}


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_hostile_override_values_arrive_intact_and_nothing_executes(tmp_path):
    marker = tmp_path / "pwned"
    values = {
        "a": f"$(touch {marker}a)",
        "b": f"`touch {marker}b`; touch {marker}c",
        "c": 'it\'s "quoted" = yes, with spaces',
        "d": "line1\nline2",
        "e": "héllo wörld ✓",
        "f": "x" * 3000,
    }
    quoted = [f"+notes.{k}='" + v.replace("'", "\\'") + "'" for k, v in values.items()]
    out = _submit(tmp_path, *quoted, "trainer.max_epochs=1")
    assert out.returncode == 0, out.stderr
    [row] = _wait(tmp_path, lambda rows: rows[0]["state"] in ("completed", "failed"))
    assert row["state"] == "completed", row
    from omegaconf import OmegaConf

    frozen = OmegaConf.load(Path(row["run"]) / "config.yaml")
    assert dict(frozen.notes) == values
    assert not list(tmp_path.glob("pwned*"))


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_requeued_twice_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    # long enough (~3000 steps) that each attempt is still training when it is stopped
    common = ["trainer.max_epochs=150", "callbacks.early_stopping=null", "data.augment=true"]
    assert _submit(tmp_path, *common, "name=ref").returncode == 0
    out = _submit(tmp_path, *common, "name=requeued", "+stamp='${now:%H%M%S%f}'")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split()[-1]
    frozen = next((tmp_path / "outputs" / "requeued").rglob("config.yaml")).read_bytes()

    def run_of(rows):
        return next(r for r in rows if "/requeued/" in r["run"])

    # preempted twice while it trains: by `scontrol requeue` (SIGTERM, Slurm requeues), then
    # by the time-limit warning signal (USR2 to the ranks; rank 0 requeues)
    stops = (["scontrol", "requeue", job_id], ["scancel", "--signal=USR2", job_id])
    for attempt, stop in zip((1, 2), stops, strict=True):
        _wait(tmp_path, lambda rows, a=attempt: run_of(rows)["attempt"] == a
              and run_of(rows)["state"].startswith("running")
              and (Path(run_of(rows)["run"]) / "checkpoints/last.ckpt").exists(), 180)  # fmt: skip
        time.sleep(0.5)
        subprocess.run(stop, check=True)
    rows = _wait(tmp_path, lambda rows: all(r["state"] == "completed" for r in rows), 300)
    requeued, ref = run_of(rows), next(r for r in rows if "/ref/" in r["run"])
    history = json.loads((Path(requeued["run"]) / "status.json").read_text())["history"]
    assert [h["state"] for h in history].count("preempted") == 2
    assert requeued["attempt"] == 3
    # every attempt trained from the config frozen at submission, time stamp included
    assert {h["config_sha256"] for h in history if h["state"] == "running"} == {_sha(frozen)}
    assert _ranks(requeued["run"])[0]["full_state"] == _ranks(ref["run"])[0]["full_state"]


@pytest.mark.slurm
@needs_cluster
@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("cluster.partition=nope", "invalid partition"),
        ("cluster.account=nobody", "account"),
        ("trainer.num_nodes=3", "node"),
    ],
)
def test_a_job_slurm_would_refuse_fails_before_anything_is_prepared(tmp_path, override, says):
    extra = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1"]
    out = _submit(tmp_path, *extra, override)
    assert out.returncode == 2, out.stderr
    assert "Slurm would refuse this job" in out.stderr and says in out.stderr.lower()
    assert not (tmp_path / "outputs").exists()
    dry = _submit(tmp_path, *extra, override, "--dry-run")
    assert dry.returncode == 2 and "Slurm would refuse this job" in dry.stderr
    assert "#SBATCH --nodes=" in dry.stdout  # the refused script, to read
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_hydra_multirun_goes_out_through_the_backend(tmp_path):
    """-m with cluster=slurm: trainyard's Hydra launcher sends the sweep as one array, waits,
    and hands each trial's metric back; the run directories are Hydra's sweep layout."""
    out = subprocess.run(
        [sys.executable, "-m", "trainyard.train", "-m", "cluster=slurm_loopback",
         "trainer.max_epochs=1", "optimizer.lr=0.002,0.02"],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "submitted 2 trial(s) to slurm" in out.stdout
    rows = _statuses(tmp_path)
    assert len(rows) == 2 and all(r["state"] == "completed" for r in rows)
    assert all("/sweeps/" in r["run"] for r in rows)
    assert all(h["host"] in ("n1", "n2") for r in rows for h in _ranks(r["run"]))


@pytest.mark.parametrize(
    ("cluster", "says"),
    [
        ({"qos": "normal\ntouch /tmp/pwned"}, "cluster.qos"),
        ({"partition": "debug --wrap=x"}, "cluster.partition"),
        ({"additional_parameters": {"comment": "a;b c"}}, "cluster.comment"),
        ({"additional_parameters": {"bad key": "x"}}, "not an sbatch option"),
    ],
)
def test_cluster_values_cannot_break_out_of_an_sbatch_option(cluster, says):
    from trainyard.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        SlurmBackend().render(_job([Path("/o/t")], **cluster))


def test_a_percent_in_the_output_path_is_refused_before_sbatch_expands_it():
    from trainyard.errors import ConfigError

    job = _job([Path("/o/p%x/t")])
    job.log_dir = Path("/o/p%x")
    with pytest.raises(ConfigError, match="expands %"):
        SlurmBackend().render(job)


@pytest.mark.parametrize(
    ("preempt", "time_min", "says"),
    [(["SIGTERM", "SIGUSR1"], 10, "SIGUSR2"), (["SIGUSR2"], 1, "at the start")],
)
def test_the_warning_signal_must_stop_training_in_time(preempt, time_min, says):
    from trainyard.backends.slurm import check_signal
    from trainyard.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        check_signal({"signal_delay_s": 90, "time_min": time_min}, preempt)
    check_signal({"signal_delay_s": 90, "time_min": 10}, ["SIGTERM", "SIGUSR2"])


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_a_site_profile_copied_into_a_config_directory_submits_to_slurm(tmp_path):
    site = tmp_path / "myconf" / "cluster"
    site.mkdir(parents=True)
    profile = Path(__file__).parents[2] / "cluster" / "slurm" / "profiles" / "loopback.yaml"
    shutil.copy(profile, site / "mysite.yaml")
    out = subprocess.run(
        [sys.executable, "-m", "trainyard.cli", "submit", "--dry-run",
         f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "cluster=mysite"],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --account=trainyard" in out.stdout and "submitit.core._submit" in out.stdout


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_a_trial_queued_or_running_is_not_submitted_again(tmp_path):
    args = ["trainer.max_epochs=100", "callbacks.early_stopping=null"]
    first = _submit(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    second = _submit(tmp_path, *args)
    assert second.returncode == 0, second.stderr
    assert "is already queued as job" in second.stdout and "submitted" not in second.stdout
    subprocess.run(["scancel", first.stdout.strip().split()[-1]], check=True)


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_cancelling_one_trial_of_a_sweep_leaves_the_others(tmp_path):
    out = _submit(tmp_path, "trainer.max_epochs=1", "optimizer.lr=0.002,0.02",
                  "cluster.array_parallelism=1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = _wait(tmp_path, lambda rows: len(rows) == 2)
    second = next(r["run"] for r in rows if "lr-0.02" in r["run"])
    cancel = subprocess.run(
        [sys.executable, "-m", "trainyard.cli", "cancel", second],
        capture_output=True, text=True, env=_env(tmp_path),
    )  # fmt: skip
    assert cancel.returncode == 0 and "_1" in cancel.stdout, cancel.stdout + cancel.stderr
    # accounting may trail the controller by a moment: wait for both to show
    rows = _wait(tmp_path, lambda rows: {r["state"] for r in rows} >= {"completed"}
                 and any("cancelled" in r["state"] for r in rows))  # fmt: skip
    states = {("lr-0.02" in r["run"]): r["state"] for r in rows}
    assert states[False] == "completed" and "cancelled" in states[True]


def test_array_ranges_from_sacct_are_read_task_by_task():
    from trainyard.backends.slurm import _array_tasks

    assert _array_tasks("12_[3-5,7%2]") == ["12_3", "12_4", "12_5", "12_7"]
    assert _array_tasks("12_4") == ["12_4"] and _array_tasks("12") == ["12"]


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_a_node_that_dies_mid_job_requeues_the_trial_which_resumes_on_another(tmp_path):
    job_id = _submit_long(tmp_path)
    [row] = _wait(tmp_path, _running_with_checkpoint)
    dead = _ranks(row["run"])[0]["host"]
    try:  # the node goes down: Slurm kills what ran there and requeues the job (NODE_FAIL);
        # drained first, so that it does not come straight back (ReturnToService=2)
        for state in ("drain", "down"):
            subprocess.run(["scontrol", "update", f"nodename={dead}", f"state={state}",
                            "reason=trainyard-test"], check=True)  # fmt: skip
        [row] = _wait(tmp_path, lambda rows: rows[0]["attempt"] == 2
                      and rows[0]["state"].startswith("running"), 180)  # fmt: skip
    finally:
        subprocess.run(["scontrol", "update", f"nodename={dead}", "state=resume"], check=True)
        subprocess.run(["scancel", job_id], check=True)
    history = json.loads((Path(row["run"]) / "status.json").read_text())["history"]
    resumed = [h for h in history if h["state"] == "running"][-1]
    assert resumed["host"] != dead and resumed["resumed_from"].endswith("last.ckpt")
    sacct = subprocess.run(["sacct", "-j", job_id, "-D", "-X", "-n", "-o", "State"],
                           capture_output=True, text=True).stdout  # fmt: skip
    assert "NODE_FAIL" in sacct, sacct


def _controller_pid() -> int:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    pidfile = next(line.split("=", 1)[1].strip() for line in out.splitlines()
                   if line.startswith("SlurmctldPidFile"))  # fmt: skip
    return int(Path(pidfile).read_text().split()[0])


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_with_the_controller_down_submit_fails_fast_and_status_still_answers(tmp_path):
    out = _submit(tmp_path, "trainer.max_epochs=1")
    assert out.returncode == 0, out.stderr
    _wait(tmp_path, lambda rows: rows[0]["state"] == "completed")
    script = Path(__file__).parents[2] / "cluster" / "slurm" / "cluster.sh"
    os.kill(_controller_pid(), 15)
    try:
        time.sleep(1)
        started = time.monotonic()
        out = _submit(tmp_path, "trainer.max_epochs=2")
        assert out.returncode == 2 and "controller is not answering" in out.stderr, out.stderr
        assert time.monotonic() - started < 10
        assert len(_statuses(tmp_path)) == 1  # nothing prepared for the refused trial
        started = time.monotonic()
        status = subprocess.run(
            [sys.executable, "-m", "trainyard.cli", "status", str(tmp_path / "outputs")],
            capture_output=True, text=True, env=_env(tmp_path), timeout=60,
        )  # fmt: skip
        assert status.returncode == 0 and "completed" in status.stdout
        assert "not answering" in status.stderr and time.monotonic() - started < 10
    finally:
        subprocess.run(["bash", str(script), "start"], check=True, capture_output=True)


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_cancelled_right_after_the_time_limit_warning_stays_cancelled(tmp_path):
    job_id = _submit_long(tmp_path)
    [row] = _wait(tmp_path, _running_with_checkpoint)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    cancel = subprocess.run(
        [sys.executable, "-m", "trainyard.cli", "cancel", row["run"]],
        capture_output=True, text=True, env=_env(tmp_path),
    )  # fmt: skip
    assert cancel.returncode == 0, cancel.stderr
    [row] = _wait(tmp_path, lambda rows: rows[0]["state"] == "preempted"
                  or "cancelled" in rows[0]["state"])  # fmt: skip
    time.sleep(8)  # a requeue would be queued or running again by now
    queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
    assert not queued.stdout.strip(), queued.stdout
    [row] = _statuses(tmp_path)
    assert "cancelled" in row["state"], row


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_a_warning_that_reaches_only_another_rank_still_requeues_the_trial(tmp_path):
    """Slurm signals the ranks of different nodes at slightly different moments: the rank
    that got the warning decides for all of them, rank 0 included."""
    job_id = _submit_long(tmp_path, *DDP2)
    try:
        [row] = _wait(tmp_path, _running_with_checkpoint)
        rank1 = json.loads((Path(row["run"]) / "ranks/rank1.json").read_text())
        os.kill(rank1["pid"], 12)  # SIGUSR2, to rank 1 only (both "nodes" are this machine)
        [row] = _wait(tmp_path, lambda rows: rows[0]["attempt"] == 2, 180)
        history = json.loads((Path(row["run"]) / "status.json").read_text())["history"]
        assert next(h for h in history if h["state"] == "preempted")["reason"].startswith("SIGUSR2")
    finally:
        subprocess.run(["scancel", job_id], check=True)


@pytest.mark.slurm
@needs_cluster
def test_each_array_of_a_split_sweep_records_its_own_trials(tmp_path):
    held = "+cluster.additional_parameters.hold=''"
    out = _submit(tmp_path, "cluster.max_array_size=2", "seed=1,2,3", held)
    assert out.returncode == 0, out.stderr
    [submission] = list((tmp_path / "outputs").rglob("submission.json"))
    records = json.loads(submission.read_text())
    try:
        assert [len(r["trials"]) for r in records] == [2, 1]
        assert len({t for r in records for t in r["trials"]}) == 3
    finally:
        for record in records:
            subprocess.run(["scancel", record["job_id"]], check=True)
