"""Scale of the Kubernetes dry run: sweeps of 100, 1,000 and 10,000 trials composed, checked
and rendered into manifests (ConfigMap, Service, Job per trial) validated strictly against
the Kubernetes 1.30 schemas, as ``trainyard submit --dry-run cluster=k8s`` does, with the
time of each phase and the cost per trial at each size (how it grows).

Goal (issue: Kubernetes backend): 100 trials under 5 s, 10,000 under 60 s, on 2 cores.
No cluster is needed: the dry run renders without credentials.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time

from _common import report

SIZES = (100, 1_000, 10_000)


def dry_run(trials: int) -> dict[str, float]:
    """The seconds of each phase of a dry run of ``trials`` seeds, and the total."""
    from trainyard import submit

    timings: dict[str, float] = {}
    overrides = ["cluster=k8s", "cluster.image=registry.example/trainyard:bench",
                 f"seed=range(0,{trials})"]  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        os.environ["TRAINYARD_ROOT"] = root
        os.environ["KUBECONFIG"] = os.path.join(root, "none")  # render only, ask nobody
        start = time.perf_counter()
        planned = submit.plan(overrides)
        timings["compose"] = time.perf_counter() - start
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            submit.submit_planned(planned, dry_run=True, build=False, timings=timings)
        timings["total"] = time.perf_counter() - start
        documents = out.getvalue().count("\n---\n") + 1
    assert documents == 3 * trials, documents
    return timings


def main() -> int:
    rows = []
    earlier = ("compose", "freeze and check", "ask the cluster", "write run directories")
    for trials in SIZES:
        t = dry_run(trials)
        goal = {100: "< 5 s", 10_000: "< 60 s"}.get(trials, "")
        printing = t["total"] - sum(t[k] for k in earlier)
        rows += [
            (f"{trials} trials: compose (s)", t["compose"], ""),
            (f"{trials} trials: freeze and check (s)", t["freeze and check"], ""),
            (f"{trials} trials: render + validate (s)", t["ask the cluster"], ""),
            (f"{trials} trials: skip completed trials (s)", t["write run directories"], ""),
            (f"{trials} trials: print the manifests (s)", printing, ""),
            (f"{trials} trials: total (s)", t["total"], goal),
            (f"{trials} trials: per trial (ms)", 1000 * t["total"] / trials, ""),
        ]
    report("trainyard submit --dry-run cluster=k8s (manifests validated for 1.30)", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
