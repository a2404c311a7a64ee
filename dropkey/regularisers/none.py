"""``none``: plain attention, no regulariser (its drop ratio must be 0)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dropkey.reference import masked_softmax
from dropkey.regularisers.base import Regulariser, Tensor, register


@register
@dataclass(frozen=True)
class NoRegulariser(Regulariser):
    """Plain softmax attention in training too."""

    name: ClassVar[str] = "none"
    has_rate: ClassVar[bool] = False

    def weights(self, logits: Tensor, keep: Tensor | None, drop_ratio: float, allowed: Tensor | None = None) -> Tensor:
        """The plain softmax (``keep`` and ``allowed`` are ignored)."""
        return masked_softmax(logits, None)
