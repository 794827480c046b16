"""``trainyard report`` over a sweep of 10,000 trial directories (status.json, result.json
and provenance.json each, as trials leave them), made up here: the time to collect them,
and to write the whole report (table, CSV, Markdown, best experiment, plots).

Goal (issue: Ray backend and sweeps): under 5 s for 10,000 trials on 2 cores.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, report


def make(sweep: Path, trials: int) -> None:
    rng = random.Random(0)
    config = (REPO / "conf" / "train.yaml").read_text()  # any config.yaml: only the best's is read
    for i in range(trials):
        lr, hidden = 10 ** rng.uniform(-5, -1), rng.choice([64, 128, 256])
        run = sweep / f"lr-{lr:.6g}__hidden-{hidden}__{i:08x}"
        run.mkdir(parents=True)
        state = rng.choice(["completed"] * 8 + ["failed", "running"])
        history = [{"state": "created", "time": 0.0}, {"state": state, "time": 1.0}]
        (run / "status.json").write_text(json.dumps({"state": state, "history": history}))
        overrides = [f"optimizer.lr={lr!r}", f"model.hidden={hidden}"]
        (run / "provenance.json").write_text(json.dumps({"overrides": overrides}))
        (run / "config.yaml").write_text(config)
        if state == "completed":
            result = {"monitor": "val/acc", "value": rng.random(), "epochs": 10,
                      "duration_s": rng.uniform(10, 100)}  # fmt: skip
            (run / "result.json").write_text(json.dumps(result))


def main() -> None:
    sys.path.insert(0, str(REPO / "src"))
    from trainyard import report as trainyard_report

    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory(prefix="bench-report-") as root:
        sweep = Path(root) / "sweep"
        started = time.perf_counter()
        make(sweep, trials)
        print(f"made {trials} trial directories in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        found = trainyard_report.collect(sweep)
        collected = time.perf_counter() - started
        assert len(found) == trials
        started = time.perf_counter()
        trainyard_report.write(sweep)
        whole = time.perf_counter() - started
    report(f"trainyard report over {trials} trials", [
        ("collect the trials (status, result, provenance)", collected, "s"),
        ("the whole report (collect, table, CSV, Markdown, experiment, plots)", whole,
         "s (goal < 5)"),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
