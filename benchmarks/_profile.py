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
    kernels: float = 0.0  # GPU kernels, copies and memsets run
    waits: float = 0.0  # host calls that block on the GPU
    gpu_ms: float = 0.0  # time the GPU was running any of them (overlaps counted once)

    def rows(self, name: str, step_ms: float, gpu: bool) -> list[tuple[str, float, str]]:
        rows = [(f"{name}: aten ops / step", sum(self.ops.values()) / self.steps, "")]
        if not gpu:
            return rows
        rows += [
            (f"{name}: GPU kernels, copies, memsets / step", self.kernels, ""),
            (f"{name}: waits on the GPU / step", self.waits, ""),
            (f"{name}: GPU busy [ms/step]", self.gpu_ms, ""),
        ]
        if step_ms > 0 and self.kernels:
            rows.append((f"{name}: GPU busy / step time", self.gpu_ms / step_ms, ""))
        return rows


class ProfiledTimer(Timer):
    """Ticks like :class:`Timer`; profiles the ``steps`` steps after warm-up (with the
    GPU's activity when ``cuda``)."""

    def __init__(self, steps: int, cuda: bool, warmup: int = WARMUP):
        super().__init__(warmup)
        self.steps, self.cuda = steps, cuda
        self.result: StepProfile | None = None
        self._profiler: torch.profiler.profile | None = None

    def tick(self) -> None:
        super().tick()
        ticks = len(self.stamps)
        if ticks == self.warmup + 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
        elif ticks == self.warmup + 1 + self.steps and self._profiler is not None:
            if self.cuda:
                # the last step's kernels, into the trace; this wait is the profile's own
                torch.cuda.synchronize()
            self._profiler.stop()
            self.result = summarize(self._profiler.events(), self.steps, own_waits=int(self.cuda))
            self._profiler = None


def summarize(events, steps: int, own_waits: int = 0) -> StepProfile:
    """``own_waits``: synchronisations the profiling itself made, left out."""
    profile = StepProfile(steps)
    busy: list[tuple[float, float]] = []
    waits = 0
    for event in events:
        if event.device_type == DeviceType.CUDA:
            # a record_function range (an optimizer's step) mirrored on the GPU's timeline
            # spans kernels and the gaps between them: not work of its own
            if getattr(event, "is_user_annotation", False):
                continue
            profile.kernels += 1
            busy.append((event.time_range.start, event.time_range.end))
        elif event.name.startswith("aten::"):
            profile.ops[event.name] += 1
        elif event.name in _WAITS:
            waits += 1
    profile.kernels /= steps
    profile.waits = max(0, waits - own_waits) / steps
    profile.gpu_ms = _union_us(busy) / 1e3 / steps
    return profile


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """The time covered by ``intervals`` (kernels on several streams overlap)."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def op_difference(ours: StepProfile, theirs: StepProfile) -> dict[str, float]:
    """Operations per step that ``ours`` runs more (positive) or fewer than ``theirs``."""
    names = set(ours.ops) | set(theirs.ops)
    diff = {n: ours.ops[n] / ours.steps - theirs.ops[n] / theirs.steps for n in names}
    return {n: round(d, 2) for n, d in sorted(diff.items()) if abs(d) >= 0.5}
