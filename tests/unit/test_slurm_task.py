"""When rank 0 of a Slurm job stops requeueing a trial that makes no progress."""

from trainyard.rundir import stuck_attempts


def _history(*steps):
    out = []
    for step in steps:
        out += [{"state": "running"}, {"state": "preempted", "step": step}]
    return out


def test_attempts_that_save_a_new_step_are_not_stuck():
    assert stuck_attempts([]) == 0
    assert stuck_attempts(_history(10, 20, 30)) == 0


def test_attempts_that_end_at_the_same_step_are_counted():
    assert stuck_attempts(_history(10, 20, 20, 20)) == 2  # the first 20 was progress
    assert stuck_attempts(_history(None)) == 1  # stopped before training a step
    assert stuck_attempts(_history(None, None, None)) == 3
