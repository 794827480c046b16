"""Resumable loading: the same shards as DistributedSampler, exact mid-epoch restarts, and no
draws from the global random streams."""

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from trainyard.data import augment
from trainyard.data.loader import ResumableLoader, ResumableSampler


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("size", [10, 17])
def test_training_shards_match_distributed_sampler(world_size, size, drop_last):
    data = list(range(size))
    for epoch in range(3):
        for rank in range(world_size):
            ours = ResumableSampler(
                size, shuffle=True, seed=7, rank=rank, world_size=world_size, drop_last=drop_last
            )
            theirs = DistributedSampler(
                data, world_size, rank, shuffle=True, seed=7, drop_last=drop_last
            )
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
            assert len(ours) == len(theirs)


def test_each_epoch_has_its_own_order():
    sampler = ResumableSampler(50, shuffle=True, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(list(sampler)) == sorted(first) and list(sampler) != first


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_counts_every_sample_exactly_once(world_size):
    seen = []
    for rank in range(world_size):
        sampler = ResumableSampler(17, shuffle=False, rank=rank, world_size=world_size, pad=False)
        assert len(sampler) == len(list(sampler))
        seen += list(sampler)
    assert sorted(seen) == list(range(17))


def test_a_trailing_batch_of_one_is_dropped_for_training():
    # 65 samples in batches of 16 would end with a batch of 1, which BatchNorm refuses
    sampler = ResumableSampler(65, shuffle=True, batch_size=16)
    assert len(sampler) == len(list(sampler)) == 64
    assert len(ResumableSampler(66, shuffle=True, batch_size=16)) == 66


def _loader(position=None, **kwargs):
    data = TensorDataset(torch.arange(40.0).unsqueeze(1), torch.arange(40))
    sampler = ResumableSampler(40, shuffle=True, seed=3)
    return ResumableLoader(data, sampler=sampler, position=position, batch_size=8, **kwargs)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_pass_starts_where_training_stands(num_workers):
    full = [y.tolist() for _, y in _loader(position=lambda: (2, 0), num_workers=num_workers)]
    resumed = [y.tolist() for _, y in _loader(position=lambda: (2, 3), num_workers=num_workers)]
    assert resumed == full[3:]


def test_state_round_trips_through_a_checkpoint():
    loader = _loader(position=lambda: (4, 2))
    state = loader.state_dict()
    assert state == {"epoch": 4, "batches": 2}
    fresh = _loader(position=lambda: (0, 0))
    fresh.load_state_dict(state)
    assert [y.tolist() for _, y in fresh] == [y.tolist() for _, y in loader]
    # the loaded position is used once; the next pass asks the trainer again
    assert len(list(fresh)) == 5


def test_loading_draws_nothing_from_the_global_stream():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for _ in _loader(position=lambda: (0, 0)):
        pass
    assert torch.equal(before, torch.get_rng_state())


def test_batch_augmentations_keep_shape_and_follow_the_seed():
    x = torch.randn(6, 3, 8, 8)
    for fn in (
        lambda t: augment.random_shift(t, 1),
        lambda t: augment.random_crop(t, 2, fill=[0.5, -1.0, 2.0]),
        augment.random_hflip,
    ):
        torch.manual_seed(1)
        a = fn(x)
        torch.manual_seed(1)
        assert a.shape == x.shape and torch.equal(a, fn(x))


def test_crop_pads_with_the_fill_value_and_shift_wraps():
    x = torch.ones(64, 2, 4, 4)
    torch.manual_seed(0)
    cropped = augment.random_crop(x, padding=2, fill=[-3.0, 5.0])
    assert set(cropped[:, 0].unique().tolist()) <= {1.0, -3.0}
    assert set(cropped[:, 1].unique().tolist()) <= {1.0, 5.0}
    assert (cropped[:, 0] == -3.0).any()  # some image was shifted into its padding
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(32, 1, 1, 1)
    shifted = augment.random_shift(x, 1)
    # a roll moves pixels around without losing any
    assert torch.equal(shifted.flatten(1).sort().values, x.flatten(1).sort().values)
    assert not torch.equal(shifted, x)
