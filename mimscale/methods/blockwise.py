"""BEiT's block-wise masking: the worked example of adding a method (docs/architecture.md)."""
from __future__ import annotations

from dataclasses import dataclass

from mimscale.errors import ConfigError
from mimscale.masking.blockwise import BlockwiseMasking
from mimscale.methods.base import Method
from mimscale.methods.mae import reconstruction_flops


@dataclass
class BlockwiseConfig:
    min_block: int = 4  # patches in the smallest block (BEiT: 16 at 14 x 14)
    max_aspect: float = 3.0  # blocks' aspect ratio in [1/a, a]


def check_blockwise(cfg, selected: bool) -> None:
    b = cfg.masking.blockwise
    if b.min_block < 1:
        raise ConfigError(f"config key 'masking.blockwise.min_block' = {b.min_block} must be >= 1")
    if b.max_aspect < 1:
        raise ConfigError(f"config key 'masking.blockwise.max_aspect' = {b.max_aspect} must be >= 1")


ENTRIES = (
    Method("blockwise", section=("blockwise", BlockwiseConfig), check=check_blockwise, flops=reconstruction_flops,
           masker=lambda cfg, enc: BlockwiseMasking(enc.grid, cfg.masking.mask_ratio, cfg.masking.blockwise.min_block,
                                                    cfg.masking.blockwise.max_aspect)),
)
