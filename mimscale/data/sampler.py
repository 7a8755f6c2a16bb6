"""The epoch order every indexed loader follows (the folder/synthetic DataLoader and FFCV).

Each epoch is a permutation seeded by (seed, epoch), cut into global batches of G = micro batch x
accumulation x world samples (the tail that does not fill one is dropped for the epoch). Global
batch k is dealt in chunks of one micro batch: chunk c = j * world + r goes to rank r as its
micro step j. A global batch therefore holds the same samples on any number of ranks (1 rank with
accumulation 2 or 2 ranks with 1: the same 2 chunks), which together with crops keyed by
(seed, epoch, index) and masks keyed by position (masking/noise.py) makes a step's batch a
function of the recipe alone. A stream that starts at micro-batch m yields exactly what an
uninterrupted stream yields after its first m batches, so a resumed run continues mid-epoch.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler):
    """Endless stream of this rank's micro batches of (epoch, index) keys, starting at micro-batch
    ``start``, dealt from global batches of ``batch_size x accumulation x world_size`` samples."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0,
                 shuffle: bool = True, accumulation: int = 1):
        self.n = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.start = start
        self.shuffle = shuffle
        self.accumulation = accumulation
        self.global_batch = batch_size * accumulation * world_size
        self.global_per_epoch = num_samples // self.global_batch
        self.batches_per_epoch = self.global_per_epoch * accumulation  # this rank's micro batches
        if self.global_per_epoch < 1:
            raise ValueError(
                f"{num_samples} samples cannot fill one global batch of {self.global_batch} "
                f"(micro batch {batch_size} x accumulation {accumulation} x {world_size} ranks)"
            )

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """[batches_per_epoch * batch_size] int64: this rank's global indices in ``epoch``, in the order of its micro batches."""
        if self.shuffle:
            # (seed, epoch) hashed together: seed 1 must not replay seed 0's order one epoch late
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        dealt = perm[: self.global_per_epoch * self.global_batch].view(self.global_per_epoch, self.accumulation, self.world, self.batch_size)
        return dealt[:, :, self.rank].reshape(-1)

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
