"""``dropkey_cross``: DropKey with plus-shaped regions of dropped keys on the patch grid (calibrated rate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dropkey import masks
from dropkey.regularisers.base import Context, GridRegulariser, Tensor, register
from theory.checks import check_int


@register
@dataclass(frozen=True)
class DropKeyCross(GridRegulariser):
    """Per query, seeds on the grid drop a plus of arm ``cross_arm``; the expected fraction of dropped patch
    keys is the drop ratio (:func:`dropkey.masks.cross_keep_mask`)."""

    name: ClassVar[str] = "dropkey_cross"

    cross_arm: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "cross_arm", check_int(self.cross_arm, "cross_arm", 1))

    def keep_mask(self, shape: tuple[int, ...], drop_ratio: float, context: Context) -> Tensor:
        self.check_tokens(shape[-1])
        return masks.cross_keep_mask(
            shape, drop_ratio, grid=self.grid, num_prefix_tokens=self.num_prefix_tokens, arm=self.cross_arm,
            generator=context.generator, device=context.device,
        )
