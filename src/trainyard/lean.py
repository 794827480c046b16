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

5. ``trainer.training`` and friends compare Lightning's trainer-state enums 13-16 times a
   step through an ``__eq__`` that lower-cases both sides: an identity check first.

Trims 3 to 5 copy or lean on Lightning internals, so they are applied only on the Lightning
version they were checked against (``VERIFIED_LIGHTNING``); on any other, Lightning runs as
shipped (slower per step, never differently) until each is re-verified.

The task itself (trainyard.tasks.Classifier) removes the rest of what it can: a fast path
for the ``_current_fx_name`` attribute Lightning sets 44 times a step, manual optimization
instead of the closure machinery, and loss logging that bypasses the per-step result
collection.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os

from pytorch_lightning.profilers import PassThroughProfiler

VERIFIED_LIGHTNING = "2.6.6"  # the Lightning whose internals the trims below were checked on

log = logging.getLogger("trainyard")
_notice_given = False  # the unverified-version notice, once per process


class FastPassThroughProfiler(PassThroughProfiler):
    """The pass-through profiler without a generator per profiled call."""

    _NULL = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._NULL


def verified() -> bool:
    """Whether the installed Lightning is the one the internals-copying trims were checked on.

    Other modules with version-specific patches of their own ask this too."""
    import pytorch_lightning

    return pytorch_lightning.__version__ == VERIFIED_LIGHTNING


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
    cached.__wrapped__ = original
    loop.is_param_in_hook_signature = cached


def _overrides(callback, hook_name: str) -> bool:
    from pytorch_lightning.callbacks import Callback

    base = getattr(Callback, hook_name, None)
    return getattr(type(callback), hook_name, None) is not base or hook_name in vars(callback)


_DISPATCH = "_trainyard_dispatch"  # on the trainer: {hook: (its callbacks, implementers)}


def _implementing(trainer, hook_name: str) -> tuple:
    """The trainer's callbacks that implement ``hook_name``, worked out once per callback list.

    Kept on the trainer, not in a global keyed on ``id()``: a callback allocated at a freed
    one's address must not inherit its entry, and a process running many fits (a Ray actor)
    must keep nothing once a trainer is gone. Checked object by object (``is``) against the
    trainer's current callbacks, so one appended, removed or replaced between hooks is seen.
    """
    callbacks = trainer.callbacks
    cache = vars(trainer).get(_DISPATCH)
    if cache is None:
        cache = vars(trainer)[_DISPATCH] = {}
    entry = cache.get(hook_name)
    if entry is None or not _same(entry[0], callbacks):
        active = tuple(cb for cb in callbacks if _overrides(cb, hook_name))
        entry = cache[hook_name] = (tuple(callbacks), active)
    return entry[1]


def _same(snapshot: tuple, callbacks: list) -> bool:
    return len(snapshot) == len(callbacks) and all(map(operator.is_, snapshot, callbacks))


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

    def dispatch(trainer, hook_name: str, *args, monitoring_callbacks=None, **kwargs) -> None:
        if monitoring_callbacks is not None:  # rare, and filtered by type: leave it alone
            return original(
                trainer, hook_name, *args, monitoring_callbacks=monitoring_callbacks, **kwargs
            )
        active = _implementing(trainer, hook_name)
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
    dispatch.__wrapped__ = original
    call._call_callback_hooks = dispatch


def _trainer_enums() -> tuple:
    from pytorch_lightning.trainer.states import RunningStage, TrainerFn, TrainerStatus

    return TrainerFn, RunningStage, TrainerStatus


def fast_enum_identity() -> None:
    """``trainer.training`` and friends compare ``RunningStage`` members 13-16 times a step
    (``TrainerFn`` and ``TrainerStatus`` around loops) through an ``__eq__`` that lower-cases
    both sides; a member is equal to itself without that.

    Only these enums of Lightning's trainer get the shortcut: ``StrEnum`` itself and every
    other subclass, anyone's, keep their own ``__eq__``."""
    for enum in _trainer_enums():
        original = enum.__eq__
        if getattr(original, "trainyard_fast", False):
            continue
        enum.__eq__ = _identity_first(original)
        # set after the class exists, so Python leaves __hash__ (StrEnum's) as it was


def _identity_first(original):
    def __eq__(self, other) -> bool:
        return self is other or original(self, other)

    __eq__.trainyard_fast = True
    __eq__.__wrapped__ = original
    return __eq__


def _notice_unverified() -> None:
    global _notice_given
    if _notice_given:
        return
    _notice_given = True
    import pytorch_lightning

    log.warning(
        "trainyard.lean: per-step trims verified on pytorch-lightning %s only, found %s; "
        "using stock Lightning behaviour (correct, slower per step)",
        VERIFIED_LIGHTNING,
        pytorch_lightning.__version__,
    )


def apply() -> None:
    """Idempotent; call once per process before building the Trainer.

    The NVML setting is torch's and holds for any Lightning; the trims that copy Lightning
    internals are applied only to the version they were checked on (``verified()``).
    """
    restore_cuda_probe_without_gpus()
    if not verified():
        _notice_unverified()
        return
    cache_hook_signature()
    skip_inherited_callback_hooks()
    fast_enum_identity()
