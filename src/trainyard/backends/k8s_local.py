"""Run rendered Kubernetes Jobs on this machine, pods as processes (``cluster.local_pods``).

No API server runs here (development machines, CI), so this plays the parts of the Job
controller and the kubelet for the manifests trainyard renders, and runs exactly what the
pod template says: the container's ``args`` and ``env``, one pod per completion index,
all at once (``parallelism``), each with the environment Kubernetes gives a pod of an
Indexed Job (``JOB_COMPLETION_INDEX``, ``HOSTNAME``), and the Job's ``podFailurePolicy``
and ``backoffLimit`` deciding what happens when a pod exits: replaced (Ignore), counted
and replaced until the limit, or the Job failed (FailJob). Deleting the Job (SIGTERM to
this runner) gives every pod SIGTERM and ``terminationGracePeriodSeconds`` to stop.

What cannot be the same on one machine, and is translated (each logged once):

- volumes: the ConfigMap's files are written to a folder and the claim is this machine's
  ``paths.root_dir`` (pods see the same paths: ``cluster.root_dir=null``); a path in the
  args or env under a mount is taken to the folder mounted there;
- the network: pods share this machine's loopback, so the Service's DNS name for pod 0
  (``<job>-0.<service>``) is 127.0.0.1 and each Job gets a free port instead of 29500;
- the image: its ``python`` and console scripts (``trainyard-pod``) are this Python;
- GPUs: as the device plugin does, each pod is given the GPUs its ``nvidia.com/gpu``
  limit asks for, its own ones of this machine's (``CUDA_VISIBLE_DEVICES``), and a pod
  that asks for none sees none (what ``NVIDIA_VISIBLE_DEVICES=void`` makes the runtime do).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from trainyard import signals
from trainyard.launch import free_port

_SCRIPTS = {"trainyard-pod": ["-m", "trainyard.backends.k8s_pod"], "python": []}
_POLL_S = 0.2


def host_gpus() -> list[str]:
    """This machine's GPUs that pods may be given: those ``CUDA_VISIBLE_DEVICES`` lists
    where it is set, else every one the driver has (torch-free: submit stays fast)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:  # as CUDA reads it: up to the first entry that names no device
        gpus = []
        for entry in (e.strip() for e in listed.split(",")):
            if not entry or entry.startswith("-") or entry == "NoDevFiles":
                break
            gpus.append(entry)
        return gpus
    driver = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(driver.iterdir())))] if driver.is_dir() else []


def pod_gpus(pod_spec: dict) -> int:
    """GPUs a pod's first container asks for: extended resources are limits, named as
    ``cluster.gpu_resource`` says (nvidia.com/gpu, amd.com/gpu, nvidia.com/mig-1g.10gb...)."""
    limits = pod_spec["containers"][0].get("resources", {}).get("limits", {})
    return sum(int(v) for k, v in limits.items() if "gpu" in k or "/mig-" in k)


class Runner:
    def __init__(self, spec_file: Path) -> None:
        self.spec = yaml.safe_load(spec_file.read_text())
        self.folder = spec_file.parent
        self.stopping = False
        self.trial = 0  # the index of the trial whose Job runs now
        self.gpus = host_gpus()
        self.pods: dict[str, subprocess.Popen] = {}
        self.state: dict[str, Any] = {
            "pid": os.getpid(),
            "trials": ["PENDING"] * len(self.spec["trials"]),
            "pods": {},
        }

    def save(self) -> None:
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.folder / "state.json")

    def stop(self, signum, frame) -> None:
        """The Job was deleted: every pod gets SIGTERM, and its grace period."""
        self.stopping = True
        for proc in self.pods.values():
            _signal(proc, signal.SIGTERM)

    def run(self) -> int:
        signals.route((signal.SIGTERM, signal.SIGINT), self.stop)
        self.save()
        for index, trial in enumerate(self.spec["trials"]):
            if self.stopping:
                self.state["trials"][index] = "CANCELLED"
                continue
            self.state["trials"][index] = "RUNNING"
            self.save()
            self.trial = index
            self.state["trials"][index] = self.run_job(trial["objects"])
            self.save()
        self.save()  # the trials a deletion left unstarted: CANCELLED, not pending
        return 0 if all(s == "COMPLETED" for s in self.state["trials"]) else 1

    # --- one Job ----------------------------------------------------------------------

    def run_job(self, objects: list[dict[str, Any]]) -> str:
        job = next(o for o in objects if o["kind"] == "Job")
        spec, name = job["spec"], job["metadata"]["name"]
        pod_spec = spec["template"]["spec"]
        mounts = self._mounts(objects, pod_spec, name)
        env = self._env(pod_spec, name)
        indexes = range(int(spec["completions"]))
        attempts = dict.fromkeys(indexes, 0)
        self.pods = {}
        for index in indexes:
            self._start(name, index, pod_spec, mounts, env, attempts)
        failures, done = 0, set()
        while len(done) < len(indexes):
            time.sleep(_POLL_S)
            for index, proc in list(self._running(name, indexes, done)):
                code = proc.poll()
                if code is None:
                    continue
                entry = self.state["pods"][f"{name}-{index}"]
                entry["exit_codes"].append(code)
                entry["message"] = (self.folder / f"{name}-{index}.termination-log").read_text()
                self.save()
                if code == 0:
                    done.add(index)
                    continue
                action = _policy(spec.get("podFailurePolicy"), code)
                if self.stopping:
                    return self._end(name, "CANCELLED", pod_spec)
                if action == "FailJob":
                    return self._end(name, "FAILED", pod_spec)
                if action != "Ignore":
                    failures += 1
                    if failures > int(spec.get("backoffLimit", 6)):
                        return self._end(name, "FAILED", pod_spec)
                self._start(name, index, pod_spec, mounts, env, attempts)
        return "COMPLETED"

    def _running(self, name: str, indexes, done: set[int]):
        for index in indexes:
            if index not in done:
                yield index, self.pods[f"{name}-{index}"]

    def _end(self, name: str, state: str, pod_spec: dict) -> str:
        """Stop the Job's other pods as the Job controller does: SIGTERM, then SIGKILL
        after the grace period."""
        grace = float(pod_spec.get("terminationGracePeriodSeconds", 30))
        for proc in self.pods.values():
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in self.pods.values()) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        for proc in self.pods.values():
            _signal(proc, signal.SIGKILL)
            proc.wait()
        return state

    def _start(self, name, index, pod_spec, mounts, env, attempts) -> None:
        container = pod_spec["containers"][0]
        args = [_translate(a, mounts) for a in container.get("args") or container["command"]]
        if args[0] in _SCRIPTS:
            args = [sys.executable, *_SCRIPTS[args[0]], *args[1:]]
        pod = f"{name}-{index}"
        # the kubelet gives each container a file for its termination message
        message = self.folder / f"{pod}.termination-log"
        message.write_text("")
        own = {k: _translate(v, {**mounts, container["terminationMessagePath"]: str(message)})
               for k, v in env.items()}  # fmt: skip
        pod_env = {**os.environ, **own, "JOB_COMPLETION_INDEX": str(index), "HOSTNAME": pod}
        gpus = pod_gpus(pod_spec)  # pod i: its own slice of the machine's GPUs, or none
        pod_env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[index * gpus : (index + 1) * gpus])
        attempts[index] += 1
        log = self.folder / f"{pod}.log"
        with open(log, "a") as out:
            out.write(f"--- pod {pod}, attempt {attempts[index]} ---\n")
            out.flush()
            proc = subprocess.Popen(
                args, env=pod_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pods[pod] = proc
        entry = self.state["pods"].setdefault(pod, {"exit_codes": [], "trial": self.trial})
        entry.update(pid=proc.pid, attempt=attempts[index])
        self.save()

    def _mounts(self, objects, pod_spec, name: str) -> dict[str, str]:
        """mountPath -> the folder here that stands for that volume."""
        config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        mounts = {}
        for mount in pod_spec["containers"][0].get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                folder = self.folder / name / mount["name"]
                folder.mkdir(parents=True, exist_ok=True)
                config_map = config_maps[volume["configMap"]["name"]]
                for key, text in (config_map.get("data") or {}).items():
                    (folder / key).write_text(text)
                for key, data in (config_map.get("binaryData") or {}).items():
                    (folder / key).write_bytes(base64.b64decode(data))
                mounts[mount["mountPath"]] = str(folder)
            elif "persistentVolumeClaim" in volume:
                mounts[mount["mountPath"]] = self._claim_root(config_maps)
            elif mount["mountPath"] != "/dev/shm":  # this machine's own /dev/shm serves
                folder = self.folder / name / mount["name"]
                folder.mkdir(parents=True, exist_ok=True)
                mounts[mount["mountPath"]] = str(folder)
        return mounts

    @staticmethod
    def _claim_root(config_maps: dict[str, dict]) -> str:
        """The claim is this machine's paths.root_dir, the one the frozen config names (a
        plain Hydra app's pods have none: the directory the runner was started in)."""
        data = next(iter(config_maps.values())).get("data") or {}
        if "config.yaml" not in data:
            return os.getcwd()
        return str(yaml.safe_load(data["config.yaml"])["paths"]["root_dir"])

    def _env(self, pod_spec: dict, name: str) -> dict[str, str]:
        env = {}
        for item in pod_spec["containers"][0].get("env", []):
            if "value" not in item:
                raise ValueError(f"{item['name']}: only literal env values run locally")
            env[item["name"]] = str(item["value"])
        # pod 0's name in the Service's DNS; here every pod shares this machine's loopback
        if env.get("MASTER_ADDR") == f"{name}-0.{pod_spec.get('subdomain')}":
            env["MASTER_ADDR"] = "127.0.0.1"
            env["MASTER_PORT"] = str(free_port())
        return env


def _policy(policy: dict | None, code: int) -> str | None:
    """The action of the first podFailurePolicy rule matching exit ``code`` (a pod's
    conditions cannot be set by a process, so only exit-code rules apply here)."""
    for rule in (policy or {}).get("rules", []):
        codes = rule.get("onExitCodes")
        if not codes:
            continue
        inside = code in codes["values"]
        if inside == (codes["operator"] == "In"):
            return rule["action"]
    return None


def _translate(value: str, mounts: dict[str, str]) -> str:
    for path, folder in mounts.items():
        if value == path or value.startswith(path.rstrip("/") + "/"):
            return folder + value[len(path.rstrip("/")) :]
    return value


def _signal(proc: subprocess.Popen, signum: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(proc.pid, signum)


if __name__ == "__main__":
    sys.exit(Runner(Path(sys.argv[1])).run())
