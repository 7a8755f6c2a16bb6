"""The epoch order every indexed loader follows (the folder/synthetic DataLoader and FFCV).

Each epoch is a permutation seeded by (seed, epoch), cut into equal per-rank shares (the tail that
does not divide evenly is dropped for the epoch); rank r takes every world-th element from
position r. A stream that starts at micro-batch m yields exactly what an uninterrupted stream
yields after its first m batches, so a resumed run continues mid-epoch.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler):
    """Endless stream of this rank's batches of (epoch, index) keys, starting at micro-batch
    ``start``. Epoch e is a permutation seeded by (seed, e), truncated to a multiple of the world size;
    rank r takes every world-th element from position r."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0, shuffle: bool = True):
        self.n = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.start = start
        self.shuffle = shuffle
        self.per_rank = num_samples // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{num_samples} samples cannot fill one batch of {batch_size} on each of {world_size} ranks"
            )

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """[num_samples // world] int64: this rank's global indices in ``epoch``, in order."""
        if self.shuffle:
            # (seed, epoch) hashed together: seed 1 must not replay seed 0's order one epoch late
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        return perm[: self.per_rank * self.world][self.rank :: self.world]

    def position(self, micro_batch: int) -> tuple[int, int]:
        """(epoch, batch within epoch) of the stream's micro-batch number ``micro_batch``."""
        return divmod(micro_batch, self.batches_per_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, b = self.position(self.start)
        while True:
            idx = self.epoch_indices(epoch).tolist()
            for j in range(b, self.batches_per_epoch):
                chunk = idx[j * self.batch_size : (j + 1) * self.batch_size]
                yield [(epoch, i) for i in chunk]
            epoch, b = epoch + 1, 0

    def __len__(self) -> int:  # one epoch; the stream itself is endless
        return self.batches_per_epoch
