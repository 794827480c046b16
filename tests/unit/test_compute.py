"""trainer.float32_matmul_precision, benchmark and compile: set from the config, kept out of
Lightning's Trainer arguments, checked before a run starts."""

import logging
import os

import pytest
import torch

from tests.helpers.run_if import RunIf
from trainyard import compute, preflight, worker
from trainyard.errors import ConfigError
from trainyard.freeze import freeze
from trainyard.rundir import RunDir


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def _build(cfg_factory, tmp_path, *overrides):
    cfg = cfg_factory("logger=none", "callbacks=none", *overrides)
    frozen = preflight.check_config(freeze(cfg))
    return worker.build(frozen, RunDir(tmp_path / "run"), "cpu", 1)


def test_matmul_precision_is_set_from_the_config(cfg_factory, tmp_path, restore_matmul_precision):
    _build(cfg_factory, tmp_path, "trainer.float32_matmul_precision=medium")
    assert torch.get_float32_matmul_precision() == "medium"
    _build(cfg_factory, tmp_path)  # the default: exact float32
    assert torch.get_float32_matmul_precision() == "highest"


def test_cudnn_benchmark_by_default_only_for_gpu_runs_that_need_not_be_deterministic(
    cfg_factory, tmp_path, restore_matmul_precision
):
    assert compute.cudnn_benchmark({"benchmark": None}, "gpu") is True
    assert compute.cudnn_benchmark({"benchmark": None, "deterministic": True}, "gpu") is False
    assert compute.cudnn_benchmark({"benchmark": None}, "cpu") is False
    assert compute.cudnn_benchmark({"benchmark": False}, "gpu") is False
    torch.backends.cudnn.benchmark = True  # Lightning keeps the session's value for None
    try:
        _build(cfg_factory, tmp_path)
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.compile_mode=fastest", "compile_mode='fastest' is not one of"),
        ("trainer.float32_matmul_precision=low", "float32_matmul_precision='low'"),
        ("trainer.compile=maybe", "trainer.compile must be true or false"),
        ("+trainer.compiled=true", r"trainer.compiled is not an argument.*\n.*trainer.compile"),
    ],
)
def test_bad_values_are_refused_before_the_run(cfg_factory, override, message):
    with pytest.raises(ConfigError, match=message):
        preflight.check_config(freeze(cfg_factory(override)))


@pytest.mark.slow
@pytest.mark.skipif(
    bool(os.environ.get("TRAINYARD_PRETEND_GPUS")),
    reason="torch.compile saves the CUDA random state when CUDA says it is available, which "
    "pretended GPUs (tests/helpers/pretend_gpus) cannot give",
)
def test_a_compiled_network_trains_and_keeps_its_parameter_names(
    cfg_factory, tmp_path, restore_matmul_precision
):
    data = ["data=synthetic", "data.shape=[16]", "data.num_samples=64", "data.batch_size=16"]
    small = [*data, "model=mlp", "model.hidden=[8]", "trainer.max_steps=2"]
    datamodule, task, trainer = _build(cfg_factory, tmp_path, *small, "trainer.compile=true")
    assert task.net._compiled_call_impl is not None  # compiled in place, not wrapped
    before = {k: v.clone() for k, v in task.net.state_dict().items()}
    trainer.fit(task, datamodule=datamodule)
    after = task.net.state_dict()
    assert after.keys() == before.keys() and not any("_orig_mod" in k for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in after)  # it trained


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("64-true", torch.float64), ("bf16-true", torch.bfloat16), ("32-true", torch.float32)],
)
def test_the_task_is_built_in_the_dtype_it_trains_in_and_hashes_in_it(
    cfg_factory, tmp_path, precision, dtype
):
    # Lightning restores a checkpoint into the module before its precision converts it:
    # built in float32, a 64-true resume was rounded through float32
    small = ["data=synthetic", "data.shape=[16]", "model=mlp", "model.hidden=[8]"]
    _, task, _ = _build(cfg_factory, tmp_path, *small, f"trainer.precision={precision}")
    assert {p.dtype for p in task.parameters()} == {dtype}
    # the digests a bit-identical resume is checked with read any dtype (numpy has no bf16)
    before = worker.state_digest(task)
    with torch.no_grad():
        next(task.parameters()).view(-1)[0] += 1
    assert worker.state_digest(task) != before
    assert len(worker.weights_digest(task)) == 16


def _advice_logged(caplog, emit) -> list[str]:
    worker.prepare_process()
    with caplog.at_level(logging.INFO):
        emit()
    return [r.getMessage() for r in caplog.records if "Tensor Cores" in r.getMessage()]


def test_lightnings_tensor_cores_advice_is_not_printed(caplog):
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    # Lightning's words, through its own logger: the config chose the precision already
    advice = (
        "You are using a CUDA device ('NVIDIA H200') that has Tensor Cores. To properly utilize "
        "them, you should set `torch.set_float32_matmul_precision('medium' | 'high')`"
    )
    assert _advice_logged(caplog, lambda: rank_zero_info(advice)) == []
    rank_zero_info("GPU available: False")  # everything else still reaches the log
    assert any("GPU available" in r.getMessage() for r in caplog.records)


@RunIf(min_gpus=1)
def test_tensor_cores_advice_is_not_printed_on_a_gpu(caplog, restore_matmul_precision):
    from lightning_fabric.accelerators.cuda import _check_cuda_matmul_precision

    torch.set_float32_matmul_precision("highest")  # what trainer=cpu's default chooses
    device = torch.device("cuda", 0)
    assert _advice_logged(caplog, lambda: _check_cuda_matmul_precision(device)) == []
