"""Expected attention under DropKey and post-softmax dropout: the public numeric API.

DropKey (docs/theory.md section 1): every key of a row is kept independently with
probability 1 - r, dropped logits go to -inf before the softmax, and there is no
rescaling, so a kept mask b gives w_j = b_j p_j / sum_k b_k p_k. Then

    E[w_j] = c_j p_j,   c_j = (1 - r) E[1 / (p_j + S_-j)],   S_-j = sum_{k != j} b_k p_k.

All-dropped rows (probability r^N') follow one of three conventions
(:mod:`theory.conventions`, default :data:`theory.conventions.DEFAULT`, ``"uniform"``):
``"zero"`` (weights 0), ``"uniform"`` (1/N' on every present key) or
``"undropped"`` (p itself), which add 0, r^N'/N' and r^N' p_j to E[w_j].

Absent keys. A weight p_j = 0 is read as an absent key (a logit at -inf, as with
padding or a causal mask): it never receives weight, so E[w_j] = 0, and N' counts
the present keys only. Its coefficient is defined as the *marginal* coefficient
c_j = (1 - r) E[1/S_-j ; S_-j > 0] (the slope of E[w_j] as p_j grows from 0,
1 at r = 0). The literal limit of c_j as p_j -> 0+ is +inf for r > 0, because
a vanishing key still takes the whole row when it alone is kept; that limit is
not used. With the "uniform" or "undropped" convention, c_j of an absent key is
still that marginal coefficient (the convention adds nothing to a zero weight).

Methods: ``"enumerate"`` sums over all 2^N keep masks (N <= ENUMERATE_MAX_KEYS);
``"integral"`` uses the exact integral representation (any N), evaluated by a
trapezoid on a fixed grid in log t, batched over rows (:mod:`theory.integral`):
its error is below 1e-13 relative on every coefficient (about 1e-14 measured
against mpmath and exact sums, N up to 577, weights down to 1e-300, r from 0.001
to 0.99; benchmarks/results/expected_attention_cpu.md); ``"auto"`` enumerates for
N <= AUTO_ENUMERATE_MAX_KEYS and integrates otherwise.

Shapes and types. Every function accepts one row (N,) or any batch (..., N) (one
row per leading index) and returns p's shape, as float64. A torch tensor p (any
real dtype, any device) is computed on in float64 and comes back as a float64
tensor on p's device (:mod:`theory.tensors`; theory never imports torch).
``drop_ratio == 0`` returns p (or 1, or 0) exactly. Extremes: weights down to the
smallest subnormal and r from 5e-324 to 1 - 2^-53 give finite, exact E[w] and Var[w]
(variances at r < SMALL_DROP_RATIO or r > 1 - SMALL_DROP_RATIO, and coefficients of rows
with a weight below TINY_WEIGHT, from the centred moments of :mod:`theory.centred`, free of
cancellation and of division by subnormals). A coefficient that exceeds float64's range
(c_j ~ (1 - r) r^m / p_j for a weight near 1e-308 and below, or an absent key's E[1/S]
in such a row) is a ValueError naming p, never inf or NaN. Memory: rows are processed in
blocks, so that besides p's float64 copy and the result at most ``workspace_bytes``
(default :data:`theory.integral.MAX_WORKSPACE_BYTES`, 64 MiB) are held at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from theory.centred import SMALL_DROP_RATIO, centred_kept_moments
from theory.checks import check_choice, check_drop_ratio
from theory.conventions import DEFAULT, all_dropped_weights, check_all_dropped
from theory.enumeration import ENUMERATE_MAX_KEYS, enumerated_centred_moments, enumerated_weight_moment
from theory.integral import MAX_WORKSPACE_BYTES, kept_moments, rows_per_block
from theory.tensors import to_numpy
from theory.validation import check_attention_rows, check_workspace_bytes

METHODS = ("auto", "enumerate", "integral")

#: "auto" enumerates up to this many keys (2^10 masks: exact and instant).
AUTO_ENUMERATE_MAX_KEYS = 10

#: Rows with a present weight below this get their coefficients from the centred form
#: (:func:`_tiny_weight_coefficients`): near the subnormal range E[w_j] / p_j loses digits.
TINY_WEIGHT = 1e-290

# (row, key) float64 values the assembly below holds per block: rows, moments of two
# orders, the all-dropped terms and the result, with room to spare.
_ASSEMBLY_VALUES = 8


def _resolve_method(method: object, n_keys: int) -> str:
    method = check_choice(method, "method", METHODS)
    if method == "auto":
        return "enumerate" if n_keys <= AUTO_ENUMERATE_MAX_KEYS else "integral"
    if method == "enumerate" and n_keys > ENUMERATE_MAX_KEYS:
        raise ValueError(
            f"method='enumerate' supports rows of at most {ENUMERATE_MAX_KEYS} keys, "
            f"got N = {n_keys}; use method='integral' or 'auto'"
        )
    return method


@dataclass(frozen=True)
class _Request:
    """A validated call: rows (R, N), how to shape and return results, and the options."""

    rows: np.ndarray
    batch_shape: tuple[int, ...]
    restore: Callable[[np.ndarray], object]
    drop_ratio: float
    all_dropped: str
    method: str
    workspace_bytes: int

    def blockwise(self, compute: Callable[[np.ndarray], np.ndarray]) -> object:
        """Apply ``compute`` to blocks of rows that keep the workspace in budget; shape the result."""
        n_rows, n_keys = self.rows.shape
        result = np.empty_like(self.rows)
        block = rows_per_block(n_keys, self.workspace_bytes // 2, _ASSEMBLY_VALUES)
        for start in range(0, n_rows, block):
            result[start : start + block] = compute(self.rows[start : start + block])
        return self.restore(result.reshape(*self.batch_shape, n_keys))


def _request(p: object, drop_ratio: object, all_dropped: object, method: object, workspace_bytes: object) -> _Request:
    array, restore = to_numpy(p)
    rows, batch_shape = check_attention_rows(array)
    r = check_drop_ratio(drop_ratio)
    convention = check_all_dropped(all_dropped)
    resolved = _resolve_method(method, rows.shape[1])
    budget = check_workspace_bytes(workspace_bytes)
    return _Request(rows, batch_shape, restore, r, convention, resolved,
                    MAX_WORKSPACE_BYTES if budget is None else budget)


def _all_dropped_probability(rows: np.ndarray, drop_ratio: float) -> np.ndarray:
    """r^N' per row, N' = number of present keys; shape (R, 1)."""
    n_present = (rows > 0).sum(axis=1, keepdims=True)
    return np.exp(n_present * math.log(drop_ratio))


def _weight_moments(
    request: _Request, rows: np.ndarray, orders: tuple[int, ...], *, marginal: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """E[w_j^k] for k in ``orders`` under the request's convention, (len(orders), R, N), 0 < r < 1.

    With ``marginal``, also the absent-key coefficient (1 - r) E[1/S ; S > 0] of every
    row with an absent key (NaN elsewhere), shape (R, 1); it always comes from the
    integral method.
    """
    r = request.drop_ratio
    budget = request.workspace_bytes // 2
    coefficient = np.full((rows.shape[0], 1), np.nan)
    if request.method == "enumerate":
        moments = np.stack([enumerated_weight_moment(rows, r, order) for order in orders])
        absent = (rows == 0).any(axis=1)
        if marginal and absent.any():
            found = kept_moments(rows[absent], r, (1,), marginal=True, workspace_bytes=budget).marginal
            coefficient[absent, 0] = (1.0 - r) * found
    else:
        found = kept_moments(rows, r, orders, marginal=marginal, workspace_bytes=budget)
        moments = (1.0 - r) * found.moments
        coefficient[:, 0] = (1.0 - r) * found.marginal
    alone = _all_dropped_probability(rows, r)
    fallback = all_dropped_weights(rows, request.all_dropped, present=rows > 0)  # w_j of an all-dropped row
    for index, order in enumerate(orders):
        moments[index] += alone * fallback**order
    return moments, coefficient


def expected_attention(p: object, drop_ratio: object, *, all_dropped: str = DEFAULT, method: str = "auto",
                       workspace_bytes: int | None = None) -> object:
    """E[w] for attention row(s) p under DropKey with drop ratio r in [0, 1).

    p: (..., N) non-negative weights, each row summing to 1 (within 1e-6), as a numpy
    array, nested lists or a torch tensor. Returns an array of p's shape: float64 numpy,
    or a float64 torch tensor on p's device for a tensor p. ``drop_ratio == 0`` returns
    p exactly. ``workspace_bytes`` bounds the memory held at once besides the input's
    float64 copy and the result (default :data:`theory.integral.MAX_WORKSPACE_BYTES`).

    >>> expected_attention([0.5, 0.5], 0.5, all_dropped="zero").tolist()  # alone w.p. 1/4, both w.p. 1/4
    [0.375, 0.375]
    >>> expected_attention([0.5, 0.5], 0.5).tolist()  # uniform (default): the all-dropped 1/4 adds 1/8 each
    [0.5, 0.5]
    """
    request = _request(p, drop_ratio, all_dropped, method, workspace_bytes)
    if request.drop_ratio == 0.0:
        return request.blockwise(lambda rows: rows)
    return request.blockwise(lambda rows: _weight_moments(request, rows, (1,))[0][0])


def smoothing_coefficients(p: object, drop_ratio: object, *, all_dropped: str = DEFAULT, method: str = "auto",
                           workspace_bytes: int | None = None) -> object:
    """Smoothing coefficients c with E[w] = c * p (see the module doc for p_j = 0).

    Shapes, types and options as :func:`expected_attention`. ``drop_ratio == 0``
    returns ones exactly.
    """
    request = _request(p, drop_ratio, all_dropped, method, workspace_bytes)
    if request.drop_ratio == 0.0:
        return request.blockwise(np.ones_like)

    def coefficients(rows: np.ndarray) -> np.ndarray:
        moments, absent_key = _weight_moments(request, rows, (1,), marginal=True)
        present = rows > 0
        with np.errstate(over="ignore"):  # only rows with tiny weights can overflow; they are redone below
            coefficients = np.divide(moments[0], rows, out=np.zeros_like(rows), where=present)
        tiny = (np.where(present, rows, 1.0) < TINY_WEIGHT).any(axis=1)
        if tiny.any():
            coefficients[tiny] = _tiny_weight_coefficients(request, rows[tiny])
        result = np.where(present, coefficients, absent_key)
        _check_representable(result, rows)
        return result

    return request.blockwise(coefficients)


def _tiny_weight_coefficients(request: _Request, rows: np.ndarray) -> np.ndarray:
    """c_j of the present keys of rows with a weight below TINY_WEIGHT, never dividing by p_j.

    E[w_j] / p_j loses digits where E[w_j] or t p_j is subnormal, so c_j is assembled from
    positive parts: c_j = (1 - r) / T + E[Y_j / p_j ; j kept] + r^N' u_j / p_j
    (Y_j: :mod:`theory.centred`; u_j: the all-dropped weight), the last term in logs.
    Entries beyond float64's range come back +inf.
    """
    r = request.drop_ratio
    if request.method == "enumerate":
        excess = enumerated_centred_moments(rows, r, per_weight=True)[0]
    else:
        excess = centred_kept_moments(rows, r, workspace_bytes=request.workspace_bytes // 2, per_weight=True)[0]
    present = rows > 0
    fallback = all_dropped_weights(rows, request.all_dropped, present=present)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # absent keys: -inf - -inf, unused
        log_alone = present.sum(axis=1, keepdims=True) * math.log(r) + np.log(fallback) - np.log(rows)
        alone = np.where(present & (fallback > 0), np.exp(log_alone), 0.0)
        return (1.0 - r) / rows.sum(axis=1, keepdims=True) + excess + alone


def _check_representable(coefficients: np.ndarray, rows: np.ndarray) -> None:
    """ValueError naming p where a coefficient exceeds float64's range (it is finite in exact arithmetic)."""
    beyond = ~np.isfinite(coefficients)
    if beyond.any():
        row, key = (int(i) for i in np.argwhere(beyond)[0])
        raise ValueError(
            f"p: the smoothing coefficient of key {key} (weight {float(rows[row, key])!r}, in a row whose smallest "
            f"weight is {float(rows[row][rows[row] > 0].min())!r}) exceeds float64's range: c_j grows like "
            f"r^m / p_j for tiny weights and an absent key's like 1 / p_min; expected_attention and "
            f"attention_variance stay finite"
        )


def attention_variance(p: object, drop_ratio: object, *, all_dropped: str = DEFAULT, method: str = "auto",
                       workspace_bytes: int | None = None) -> object:
    """Var[w_j] under DropKey, from the exact second moment E[w_j^2] minus E[w_j]^2.

    Shapes, types and options as :func:`expected_attention`; both moments come from
    one pass of the integral method.
    """
    request = _request(p, drop_ratio, all_dropped, method, workspace_bytes)
    if request.drop_ratio == 0.0:
        return request.blockwise(np.zeros_like)
    if not SMALL_DROP_RATIO <= request.drop_ratio <= 1.0 - SMALL_DROP_RATIO:
        return request.blockwise(lambda rows: _extreme_variance(request, rows))

    def variance(rows: np.ndarray) -> np.ndarray:
        first, second = _weight_moments(request, rows, (1, 2))[0]
        return np.maximum(second - first**2, 0.0)

    return request.blockwise(variance)


def _extreme_variance(request: _Request, rows: np.ndarray) -> np.ndarray:
    """Var[w_j] for r below SMALL_DROP_RATIO or above 1 - SMALL_DROP_RATIO, without cancellation.

    E[w^2] - E[w]^2 is O(1) while the variance is O(r) (or O(1 - r) under the uniform and
    undropped conventions), so it is assembled from non-negative parts instead, conditioning
    on key j's own keep bit (X_j: its weight when kept; given it is dropped, the row's other
    keys are all dropped with probability rho = r^m and j then gets the all-dropped weight u_j):

        Var[w_j] = (1 - r) Var[X_j] + r rho (1 - rho) u_j^2 + r (1 - r) (E[X_j] - rho u_j)^2.

    Var[X_j] is O(r) at small r: it comes from the centred moments (:mod:`theory.centred`);
    near r = 1 its weight 1 - r makes E[X^2] - E[X]^2 exact enough.
    """
    r = request.drop_ratio
    present = rows > 0
    log_rho = (present.sum(axis=1, keepdims=True) - 1) * math.log(r)  # log r^m, m = N' - 1 other keys
    rho = np.exp(log_rho)
    fallback = all_dropped_weights(rows, request.all_dropped, present=present)
    budget = request.workspace_bytes // 2
    if r < SMALL_DROP_RATIO:
        if request.method == "enumerate":
            centred = enumerated_centred_moments(rows, r)
        else:
            centred = centred_kept_moments(rows, r, workspace_bytes=budget)
        kept_mean = rows / rows.sum(axis=1, keepdims=True) + centred[0]
        kept_variance = np.maximum(centred[1] - centred[0] ** 2, 0.0)
    else:
        if request.method == "enumerate":
            kept = np.stack([enumerated_weight_moment(rows, r, order) for order in (1, 2)]) / (1.0 - r)
        else:
            kept = kept_moments(rows, r, (1, 2), workspace_bytes=budget).moments
        kept_mean = kept[0]
        kept_variance = np.maximum(kept[1] - kept[0] ** 2, 0.0)
    alone = log_rho == 0.0  # no other present key: X_j = p_j / p_j = 1 exactly
    kept_mean, kept_variance = np.where(alone, 1.0, kept_mean), np.where(alone, 0.0, kept_variance)
    variance = ((1.0 - r) * kept_variance + r * rho * -np.expm1(log_rho) * fallback**2
                + r * (1.0 - r) * (kept_mean - rho * fallback) ** 2)
    return np.where(present, variance, 0.0)


def dropout_expected_attention(p: object, drop_ratio: object) -> object:
    """E[w] under post-softmax inverted dropout, w_j = b_j p_j / (1 - r): exactly p (c = 1).

    Shapes and types as :func:`expected_attention`.
    """
    return _dropout(p, drop_ratio, lambda rows, r: rows)


def dropout_attention_variance(p: object, drop_ratio: object) -> object:
    """Var[w_j] under post-softmax inverted dropout: r / (1 - r) * p_j^2."""
    return _dropout(p, drop_ratio, lambda rows, r: r / (1.0 - r) * rows**2)


def _dropout(p: object, drop_ratio: object, formula: Callable[[np.ndarray, float], np.ndarray]) -> object:
    array, restore = to_numpy(p)
    rows, batch_shape = check_attention_rows(array)
    r = check_drop_ratio(drop_ratio)
    return restore(formula(rows, r).reshape(*batch_shape, rows.shape[1]))
