"""Where a step's time goes, per variant: counted with torch's profiler over a few steps.

A step timer (:class:`ProfiledTimer`) that also records ``steps`` steps after warm-up with
``torch.profiler`` and sums them up per step: tensor operations dispatched, GPU kernels and
copies run, host-device synchronisations, time the GPU was busy. Side by side they say
whether a variant's step is bound by the host (launching) or by the GPU, and whether one
variant launches more work or waits on the GPU more often than another: what a timing alone
cannot tell apart.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from _loops import WARMUP, Timer
from torch.autograd import DeviceType

# host calls that wait for the GPU to finish (a .item(), a copy to pageable memory, ...)
_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


@dataclass
class StepProfile:
    """Per-step means over the profiled steps."""

    steps: int
    ops: Counter = field(default_factory=Counter)  # aten operations by name, nested included
    kernels: float = 0.0  # GPU kernels and copies run
    waits: float = 0.0  # host calls that block on the GPU
    gpu_ms: float = 0.0  # time the GPU spent running them

    def rows(self, name: str, step_ms: float) -> list[tuple[str, float, str]]:
        rows = [
            (f"{name}: aten ops / step", sum(self.ops.values()) / self.steps, ""),
            (f"{name}: GPU kernels and copies / step", self.kernels, ""),
            (f"{name}: waits on the GPU / step", self.waits, ""),
            (f"{name}: GPU busy [ms/step]", self.gpu_ms, ""),
        ]
        if step_ms > 0 and self.kernels:
            rows.append((f"{name}: GPU busy / step time", self.gpu_ms / step_ms, ""))
        return rows


class ProfiledTimer(Timer):
    """Ticks like :class:`Timer`; profiles the ``steps`` steps after warm-up."""

    def __init__(self, steps: int, warmup: int = WARMUP):
        super().__init__(warmup)
        self.steps = steps
        self.result: StepProfile | None = None
        self._profiler: torch.profiler.profile | None = None

    def tick(self) -> None:
        super().tick()
        ticks = len(self.stamps)
        if ticks == self.warmup + 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
        elif ticks == self.warmup + 1 + self.steps and self._profiler is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the last step's kernels, into the trace
            self._profiler.stop()
            self.result = summarize(self._profiler.events(), self.steps)
            self._profiler = None


def summarize(events, steps: int) -> StepProfile:
    profile = StepProfile(steps)
    for event in events:
        if event.device_type == DeviceType.CUDA:
            profile.kernels += 1
            profile.gpu_ms += event.time_range.elapsed_us() / 1e3
        elif event.name.startswith("aten::"):
            profile.ops[event.name] += 1
        elif event.name in _WAITS:
            profile.waits += 1
    profile.kernels /= steps
    profile.waits /= steps
    profile.gpu_ms /= steps
    return profile


def op_difference(ours: StepProfile, theirs: StepProfile) -> dict[str, float]:
    """Operations per step that ``ours`` runs more (positive) or fewer than ``theirs``."""
    names = set(ours.ops) | set(theirs.ops)
    diff = {n: ours.ops[n] / ours.steps - theirs.ops[n] / theirs.steps for n in names}
    return {n: round(d, 2) for n, d in sorted(diff.items()) if abs(d) >= 0.5}
