"""The baselines DropKey is compared with: timm's post-softmax attention dropout and the paper's own code.

Both materialise the N x N weights (they are references, not fast paths). Re-exported by
:mod:`dropkey.functional`, where most code imports them from.
"""

from __future__ import annotations

from typing import Optional

import torch

from dropkey.masks import GeneratorLike, bernoulli_drop_mask, resolve_generator, validate_drop_ratio
from dropkey.reference import (
    check_qkv,
    check_scale,
    check_training,
    masked_softmax,
    reference_attention_output,
    reference_logits,
)

__all__ = ["paper_dropkey_attention", "post_softmax_dropout_attention"]


def post_softmax_dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop_ratio: float,
    *,
    training: bool = True,
    generator: GeneratorLike = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """timm's ``attn_drop``: inverted dropout on the softmax weights, (..., Nq, dv).

    ``w = softmax(q k^T * scale)``; in training each weight is zeroed w.p.
    ``drop_ratio`` and the survivors divided by ``1 - drop_ratio`` (so E[w] is the
    plain softmax); then ``w @ v``. Eval or ``drop_ratio == 0``: the reference plain
    attention (bit-identical to ``plain_attention(..., backend="reference")``).
    The mask is :func:`dropkey.masks.dropkey_keep_mask` of the same generator.
    """
    check_qkv(q, k, v)
    r = validate_drop_ratio(drop_ratio)
    training = check_training(training)
    scale_value = check_scale(scale, q)
    weights = masked_softmax(reference_logits(q, k, scale_value), None)
    if not training or r == 0.0:
        return reference_attention_output(weights, v)
    gen = resolve_generator(generator, q.device)
    drop = bernoulli_drop_mask(tuple(weights.shape), r, generator=gen, device=q.device)
    weights = (weights / (1.0 - r)).masked_fill(drop, 0.0)
    return reference_attention_output(weights, v)


def paper_dropkey_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop_ratio: float,
    *,
    generator: GeneratorLike = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The paper's two-line code, verbatim, for comparison only (NaN in float16!).

    ``attn = q k^T * scale; attn = attn + bernoulli(ones_like(attn) * r) * -1e12;
    softmax; @ v``. Materialises an N x N float mask; all-dropped rows are left to
    float accident (uniform in fp32/bf16, NaN in fp16).
    """
    check_qkv(q, k, v)
    r = validate_drop_ratio(drop_ratio)
    scale_value = check_scale(scale, q)
    gen = resolve_generator(generator, q.device)
    attn = (q @ k.transpose(-2, -1)) * scale_value
    attn = attn + torch.bernoulli(torch.ones_like(attn) * r, generator=gen) * -1e12
    return attn.softmax(dim=-1) @ v
