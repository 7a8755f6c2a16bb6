"""The protocol of a run's checkpointed parts (data positions, loop hooks, counters): low in the
layers so data and hooks implement it without importing the checkpointer that saves them."""
from __future__ import annotations


class Stateful:
    """A part of a run that a checkpoint carries. ``state_dict`` is the same on every rank and is
    saved once; ``rank_state_dict`` is this rank's own (a data stream's cursor, a ZeRO partition's
    fp32 shadow) and is saved per rank. The defaults hold nothing, so a part implements only the
    scope it has. A rank file that is missing at load (another world size) gives ``{}``."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state_dict(self) -> dict:
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass
