"""mimscale.data.sampler: per-rank shares, epoch orders, resume position."""
from __future__ import annotations

import pytest

from mimscale.data.sampler import ShardedBatchSampler


def _take(it, k):
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("n,batch", [(41, 4), (45, 4), (40, 5), (7, 3)])
def test_sampler_two_ranks_disjoint_and_cover(n, batch):
    world = 2
    samplers = [ShardedBatchSampler(n, batch, r, world, seed=3) for r in range(world)]
    per_rank = n // world
    bpe = per_rank // batch
    assert all(len(s) == bpe for s in samplers)
    its = [iter(s) for s in samplers]
    orders = []
    for epoch in range(4):
        idx = [s.epoch_indices(epoch).tolist() for s in samplers]
        assert len(idx[0]) == len(idx[1]) == per_rank
        assert not set(idx[0]) & set(idx[1])
        assert len(set(idx[0]) | set(idx[1])) == per_rank * world == (n // 2) * 2
        assert all(0 <= i < n for i in idx[0] + idx[1])
        batches = [_take(it, bpe) for it in its]
        for r in range(world):
            keys = [k for b in batches[r] for k in b]
            assert all(len(b) == batch for b in batches[r])
            assert all(e == epoch for e, _ in keys)
            assert [i for _, i in keys] == idx[r][: bpe * batch]  # whole batches, in order
        seen0 = {i for b in batches[0] for _, i in b}
        seen1 = {i for b in batches[1] for _, i in b}
        assert not seen0 & seen1
        orders.append(idx[0] + idx[1])
    assert len({tuple(o) for o in orders}) == 4  # each epoch a different order


def test_sampler_seed_changes_order_and_no_shuffle_is_arange():
    a = ShardedBatchSampler(50, 5, seed=0).epoch_indices(0).tolist()
    b = ShardedBatchSampler(50, 5, seed=11).epoch_indices(0).tolist()
    assert a != b and sorted(a) == sorted(b) == list(range(50))
    s = ShardedBatchSampler(10, 2, rank=1, world_size=2, shuffle=False)
    assert s.epoch_indices(0).tolist() == [1, 3, 5, 7, 9]
    assert next(iter(s)) == [(0, 1), (0, 3)]


@pytest.mark.parametrize("k", [0, 1, 4, 5, 6, 13, 27])
def test_sampler_start_equals_skip(k):
    for rank in (0, 1):
        ref = iter(ShardedBatchSampler(23, 2, rank, 2, seed=9))  # 11 per rank, 5 batches/epoch
        for _ in range(k):
            next(ref)
        resumed = iter(ShardedBatchSampler(23, 2, rank, 2, seed=9, start=k))
        assert _take(resumed, 12) == _take(ref, 12)


def test_sampler_position():
    s = ShardedBatchSampler(23, 2, 0, 2)  # 5 batches per epoch
    assert s.batches_per_epoch == 5
    assert [s.position(k) for k in (0, 1, 4, 5, 9, 10, 27)] == [(0, 0), (0, 1), (0, 4), (1, 0), (1, 4), (2, 0), (5, 2)]
    # and the k-th batch yielded really is at that (epoch, batch) position
    it = iter(s)
    for k in range(12):
        b = next(it)
        e, j = s.position(k)
        assert b == [(e, i) for i in s.epoch_indices(e).tolist()[j * 2 : (j + 1) * 2]]


def test_sampler_too_few_samples():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ShardedBatchSampler(7, 4, 0, 2)
