"""Per-step overhead that trainyard removes from Lightning, from our side.

Lightning's per-step cost is spread over many small things (measured with cProfile against
a hand-written loop; see benchmarks/step_overhead.py). The ones we can remove without
forking Lightning, each measured on the MLP 784-128-64-10 at batch 64 (about 730 µs a step):

1. ``import lightning_fabric`` sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1``. On a CUDA build
   without a GPU, every ``torch.cuda.is_available()`` then dlopens NVML through ctypes and
   never caches the answer, and Adam/AdamW ask once per step (``Optimizer.step`` ->
   ``_accelerator_graph_capture_health_check``): about 175 µs a step. The variable exists
   to keep CUDA uninitialised before a fork; with no GPU there is nothing to protect, so we
   restore torch's default there.
2. The profiler wraps ~35 hook calls a step in a ``@contextmanager`` generator even when it
   is the pass-through one: a shared ``nullcontext`` instead (about 26 µs).
3. ``TrainingEpochLoop`` inspects ``training_step``'s signature on every step: cached
   (about 35 µs; the answer cannot change during a fit).

4. Every per-step hook is dispatched to every callback, even those that only inherit the
   empty ``Callback`` method: dispatched to the callbacks that implement it (about 60 µs
   with the default callbacks).

The task itself (trainyard.tasks.Classifier) removes the rest of what it can: a fast path
for the ``_current_fx_name`` attribute Lightning sets 44 times a step, manual optimization
instead of the closure machinery, and loss logging that bypasses the per-step result
collection.
"""

from __future__ import annotations

import contextlib
import os

from pytorch_lightning.profilers import PassThroughProfiler


class FastPassThroughProfiler(PassThroughProfiler):
    """The pass-through profiler without a generator per profiled call."""

    _NULL = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._NULL


def restore_cuda_probe_without_gpus() -> None:
    import torch

    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and torch.cuda.device_count() == 0:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


def cache_hook_signature() -> None:
    import pytorch_lightning.loops.training_epoch_loop as loop

    original = loop.is_param_in_hook_signature
    if getattr(original, "trainyard_cached", False):
        return
    cache: dict = {}

    def cached(hook_fx, param: str, explicit: bool = False, min_args: int | None = None) -> bool:
        # keyed on the function, not the bound method, so no module is kept alive
        key = (getattr(hook_fx, "__func__", hook_fx), param, explicit, min_args)
        if key not in cache:
            cache[key] = original(hook_fx, param, explicit=explicit, min_args=min_args)
        return cache[key]

    cached.trainyard_cached = True
    loop.is_param_in_hook_signature = cached


def _overrides(callback, hook_name: str) -> bool:
    from pytorch_lightning.callbacks import Callback

    base = getattr(Callback, hook_name, None)
    return getattr(type(callback), hook_name, None) is not base or hook_name in vars(callback)


def skip_inherited_callback_hooks() -> None:
    """Dispatch a hook only to callbacks that implement it.

    Lightning calls each of ~6 per-step hooks on every callback, entering the profiler and
    building a profiler label (for EarlyStopping a repr of its settings) each time, although
    the inherited ``Callback`` methods are empty. Same calls, same order, same
    ``_current_fx_name`` handling as ``pytorch_lightning.trainer.call._call_callback_hooks``.
    """
    import pytorch_lightning.trainer.call as call

    original = call._call_callback_hooks
    if getattr(original, "trainyard_filtered", False):
        return
    active_by_key: dict[tuple, list] = {}

    def dispatch(trainer, hook_name: str, *args, monitoring_callbacks=None, **kwargs) -> None:
        if monitoring_callbacks is not None:  # rare, and filtered by type: leave it alone
            return original(
                trainer, hook_name, *args, monitoring_callbacks=monitoring_callbacks, **kwargs
            )
        callbacks = trainer.callbacks
        key = (hook_name, *map(id, callbacks))
        active = active_by_key.get(key)
        if active is None:
            if len(active_by_key) > 256:  # many fits in one process (tests): stay small
                active_by_key.clear()
            active = active_by_key[key] = [cb for cb in callbacks if _overrides(cb, hook_name)]
        if not active:
            return None
        pl_module = trainer.lightning_module
        if pl_module:
            previous = pl_module._current_fx_name
            pl_module._current_fx_name = hook_name
        for callback in active:
            with trainer.profiler.profile(f"[Callback]{callback.state_key}.{hook_name}"):
                getattr(callback, hook_name)(trainer, trainer.lightning_module, *args, **kwargs)
        if pl_module:
            pl_module._current_fx_name = previous
        return None

    dispatch.trainyard_filtered = True
    call._call_callback_hooks = dispatch


def fast_enum_identity() -> None:
    """``trainer.training`` and friends compare ``StrEnum`` members ~15 times a step through
    an ``__eq__`` that lower-cases both sides; a member is equal to itself without that."""
    from lightning_utilities.core.enums import StrEnum

    original = StrEnum.__eq__
    if getattr(original, "trainyard_fast", False):
        return

    def __eq__(self, other) -> bool:
        return self is other or original(self, other)

    __eq__.trainyard_fast = True
    StrEnum.__eq__ = __eq__  # __hash__ is StrEnum's own and stays


def apply() -> None:
    """Idempotent; call once per process before building the Trainer."""
    restore_cuda_probe_without_gpus()
    cache_hook_signature()
    skip_inherited_callback_hooks()
    fast_enum_identity()
