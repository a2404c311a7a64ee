"""Exact expected training losses of the toy (:mod:`simulations.toy_optimisation`) and its gradient noise.

The toy's loss L = 1/2 ||sum_j w_j v_j - y||^2 with training weights w from
:func:`simulations.toy_optimisation.training_weights`, averaged over the keep masks
b (each key kept independently with probability 1 - r):

- :func:`enumerated_expected_loss`: the definition, summing all 2^N masks times their
  probabilities (DropKey's all-dropped row gets weights 1/N, the "uniform" convention);
- :func:`expected_loss`: the same numbers in the form gradient descent uses: for dropout
  the closed form L(sum_j p_j v_j) + 1/2 r/(1-r) sum_j p_j^2 ||v_j||^2, for DropKey the
  enumeration written as a few matrix products;
- :func:`dropout_free_values_minimum`: dropout's minimum over the values, the same for every p;
- :func:`gradient_noise`: the variance (trace) of the per-mask logit gradient over probe masks.

Tensors are float64 torch, batched over problems: logits (B, N), values (B, N, d), target (B, d).
Used by :mod:`simulations.toy_regimes`.
"""

from __future__ import annotations

import functools

import torch

from simulations.toy_optimisation import training_gradients, training_weights
from theory.checks import check_choice, check_drop_ratio, check_int
from theory.enumeration import all_keep_masks

#: Largest N the enumeration accepts here (2^N masks per problem).
MAX_KEYS = 12
#: The regularisers these expectations are defined for.
REGULARISERS = ("none", "dropkey", "dropout")


def _check(regulariser: object, drop_ratio: object, logits: torch.Tensor) -> None:
    """ValueError naming the argument: a known regulariser, r in (0, 1), 2 <= N <= MAX_KEYS."""
    check_choice(regulariser, "regulariser", REGULARISERS)
    check_drop_ratio(drop_ratio, allow_zero=False)
    check_int(logits.shape[-1], "logits.shape[-1] (N)", 2, MAX_KEYS)


@functools.lru_cache(maxsize=32)
def mask_table(n_keys: int, drop_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All 2^N keep masks (M, N) bool (mask 0 keeps nothing) and their probabilities (M,) float64."""
    keep = torch.from_numpy(all_keep_masks(n_keys))
    kept = keep.sum(-1).to(torch.float64)
    return keep, (1.0 - drop_ratio) ** kept * drop_ratio ** (n_keys - kept)


def enumerated_weights(regulariser: str, logits: torch.Tensor, drop_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training weights under every keep mask: (B, M, N), with the masks' probabilities (M,).

    The reference definition (via :func:`simulations.toy_optimisation.training_weights`);
    differentiable in ``logits`` (B, N).
    """
    _check(regulariser, drop_ratio, logits)
    keep, probability = mask_table(logits.shape[-1], drop_ratio)
    shape = (logits.shape[0],) + tuple(keep.shape)
    weights = training_weights(regulariser, logits[:, None, :].expand(shape), keep.expand(shape), drop_ratio)
    return weights, probability


def enumerated_expected_loss(
    regulariser: str, logits: torch.Tensor, values: torch.Tensor, target: torch.Tensor, drop_ratio: float
) -> torch.Tensor:
    """E[L] per problem (B,) by summing the loss of every keep mask times its probability."""
    weights, probability = enumerated_weights(regulariser, logits, drop_ratio)
    outputs = torch.einsum("bmn,bnd->bmd", weights, values)
    return 0.5 * ((outputs - target[:, None, :]) ** 2).sum(-1) @ probability


def clean_loss(logits: torch.Tensor, values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L(p) = 1/2 ||sum_j p_j v_j - y||^2 per problem (B,)."""
    output = torch.einsum("bn,bnd->bd", torch.softmax(logits, -1), values)
    return 0.5 * ((output - target) ** 2).sum(-1)


@functools.lru_cache(maxsize=32)
def _dropkey_tables(n_keys: int, drop_ratio: float) -> tuple[torch.Tensor, ...]:
    """Masks that keep a key (M-1, N) as floats, their key pairs j <= k (M-1, P) (2 b_j b_k for j < k,
    b_j for j = k), the pairs' indices (2, P), the masks' probabilities (M-1,) and P(all dropped)."""
    keep, probability = mask_table(n_keys, drop_ratio)
    kept = keep[1:].to(torch.float64)
    rows, cols = torch.triu_indices(n_keys, n_keys)
    pairs = kept[:, rows] * kept[:, cols] * torch.where(rows == cols, 1.0, 2.0).to(torch.float64)
    return kept, pairs, torch.stack([rows, cols]), probability[1:], probability[0]


def _dropkey_expected_loss(logits: torch.Tensor, values: torch.Tensor, target: torch.Tensor, r: float) -> torch.Tensor:
    """The enumerated DropKey E[L] (uniform convention) as a few matrix products: (B,).

    With e = exp(s - max s), a mask b with z = b.e > 0 gives output (b * e) V / z, so its loss is
    1/2 (b^T (e e^T * V V^T) b) / z^2 - (b . (e * V y)) / z + 1/2 ||y||^2 (the quadratic form
    summed over pairs j <= k).
    """
    kept, pairs, index, probability, all_dropped_probability = _dropkey_tables(logits.shape[-1], r)
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    gram = (e[:, :, None] * e[:, None, :] * (values @ values.transpose(1, 2)))[:, index[0], index[1]]
    inverse = 1.0 / (e @ kept.T)  # 1 / z per problem and mask
    linear = (e * torch.einsum("bnd,bd->bn", values, target)) @ kept.T
    per_mask = (0.5 * (gram @ pairs.T) * inverse - linear) * inverse + 0.5 * (target**2).sum(-1, keepdim=True)
    all_dropped = 0.5 * ((values.mean(1) - target) ** 2).sum(-1)  # weights 1/N
    return (per_mask * probability).sum(-1) + all_dropped_probability * all_dropped


def expected_loss(
    regulariser: str, logits: torch.Tensor, values: torch.Tensor, target: torch.Tensor, drop_ratio: float
) -> torch.Tensor:
    """The exact expected training loss per problem (B,) that the exact regimes descend.

    none: L(p); dropout: L(p) + 1/2 r/(1-r) sum_j p_j^2 ||v_j||^2; dropkey: the sum over all
    masks (equal to :func:`enumerated_expected_loss`, computed faster).
    """
    _check(regulariser, drop_ratio, logits)
    if regulariser == "dropkey":
        return _dropkey_expected_loss(logits, values, target, drop_ratio)
    loss = clean_loss(logits, values, target)
    if regulariser == "dropout":
        p = torch.softmax(logits, -1)
        loss = loss + 0.5 * drop_ratio / (1.0 - drop_ratio) * (p**2 * (values**2).sum(-1)).sum(-1)
    return loss


def dropout_free_values_minimum(drop_ratio: float, n_keys: int, target_norm: float) -> float:
    """min over the values of dropout's exact E[L], the same for every p: M^2 k / (2 (N + k)), k = r / (1 - r).

    With a_j = p_j v_j, E[L] = 1/2 ||sum_j a_j - y||^2 + k/2 sum_j ||a_j||^2 is minimised by
    a_j = y / (N + k), i.e. v_j = y / ((N + k) p_j), whatever p (interior) is.
    """
    k = drop_ratio / (1.0 - drop_ratio)
    return target_norm**2 * k / (2.0 * (n_keys + k))


def gradient_noise(
    regulariser: str, logits: torch.Tensor, values: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, r: float
) -> torch.Tensor:
    """sum_k ||g_k - mean_k g_k||^2 / (K - 1) per problem (B,), g_k the logit gradient under mask k.

    keep: (K, B, N) probe masks, K >= 2. An unbiased estimate of tr Cov(g) over masks.
    """
    _check(regulariser, r, logits)
    if keep.dim() != 3 or keep.shape[0] < 2 or keep.shape[1:] != logits.shape:
        raise ValueError(
            f"keep must have shape (K >= 2, B, N) with (B, N) = {tuple(logits.shape)}, got {tuple(keep.shape)}"
        )
    k, b, n = keep.shape
    grad, _ = training_gradients(
        regulariser, logits.repeat(k, 1), values.repeat(k, 1, 1), target.repeat(k, 1), keep.reshape(k * b, n), r
    )
    grad = grad.reshape(k, b, n)
    return ((grad - grad.mean(0)) ** 2).sum((0, 2)) / (k - 1)
