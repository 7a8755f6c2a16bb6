"""mimscale.data.sampler: global batches dealt to ranks, epoch orders, resume position."""
from __future__ import annotations

import pytest

from mimscale.data.sampler import ShardedBatchSampler


def _take(it, k):
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("n,batch", [(41, 4), (45, 4), (40, 5), (7, 3)])
def test_sampler_two_ranks_disjoint_and_cover(n, batch):
    world = 2
    samplers = [ShardedBatchSampler(n, batch, r, world, seed=3) for r in range(world)]
    bpe = n // (batch * world)
    assert all(len(s) == bpe for s in samplers)
    its = [iter(s) for s in samplers]
    orders = []
    for epoch in range(4):
        idx = [s.epoch_indices(epoch).tolist() for s in samplers]
        assert len(idx[0]) == len(idx[1]) == bpe * batch
        assert not set(idx[0]) & set(idx[1])
        assert all(0 <= i < n for i in idx[0] + idx[1])
        batches = [_take(it, bpe) for it in its]
        for r in range(world):
            keys = [k for b in batches[r] for k in b]
            assert all(len(b) == batch for b in batches[r])
            assert all(e == epoch for e, _ in keys)
            assert [i for _, i in keys] == idx[r]  # whole batches, in order
        orders.append(idx[0] + idx[1])
    assert len({tuple(o) for o in orders}) == 4  # each epoch a different order


def _global_batches(n: int, global_batch: int, micro: int, world: int, steps: int, seed: int = 5, start_step: int = 0):
    """The sample sets of ``steps`` optimizer steps, as a run with this layout sees them."""
    accum = global_batch // (micro * world)
    its = [iter(ShardedBatchSampler(n, micro, r, world, seed, start=start_step * accum, accumulation=accum)) for r in range(world)]
    out = []
    for _ in range(steps):
        keys = []
        for _ in range(accum):
            for it in its:
                keys += next(it)
        out.append(keys)
    return out


@pytest.mark.parametrize("layout", [(8, 1), (4, 1), (2, 2), (4, 2), (1, 8), (2, 4)])
def test_a_global_batch_holds_the_same_samples_on_any_world_size(layout):
    """Global batch k is the same chunk of the epoch's permutation for 1 rank x accumulation 8,
    2 ranks x 2 x micro 4, 8 ranks x 1, ...: the recipe decides the data, not the hardware."""
    micro, world = layout
    n, G = 100, 16  # 6 global batches per epoch, 4 samples dropped each epoch
    ref = _global_batches(n, G, micro=16, world=1, steps=14)
    got = _global_batches(n, G, micro=micro, world=world, steps=14)
    for k, (a, b) in enumerate(zip(ref, got)):
        assert sorted(a) == sorted(b), k  # the same (epoch, index) keys: same crops too
        assert len(set(i for _, i in b)) == G
    # and in chunk order: position p of the global batch is the same sample everywhere
    chunks = [ref[0][c * micro:(c + 1) * micro] for c in range(G // micro)]
    assert got[0] == [k for c in chunks for k in c]
    # resuming at step 9 on this layout continues the same sequence
    assert _global_batches(n, G, micro, world, steps=3, start_step=9) == got[9:12]


def test_sampler_seed_changes_order_and_no_shuffle_is_arange():
    a = ShardedBatchSampler(50, 5, seed=0).epoch_indices(0).tolist()
    b = ShardedBatchSampler(50, 5, seed=11).epoch_indices(0).tolist()
    assert a != b and sorted(a) == sorted(b) == list(range(50))
    s = ShardedBatchSampler(10, 2, rank=1, world_size=2, shuffle=False)
    assert s.epoch_indices(0).tolist() == [2, 3, 6, 7]  # chunk 1 of each global batch of 4
    assert next(iter(s)) == [(0, 2), (0, 3)]
    s = ShardedBatchSampler(18, 2, rank=1, world_size=2, shuffle=False, accumulation=2)
    assert s.epoch_indices(0).tolist() == [2, 3, 6, 7, 10, 11, 14, 15]  # chunks 1 and 3 of global batches [0, 8) and [8, 16)


@pytest.mark.parametrize("k", [0, 1, 4, 5, 6, 13, 27])
def test_sampler_start_equals_skip(k):
    for rank in (0, 1):
        ref = iter(ShardedBatchSampler(23, 2, rank, 2, seed=9))  # 5 global batches of 4 per epoch
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
    with pytest.raises(ValueError, match="cannot fill one global batch of 8"):
        ShardedBatchSampler(7, 4, 0, 2)
