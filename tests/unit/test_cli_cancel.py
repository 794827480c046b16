"""What ``trainyard cancel`` remembers: a scheduler may keep no trace of an array task that
was cancelled while still pending (Slurm folds pending tasks into one accounting row, and
the controller forgets them), and the status of that trial must still say cancelled, not
unknown. Here the scheduler's answer is the one it gives then: nothing for the job (the
cancel itself runs against the loopback cluster in tests/integration/test_slurm.py)."""

import json

from trainyard import cli
from trainyard.backends.base import trial_states


def _sweep(tmp_path):
    trials = [tmp_path / "sweep" / name for name in ("a", "b")]
    for trial in trials:
        trial.mkdir(parents=True)
        (trial / "status.json").write_text(json.dumps({"state": "created", "history": []}))
    record = {"backend": "slurm", "job_id": "41", "trials": [str(t) for t in trials],
              "log_dir": str(tmp_path / "sweep"), "time": 0}  # fmt: skip
    file = tmp_path / "sweep" / "submission.json"
    file.write_text(json.dumps([record]))
    return file, trials


def test_a_cancelled_task_the_scheduler_forgot_shows_as_cancelled(tmp_path):
    file, (first, second) = _sweep(tmp_path)
    forgotten: dict[str, str] = {}  # sacct, squeue and scontrol know nothing of job 41
    [record] = json.loads(file.read_text())
    assert trial_states(record, forgotten)[str(second)] == "UNKNOWN"

    cli._note_cancelled(file, "41", "41_1")  # what cmd_cancel records after scancel 41_1
    [record] = json.loads(file.read_text())
    assert record["cancelled"] == ["41_1"] and record["trials"] == [str(first), str(second)]
    states = trial_states(record, forgotten)
    assert states[str(second)] == "CANCELLED" and states[str(first)] == "UNKNOWN"
    assert cli._row(second, states)["state"] == "cancelled"
    # what the scheduler does know wins over the note
    assert trial_states(record, {"41_1": "COMPLETED"})[str(second)] == "COMPLETED"
