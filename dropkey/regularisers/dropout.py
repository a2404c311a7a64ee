"""``dropout``: timm's ``attn_drop``, inverted dropout on the softmax weights, w = b p / (1 - r)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dropkey import functional, masks
from dropkey.regularisers.base import AFTER_SOFTMAX, Context, Regulariser, Tensor, register


@register
@dataclass(frozen=True)
class Dropout(Regulariser):
    """Each weight of each (batch, head, query) row dropped independently after the softmax; survivors / (1 - r).

    E[w] is the plain softmax p (no first-moment smoothing; docs/theory.md section 2).
    """

    name: ClassVar[str] = "dropout"
    acts: ClassVar[str] = AFTER_SOFTMAX
    rescales: ClassVar[bool] = True

    def keep_mask(self, shape: tuple[int, ...], drop_ratio: float, context: Context) -> Tensor:
        """An independent Bernoulli mask of ``shape`` (the fast path draws the same one)."""
        return masks.dropkey_keep_mask(shape, drop_ratio, generator=context.generator, device=context.device)

    def weights(self, logits: Tensor, keep: Tensor | None, drop_ratio: float, allowed: Tensor | None = None) -> Tensor:
        """``softmax(logits) / (1 - r)`` with the dropped weights zeroed (``allowed`` is in the logits already)."""
        assert keep is not None
        return (logits.softmax(dim=-1) / (1.0 - drop_ratio)).masked_fill(~keep, 0.0)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, drop_ratio: float, context: Context) -> Tensor:
        return functional.post_softmax_dropout_attention(
            q, k, v, drop_ratio, training=True, generator=context.generator, scale=context.scale
        )
