"""What ``trainyard cancel`` remembers: a scheduler may keep no trace of an array task that
was cancelled while still pending (Slurm folds pending tasks into one accounting row), and
the status of that trial must still say cancelled, not unknown."""

import argparse
import json

from trainyard import backends, cli


class _Forgetful:
    """A scheduler that has already forgotten every task, and records what it cancels."""

    def __init__(self):
        self.cancelled = []

    def status(self, job_id):
        return {}

    def cancel(self, job_id):
        self.cancelled.append(job_id)


def _sweep(tmp_path):
    trials = [tmp_path / "sweep" / name for name in ("a", "b")]
    for trial in trials:
        trial.mkdir(parents=True)
        (trial / "status.json").write_text(json.dumps({"state": "created", "history": []}))
    record = {"backend": "slurm", "job_id": "41", "trials": [str(t) for t in trials],
              "log_dir": str(tmp_path / "sweep"), "time": 0}  # fmt: skip
    (tmp_path / "sweep" / "submission.json").write_text(json.dumps([record]))
    return trials


def test_a_cancelled_task_the_scheduler_forgot_shows_as_cancelled(tmp_path, monkeypatch, capsys):
    scheduler = _Forgetful()
    monkeypatch.setattr(backends, "get", lambda name: scheduler)
    first, second = _sweep(tmp_path)
    assert cli._scheduler_states(tmp_path)[str(second)] == "UNKNOWN"

    assert cli.cmd_cancel(argparse.Namespace(path=str(second))) == 0
    assert scheduler.cancelled == ["41_1"] and "41_1" in capsys.readouterr().out

    states = cli._scheduler_states(tmp_path)
    assert states[str(second)] == "CANCELLED" and states[str(first)] == "UNKNOWN"
    [row] = [cli._row(second, states)]
    assert row["state"] == "cancelled"
    record = json.loads((tmp_path / "sweep" / "submission.json").read_text())[0]
    assert record["cancelled"] == ["41_1"] and record["trials"] == [str(first), str(second)]
