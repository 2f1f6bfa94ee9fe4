"""Resumable data order and per-sample seeds: EpochSampler, SeededDataset, make_loader."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from podium.engine.loading import EpochSampler, SeededDataset, default_num_workers, make_loader


class RandomItems(Dataset):
    """Each item draws from the global torch RNG, as a random augmentation would."""

    def __init__(self, n: int = 24):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return torch.tensor(index), torch.rand(())


def indices(sampler) -> list[int]:
    return [i for i, _ in sampler]


def values_by_index(loader) -> dict[int, float]:
    out = {}
    for idx, val in loader:
        for i, v in zip(idx.tolist(), val.tolist()):
            assert i not in out
            out[i] = v
    return out


# ---------------------------------------------------------------------------- EpochSampler


def test_same_seed_and_epoch_give_the_same_order():
    a = EpochSampler(50, shuffle=True, seed=3, batch_size=4)
    b = EpochSampler(50, shuffle=True, seed=3, batch_size=4)
    a.set_epoch(2)
    b.set_epoch(2)
    assert indices(a) == indices(b)
    assert sorted(indices(a)) == list(range(50))
    assert indices(a) != list(range(50))
    assert all(epoch == 2 for _, epoch in a)


def test_different_epoch_or_seed_gives_a_different_order():
    s = EpochSampler(50, shuffle=True, seed=3, batch_size=4)
    s.set_epoch(0)
    epoch0 = indices(s)
    s.set_epoch(1)
    assert indices(s) != epoch0
    other = EpochSampler(50, shuffle=True, seed=4, batch_size=4)
    assert indices(other) != epoch0


def test_order_does_not_depend_on_the_global_rng():
    s = EpochSampler(50, shuffle=True, seed=3, batch_size=4)
    torch.manual_seed(1)
    first = indices(s)
    torch.manual_seed(2)
    assert indices(s) == first


def test_unshuffled_order_is_sequential():
    s = EpochSampler(10, shuffle=False, seed=0, batch_size=3)
    assert indices(s) == list(range(10))
    assert len(s) == 10


@pytest.mark.parametrize("start_batch", [0, 1, 3, 6])
def test_start_batch_resumes_the_tail_of_the_same_order(start_batch):
    s = EpochSampler(23, shuffle=True, seed=5, batch_size=4)
    s.set_epoch(7)
    full = list(s)
    s.set_epoch(7, start_batch=start_batch)
    tail = list(s)
    assert tail == full[start_batch * 4:]
    assert len(s) == len(tail)
    s.set_epoch(8)  # a new epoch starts from its first batch again
    assert len(s) == 23


def test_eval_shards_are_disjoint_and_cover_every_index_once():
    shards = []
    for rank in range(2):
        s = EpochSampler(11, shuffle=False, seed=0, batch_size=4, rank=rank, world_size=2, pad=False)
        shards.append(indices(s))
        assert len(s) == len(shards[-1])
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(11))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_train_shards_are_padded_to_equal_length(world_size):
    length = 10
    shards = []
    for rank in range(world_size):
        s = EpochSampler(length, shuffle=True, seed=1, batch_size=2, rank=rank, world_size=world_size)
        s.set_epoch(4)
        shards.append(indices(s))
    sizes = {len(shard) for shard in shards}
    assert sizes == {-(-length // world_size)}
    union = [i for shard in shards for i in shard]
    assert set(union) == set(range(length))  # every sample is seen at least once
    assert len(union) - length == (-length) % world_size  # only the padding repeats


@pytest.mark.parametrize("length, world_size", [(1, 4), (3, 8)])
def test_train_shards_are_equal_when_the_dataset_is_smaller_than_world_size(length, world_size):
    sizes = [len(EpochSampler(length, shuffle=True, seed=0, batch_size=1, rank=r, world_size=world_size))
             for r in range(world_size)]
    assert len(set(sizes)) == 1


# ---------------------------------------------------------------------------- SeededDataset


def test_seeded_dataset_is_deterministic_per_index_and_epoch():
    ds = SeededDataset(RandomItems(), seed=0)
    assert ds[(3, 0)][1] == ds[(3, 0)][1]
    assert ds[(3, 0)][1] != ds[(3, 1)][1]
    assert ds[(3, 0)][1] != ds[(4, 0)][1]
    assert SeededDataset(RandomItems(), seed=1)[(3, 0)][1] != ds[(3, 0)][1]
    assert len(ds) == 24
    assert ds.n == 24  # attributes of the wrapped dataset are exposed


@pytest.mark.parametrize("seed", [20240101, 2**31 - 1])
def test_seeded_dataset_accepts_large_seeds(seed):
    ds = SeededDataset(RandomItems(), seed=seed)
    assert ds[(3, 5)][1] == ds[(3, 5)][1]


def test_sample_values_do_not_depend_on_num_workers():
    ds = RandomItems(24)
    results = {}
    for workers in (0, 2):
        loader = make_loader(ds, train=True, batch_size=5, seed=11, num_workers=workers,
                             persistent_workers=False, drop_last=False)
        per_epoch = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            per_epoch.append(values_by_index(loader))
        results[workers] = per_epoch
    assert results[0] == results[2]
    epoch0, epoch1 = results[0]
    assert set(epoch0) == set(range(24))
    assert all(epoch0[i] != epoch1[i] for i in range(24))


def test_loading_does_not_advance_the_global_rng():
    loader = make_loader(RandomItems(12), train=True, batch_size=4, seed=0, num_workers=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for epoch in (0, 1):  # each new iterator draws a worker base seed, not from the global RNG
        loader.sampler.set_epoch(epoch)
        for _ in loader:
            pass
    assert torch.equal(torch.get_rng_state(), before)


def test_sample_draws_do_not_touch_the_global_rng():
    # The per-sample fork restores the global state after each item's own draws.
    ds = SeededDataset(RandomItems(), seed=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for i in range(5):
        ds[(i, 0)]
    assert torch.equal(torch.get_rng_state(), before)


def test_loader_resume_yields_the_remaining_batches():
    loader = make_loader(RandomItems(22), train=True, batch_size=4, seed=2, num_workers=0)
    loader.sampler.set_epoch(3)
    full = [(i.tolist(), v.tolist()) for i, v in loader]
    loader.sampler.set_epoch(3, start_batch=2)
    assert [(i.tolist(), v.tolist()) for i, v in loader] == full[2:]


# ---------------------------------------------------------------------------- make_loader


def test_make_loader_drop_last_rule():
    # Training drops the last partial batch when there is more than one batch.
    assert make_loader(RandomItems(10), train=True, batch_size=4, num_workers=0).drop_last is True
    assert len(make_loader(RandomItems(10), train=True, batch_size=4, num_workers=0)) == 2
    assert make_loader(RandomItems(4), train=True, batch_size=4, num_workers=0).drop_last is False
    assert make_loader(RandomItems(3), train=True, batch_size=4, num_workers=0).drop_last is False
    # Evaluation never drops a sample.
    eval_loader = make_loader(RandomItems(10), train=False, batch_size=4, num_workers=0)
    assert eval_loader.drop_last is False
    assert sum(len(i) for i, _ in eval_loader) == 10
    # Per rank: 10 samples over 2 ranks is 5 per rank, more than a batch of 4.
    assert make_loader(RandomItems(10), train=True, batch_size=4, num_workers=0, world_size=2).drop_last is True
    assert make_loader(RandomItems(8), train=True, batch_size=4, num_workers=0, world_size=2).drop_last is False
    # An explicit choice wins.
    assert make_loader(RandomItems(10), train=True, batch_size=4, num_workers=0, drop_last=False).drop_last is False


def test_padded_training_shards_never_end_with_a_single_sample_batch():
    loader = make_loader(RandomItems(9), train=True, batch_size=4, num_workers=0, rank=0, world_size=2)
    assert min(len(i) for i, _ in loader) > 1


def test_make_loader_workers_and_sampler():
    loader = make_loader(RandomItems(10), train=False, batch_size=4, num_workers=0)
    assert loader.num_workers == 0
    assert isinstance(loader.sampler, EpochSampler) and loader.sampler.shuffle is False
    assert isinstance(loader.dataset, SeededDataset)
    auto = make_loader(RandomItems(10), train=True, batch_size=4, persistent_workers=False)
    assert auto.num_workers == default_num_workers()
    assert auto.sampler.shuffle is True


def test_default_num_workers_is_bounded():
    for world_size in (1, 2, 8, 1000):
        assert 0 <= default_num_workers(world_size) <= 8
    assert default_num_workers(1000) == 0
    assert default_num_workers(2) <= default_num_workers(1)
