"""Per-step time on one GPU, side by side in one run, as ratios to a hand-written loop.

The cases and columns of issue 10 (bf16-mixed, synthetic data):

- plain:             a hand-written loop as a user writes it: a standard DataLoader over a
                     TensorDataset, pinned, copied with ``non_blocking=True``. The reference.
- plain-on-gpu:      the same loop with the data held on the GPU, batches taken by index
- plain-on-gpu-fused: that loop with the optimizer's fused kernel (``fused=True``, which
                     trainyard chooses): trainyard against it is trainyard's own overhead
- lightning-bare:    a bare Lightning Trainer with the standard DataLoader (as shipped)
- trainyard:         trainyard-train trainer=gpu's Trainer, task and data path (callbacks,
                     logger and run directory as users run it)
- trainyard-compile: the same with trainer.compile=true

for ResNet-18 at batch 256 and the default CNN at batch 128 on 3x32x32 images, and the
MLP 784-128-64-10 at batch 64. Every variant runs with TF32 float32 matmuls and cuDNN
autotuning (what trainer=gpu sets); the hand-written loops and the bare Trainer use torch's
default optimizer kernel (for-each on CUDA) unless their name says fused. A step is
the interval between consecutive batch starts after warm-up (compilation included in the
warm-up); variants are interleaved, and each ratio is given for the median and the best
run. Goals (issue 10): trainyard <= 1.00x plain in every case, and <= 1.10x plain-on-gpu.

Exits 0 with a message where no GPU is visible. ``--device cpu`` runs the same code on the
CPU, to check the script itself on a machine without a GPU (its timings say nothing).

``--profile N`` then runs each variant once more under torch's profiler for N steps and
prints, per step, the tensor operations dispatched, the GPU kernels and copies, the host's
waits on the GPU and the GPU's busy time (busy / step time near 1: the GPU sets the pace;
far below: the host does), and the operations trainyard runs beyond the loop it is closest
to (benchmarks/_profile.py).

Usage: python benchmarks/gpu_step.py [--repeats 2] [--steps 200] [--cases resnet256,...]
                                    [--variants plain,trainyard,...] [--profile 20]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import step_overhead as cpu_bench
import torch
from _common import RATIOS, goal, pickers, report
from _loops import dataloader_loop, indexed_loop
from _profile import ProfiledTimer, op_difference

IMAGES = ["data.shape=[3,32,32]"]
CASES = {
    "resnet256": [*IMAGES, "model=resnet18", "data.batch_size=256"],
    "cnn128": [*IMAGES, "model=cnn", "data.batch_size=128"],
    "mlp64": [*cpu_bench.MLP, "data.batch_size=64"],
}
VARIANTS = (
    "plain", "plain-on-gpu", "plain-on-gpu-fused", "lightning-bare",
    "trainyard", "trainyard-compile",
)  # fmt: skip


def run_variant(name: str, cfg, root: Path, timer=None) -> float:
    if name == "plain":
        return cpu_bench.run_plain(cfg, dataloader_loop, timer=timer)
    if name == "plain-on-gpu":
        return cpu_bench.run_plain(cfg, indexed_loop, timer=timer)
    if name == "plain-on-gpu-fused":
        return cpu_bench.run_plain(cfg, indexed_loop, fused=True, timer=timer)
    if name == "lightning-bare":
        with cpu_bench.stock_lightning():
            return cpu_bench.run_lightning_bare(cfg, timer=timer)
    if name == "trainyard-compile":
        from omegaconf import OmegaConf

        cfg = OmegaConf.merge(cfg, {"trainer": {"compile": True}})
    return cpu_bench.run_trainyard(cfg, extras=True, root=root, timer=timer)


def _compose(case: str, device: str, steps: int, root: Path):
    on_cpu = ["trainer.accelerator=cpu"] if device == "cpu" else []
    return cpu_bench.compose([*CASES[case], "trainer=gpu", *on_cpu], root, steps)


def measure(
    case: str, repeats: int, steps: int, device: str, variants: tuple[str, ...]
) -> dict[str, float]:
    """Report the per-step times; returns each variant's median."""
    if not repeats:
        return {}
    results: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = _compose(case, device, steps, Path(tmp))
            shift = rep % len(variants)  # rotate the order so no variant always goes first
            for name in variants[shift:] + variants[:shift]:
                results[name].append(run_variant(name, cfg, Path(tmp)))
    on_a_gpu = device == "cuda"  # the goals are a GPU's: CPU timings are not judged
    for label, pick in pickers(repeats):
        step = {name: pick(values) for name, values in results.items()}
        rows = [(f"{name} [ms/step]", 1e3 * value, "") for name, value in step.items()]
        for name in variants[1:]:
            ratio = step[name] / step["plain"]
            judged = name == "trainyard" and on_a_gpu
            rows.append((f"{name} / plain", ratio, goal(ratio, 1.00) if judged else ""))
        if "plain-on-gpu" in step:
            on_gpu = step["trainyard"] / step["plain-on-gpu"]
            rows.append(
                ("trainyard / plain-on-gpu", on_gpu, goal(on_gpu, 1.10) if on_a_gpu else "")
            )
        if "plain-on-gpu-fused" in step:
            own = step["trainyard"] / step["plain-on-gpu-fused"]
            rows.append(("trainyard / plain-on-gpu-fused (trainyard and Lightning)", own, ""))
            extra = 1e6 * (step["trainyard"] - step["plain-on-gpu-fused"])
            rows.append(("trainyard - plain-on-gpu-fused [us/step]", extra, ""))
        title = f"{case} on {device}: per-step time, {label} of {repeats} runs x {steps}"
        report(f"{title} ({RATIOS})", rows)
    return {name: statistics.median(values) for name, values in results.items()}


def profile(case: str, steps: int, device: str, variants: tuple[str, ...], median: dict) -> None:
    """Profile ``steps`` steps of each variant (one run each, after the timed ones): work
    launched, waits on the GPU and GPU busy time per step, and trainyard's operations
    against the loop it is closest to."""
    rows, found = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _compose(case, device, steps, Path(tmp))
        for name in variants:
            timer = ProfiledTimer(steps, cuda=device == "cuda")
            run_variant(name, cfg, Path(tmp), timer=timer)
            found[name] = timer.result
            rows += timer.result.rows(name, 1e3 * median.get(name, 0.0), gpu=device == "cuda")
    report(f"{case} on {device}: profile of {steps} steps, per step", rows)
    reference = next((n for n in ("plain-on-gpu-fused", "plain-on-gpu") if n in found), None)
    if reference and "trainyard" in found:
        extra = op_difference(found["trainyard"], found[reference])
        shown = ", ".join(f"{op} {n:+g}" for op, n in extra.items()) or "none"
        print(f"  aten ops per step, trainyard against {reference}: {shown}")


def main() -> int:
    parser = cpu_bench.step_command_line(__doc__, CASES, repeats=2)
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda",
        help="cpu: check this script on a machine without a GPU (its timings say nothing)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, plain first"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="STEPS",
        help="then profile STEPS steps of each variant (0: no profile; --repeats 0: only it)",
    )  # fmt: skip
    args = parser.parse_args()
    variants = tuple(args.variants.split(","))
    if variants[0] != "plain" or not set(variants) <= set(VARIANTS) or "trainyard" not in variants:
        parser.error(f"--variants: plain first, then trainyard and any of {', '.join(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_step: skipped: no CUDA GPU is visible to torch (nothing was measured)")
        return 0
    torch.set_float32_matmul_precision("high")  # what trainer=gpu sets, for every column
    torch.backends.cudnn.benchmark = True
    cpu_bench.quiet()
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    else:
        print("--device cpu: a check of this script; its timings say nothing about a GPU")
    for case in args.cases:
        median = measure(case, args.repeats, args.steps, args.device, variants)
        if args.profile:
            profile(case, args.profile, args.device, variants, median)
    return 0


if __name__ == "__main__":
    sys.exit(main())
