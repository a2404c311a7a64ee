"""``dropattention``: DropAttention's key dropout, one mask per (batch, head) shared by its queries, renormalised.

Zehui et al., "DropAttention" (2019): drop columns of the attention weights and renormalise each
row, w = b p / sum(b p). As a function of (logits, mask) that is a softmax over the kept keys,
which is how the fast path computes it (equal up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dropkey import masks
from dropkey.reference import HALF, masked_softmax
from dropkey.regularisers.base import AFTER_SOFTMAX, Context, Regulariser, Tensor, register


@register
@dataclass(frozen=True)
class DropAttention(Regulariser):
    """Keys dropped for all queries of a (batch, head) at once; the kept weights renormalised."""

    name: ClassVar[str] = "dropattention"
    acts: ClassVar[str] = AFTER_SOFTMAX

    def keep_mask(self, shape: tuple[int, ...], drop_ratio: float, context: Context) -> Tensor:
        """A (..., 1, Nk) mask: each key of each (batch, head) kept w.p. 1 - r, the same for every query."""
        return masks.dropattention_keep_mask(shape, drop_ratio, generator=context.generator, device=context.device)

    def weights(self, logits: Tensor, keep: Tensor | None, drop_ratio: float, allowed: Tensor | None = None) -> Tensor:
        """``b p / sum(b p)`` with p the softmax (over the ``allowed`` keys); ``all_dropped`` where nothing is kept.

        Computed in float32 for half dtypes.
        """
        assert keep is not None
        work = logits.float() if logits.dtype in HALF else logits
        if allowed is None:
            p = torch.softmax(work, dim=-1)
            present = torch.ones_like(keep)
        else:
            p = masked_softmax(work.masked_fill(~allowed, 0.0), allowed, all_dropped="zero")
            present = allowed
        kept = p * keep
        dead = ~(keep & present).any(dim=-1, keepdim=True)
        if self.all_dropped == "zero":
            fallback = torch.zeros_like(p)
        elif self.all_dropped == "undropped":
            fallback = p
        elif allowed is None:
            fallback = torch.full_like(p, 1.0 / p.shape[-1])
        else:  # uniform over the allowed keys
            fallback = masked_softmax(torch.zeros_like(p), allowed, all_dropped="zero")
        norm = kept.sum(dim=-1, keepdim=True)
        return torch.where(dead, fallback, kept / torch.where(dead, 1.0, norm)).to(logits.dtype)
