"""Bad input is refused before anything starts, with a message that names the fix."""

import os

import pytest

from trainyard import preflight
from trainyard.errors import ConfigError
from trainyard.freeze import freeze


def check(cfg_factory, *overrides):
    """Both kinds of check, as a local run makes them: the config, then this machine."""
    cfg = preflight.check_config(freeze(cfg_factory(*overrides)), build=False)
    return preflight.check_machine(cfg)


@pytest.mark.parametrize(
    ("override", "message", "fix"),
    [
        (
            "trainer.max_epochs=abc",
            "trainer.max_epochs must be an integer",
            "trainer.max_epochs=10",
        ),
        ("data.batch_size=0", "data.batch_size must be an integer >= 1", "data.batch_size=64"),
        ("data.batch_size=12.5", "data.batch_size must be an integer", "data.batch_size=64"),
        ("optimizer.lr=-1", "optimizer.lr must be a number > 0", "optimizer.lr=0.001"),
        ("optimizer.lr=fast", "optimizer.lr must be a number > 0", "optimizer.lr=0.001"),
        ("seed=true", "seed must be an integer", "seed=42"),
        ("trainer.precision=17", "not a precision Lightning knows", "bf16-mixed"),
        ("trainer.precision=16-mixed", "needs a GPU", "32-true"),
        ("name=../../etc", "name must be letters", "name=my_experiment"),
        ("name='a b'", "name must be letters", "name=my_experiment"),
        ("monitor_mode=up", "monitor_mode must be min or max", None),
        ("dist.timeout_s=0", "dist.timeout_s must be a number > 0", "dist.timeout_s=300"),
    ],
)
def test_wrong_values_name_the_setting_and_the_fix(cfg_factory, override, message, fix):
    with pytest.raises(ConfigError) as info:
        check(cfg_factory, override)
    assert message in info.value.message
    if fix:
        assert fix in info.value.fix


@pytest.mark.parametrize("devices", [0, -2])
def test_devices_must_be_positive(cfg_factory, devices):
    with pytest.raises(ConfigError, match=r"trainer\.devices must be a positive integer"):
        check(cfg_factory, "trainer=ddp", f"trainer.devices={devices}")


def test_more_devices_than_the_machine_has(cfg_factory):
    cores = os.cpu_count()
    with pytest.raises(ConfigError, match=f"this machine has {cores} CPU cores") as info:
        check(cfg_factory, "trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={cores + 1}")
    assert f"trainer.devices={cores}" in info.value.fix


@pytest.mark.skipif(preflight.visible_gpus() > 0, reason="a GPU is visible: auto chooses it")
def test_auto_that_chose_cpu_processes_does_not_speak_of_gpus(cfg_factory):
    with pytest.raises(ConfigError) as info:
        check(cfg_factory, "trainer=ddp", f"trainer.devices={os.cpu_count() + 1}")
    assert info.value.message.endswith(f"this machine has {os.cpu_count()} CPU cores")
    assert "accelerator" not in info.value.fix  # tests/integration/test_gpu_machine.py: GPUs


# Where a GPU is visible the request is valid, so the error under test cannot arise.
@pytest.mark.skipif(preflight.visible_gpus() > 0, reason="a GPU is visible: nothing to refuse")
def test_gpu_requested_on_a_machine_without_one(cfg_factory):
    with pytest.raises(ConfigError, match="no CUDA GPU is visible") as info:
        check(cfg_factory, "trainer=gpu")
    assert "trainer=cpu" in info.value.fix


def test_several_devices_need_ddp(cfg_factory):
    with pytest.raises(ConfigError, match="needs a data-parallel strategy") as info:
        check(cfg_factory, "trainer.devices=2")
    assert "trainer=ddp" in info.value.fix


def test_multi_node_needs_a_scheduler(cfg_factory):
    with pytest.raises(ConfigError, match="needs a scheduler") as info:
        check(cfg_factory, "trainer=ddp", "trainer.accelerator=cpu", "trainer.num_nodes=2")
    assert "srun" in info.value.fix


def test_auto_devices_become_concrete(cfg_factory):
    assert check(cfg_factory, "trainer=ddp", "trainer.accelerator=cpu") == ("cpu", 2)
    # accelerator auto: GPUs where some are visible (as many as this machine has, up to 2)
    gpus = preflight.visible_gpus()
    devices = min(gpus, 2) if gpus else 2
    accelerator, _ = check(cfg_factory, "trainer=ddp", f"trainer.devices={devices}")
    assert accelerator == ("gpu" if gpus else "cpu")
    assert check(cfg_factory, "trainer.devices=auto") == ("cpu", 1)


def test_a_monitor_nothing_logs_is_refused_before_training(cfg_factory):
    from trainyard.preflight import CLASSIFIER_MONITORABLE

    with pytest.raises(ConfigError, match="val_loss") as info:
        check(cfg_factory, "monitor=val_loss")
    assert all(name in info.value.render() for name in CLASSIFIER_MONITORABLE)
    check(cfg_factory, "monitor=val/loss", "monitor_mode=min")


def test_collective_debug_switches_become_each_ranks_environment(cfg_factory):
    switches = ["dist.nccl_debug=INFO", "dist.nccl_socket_ifname='^docker,lo'",
                "dist.gloo_socket_ifname=lo", "dist.distributed_debug=DETAIL"]  # fmt: skip
    cfg = freeze(cfg_factory(*switches))
    assert preflight.dist_environment(cfg) == {
        "NCCL_DEBUG": "INFO", "TORCH_DISTRIBUTED_DEBUG": "DETAIL",
        "NCCL_SOCKET_IFNAME": "^docker,lo", "GLOO_SOCKET_IFNAME": "lo",
    }  # fmt: skip
    assert preflight.dist_environment(freeze(cfg_factory())) == {}


def test_the_distributed_debug_level_takes_effect_with_torch_imported(cfg_factory, monkeypatch):
    import torch.distributed as dist

    from trainyard.worker import apply_dist_environment

    monkeypatch.delenv("TORCH_DISTRIBUTED_DEBUG", raising=False)
    dist.set_debug_level_from_env()
    assert dist.get_debug_level() == dist.DebugLevel.OFF
    try:
        monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "OFF")
        apply_dist_environment(freeze(cfg_factory("dist.distributed_debug=DETAIL")))
        assert dist.get_debug_level() == dist.DebugLevel.DETAIL
    finally:
        monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "OFF")
        dist.set_debug_level_from_env()


@pytest.mark.parametrize("override", ["dist.nccl_debug=LOUD", "dist.nccl_socket_ifname='lo; id'",
                                      "dist.gloo_socket_ifname='^docker0'",
                                      "dist.distributed_debug=detail"])  # fmt: skip
def test_a_debug_switch_the_variable_would_not_take_is_refused(cfg_factory, override):
    with pytest.raises(ConfigError, match=r"is not a value .* takes") as info:
        preflight.check_config(freeze(cfg_factory(override)), build=False)
    assert "or null" in info.value.fix


def test_the_trainer_arguments_known_without_lightning_are_lightnings():
    import inspect

    import pytorch_lightning as pl

    signature = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    assert signature == preflight.TRAINER_ARGS  # Lightning changed: update TRAINER_ARGS


def test_a_misspelt_trainer_key_is_refused_without_building_anything(cfg_factory):
    with pytest.raises(ConfigError, match=r"trainer\.max_epoch is not an argument") as info:
        preflight.check_config(freeze(cfg_factory("+trainer.max_epoch=1")), build=False)
    assert info.value.fix.startswith("trainer.max_epochs")


@pytest.mark.parametrize(
    "override",
    [
        "data.normalize=no",  # trained as if yes: any non-empty string is true in Python
        "data.augment=1",
        "data.on_device=maybe",  # a base class's setting, reached through **kwargs
        "model.batch_norm=off",
        "test_after_fit=no",
        "resume=yes",
        "+optimizer.amsgrad=yes",  # torch's own constructor
        "trainer.sync_batchnorm=off",  # Lightning's
        "+callbacks.checkpoint.save_weights_only=no",
    ],
)
def test_a_true_or_false_setting_given_anything_else_is_refused(cfg_factory, override):
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(ConfigError) as info:
        preflight.check_config(freeze(cfg_factory(override)))
    assert f"{key} must be true or false, got" in info.value.message
    assert info.value.fix == f"{key}=true or {key}=false"


@pytest.mark.parametrize(
    "override",
    ["data.normalize=false", "model.batch_norm=true", "+optimizer.fused=null", "resume=false"],
)
def test_true_false_and_none_where_allowed_pass(cfg_factory, override):
    preflight.check_config(freeze(cfg_factory(override)))


class _Base:
    def __init__(self, log_model: bool = False, level: "Union[bool, None]" = None):  # noqa: F821
        self.log_model, self.level = log_model, level


class _LogsModels(_Base):
    """A constructor whose true/false-defaulted setting also takes a word (as
    WandbLogger's ``log_model: Literal["all"] | bool``), over a base that took only
    true/false; ``sloppy`` takes None by its default, whatever its annotation says."""

    def __init__(
        self,
        log_model: bool | str = False,
        quiet: bool = True,
        sloppy: bool = None,  # noqa: RUF013
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.log_model, self.quiet, self.sloppy = log_model, quiet, sloppy


def test_which_settings_are_taken_for_flags():
    found = preflight._bool_parameters(f"{__name__}._LogsModels")
    # the nearer declaration of log_model decides; the base's own level (a string
    # annotation) is reached through **kwargs; the bool: None flags accept null
    assert found == {"quiet": False, "sloppy": True, "level": True}


def test_a_cluster_flag_is_checked_where_a_sweep_is_submitted(cfg_factory):
    with pytest.raises(ConfigError, match=r"cluster\.allow_dirty must be true or false"):
        preflight.check_config(freeze(cfg_factory("cluster=k8s", "cluster.allow_dirty=no")),
                               build=False)  # fmt: skip


def test_a_batch_of_one_is_refused_for_a_network_whose_batchnorm_cannot_take_it(cfg_factory):
    overrides = ("data=synthetic", "data.shape=[12]", "model=mlp", "data.batch_size=1")
    with pytest.raises(ConfigError) as info:
        preflight.check_config(freeze(cfg_factory(*overrides, "model.batch_norm=true")))
    assert "data.batch_size=1 cannot train this network" in info.value.message
    assert info.value.fix == "data.batch_size=2 (or more) or model.batch_norm=false"
    # without BatchNorm, or with BatchNorm2d over several pixels, one sample trains
    preflight.check_config(freeze(cfg_factory(*overrides, "model.batch_norm=false")))
    preflight.check_config(freeze(cfg_factory("model=cnn", "data.batch_size=1")))
    # SyncBatchNorm over several ranks normalises over the global batch
    ddp = ("trainer=ddp", "trainer.devices=2", "trainer.sync_batchnorm=true")
    preflight.check_config(freeze(cfg_factory(*overrides, "model.batch_norm=true", *ddp)))
