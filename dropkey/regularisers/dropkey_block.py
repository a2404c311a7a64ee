"""``dropkey_block``: DropKey with square windows of dropped keys on the patch grid (calibrated rate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dropkey import masks
from dropkey.regularisers.base import Context, GridRegulariser, Tensor, register
from theory.checks import check_int


@register
@dataclass(frozen=True)
class DropKeyBlock(GridRegulariser):
    """Per query, seeds on the grid drop ``block_side`` x ``block_side`` windows; the expected fraction of
    dropped patch keys is the drop ratio (:func:`dropkey.masks.block_keep_mask`)."""

    name: ClassVar[str] = "dropkey_block"

    block_side: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "block_side", check_int(self.block_side, "block_side", 1))

    def keep_mask(self, shape: tuple[int, ...], drop_ratio: float, context: Context) -> Tensor:
        self.check_tokens(shape[-1])
        return masks.block_keep_mask(
            shape, drop_ratio, grid=self.grid, num_prefix_tokens=self.num_prefix_tokens, side=self.block_side,
            generator=context.generator, device=context.device,
        )
