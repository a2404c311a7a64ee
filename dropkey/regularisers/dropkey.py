"""``dropkey``: DropKey (Li et al., CVPR 2023), every logit dropped independently before the softmax, no rescale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dropkey import functional, masks
from dropkey.regularisers.base import Context, Regulariser, Tensor, register


@register
@dataclass(frozen=True)
class DropKey(Regulariser):
    """Keys dropped independently per (batch, head, query) before the softmax; the softmax renormalises.

    The fast path is :func:`~dropkey.functional.dropkey_attention` (the fused kernels); its mask is
    the hash mask where that path resolves to the ``triton`` or ``cpp`` backend, else Bernoulli.
    """

    name: ClassVar[str] = "dropkey"

    def keep_mask(self, shape: tuple[int, ...], drop_ratio: float, context: Context) -> Tensor:
        """The mask the fast path draws for inputs of ``context.dtype`` on ``context.device`` (hash or Bernoulli)."""
        device = torch.device("cpu") if context.device is None else torch.device(context.device)
        if functional.resolve_backend(context.backend, device, context.dtype)[1] == "hash":
            from dropkey.kernels import hash_drop_mask, hash_seed_tensor

            seed = hash_seed_tensor(context.generator)
            return hash_drop_mask(seed, shape, drop_ratio, device=device).logical_not_()
        return masks.dropkey_keep_mask(shape, drop_ratio, generator=context.generator, device=device)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, drop_ratio: float, context: Context) -> Tensor:
        return functional.dropkey_attention(
            q, k, v, drop_ratio, training=True, all_dropped=self.all_dropped, generator=context.generator,
            backend=context.backend, scale=context.scale,
        )
