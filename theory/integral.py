"""Exact moments of DropKey attention weights from the integral representation, batched.

Representation (checked symbolically in :mod:`theory.derivations`). For a kept key j
with weight p_j, let S = sum_{i != j} b_i p_i over the other *present* keys
(p_i > 0), m of them, each kept with probability 1 - r. Using
1/x^k = 1/(k-1)! * integral_0^inf t^(k-1) e^(-t x) dt and independence,

    M_k(j) = E[(p_j / (p_j + S))^k] = 1/(k-1)! integral_0^inf (t p_j)^k e^(-t p_j) G_j(t) dt / t,
    G_j(t) = E[e^(-t S)] = prod_{i != j} f_i(t),   f_i(t) = r + (1 - r) e^(-t p_i),

so that E[w_j^k] = (1 - r) M_k(j) (zero convention) and c_j = (1 - r) M_1(j) / p_j.
M_k(j) is the k-th moment of w_j given that key j is kept: between 0 and 1, and at
least max(r^m, p_j^k). An absent key (p_j = 0) has the marginal coefficient
c_j = (1 - r) E[1/S ; S > 0] = (1 - r) integral_0^inf (G(t) - r^m) dt, G = prod_i f_i.

Numerics (design and measurements in docs/theory_numerics.md). With t = e^u every
integrand is an entire function of u that grows like e^(k u) as u -> -inf and decays
double-exponentially once t p_j is large, so the trapezoidal rule on a uniform u-grid
converges geometrically: its error is about 2 |Gamma(k + 2 pi i / h)| / (k-1)!
relative, 1.2e-14 for first moments at the step h = STEP = 0.28 (second moments use
SECOND_MOMENT_STEP = 0.22: 3e-17). The grid is fixed in advance, per row:

- it starts at u = LOWER_U = -2; the infinitely many nodes below are summed in closed
  form from the Taylor expansion (8 terms, :mod:`theory.left_tail`) of the integrand at t = 0;
  the row sums to 1, so the expansion's coefficients are O(1/n!) for every row and
  what it leaves out is below 1e-15 relative;
- it ends where the right tail is provably below TAIL_TOLERANCE relative to M_k(j),
  at t = X / p_min with X ~ 36 for ViT-like rows (a bound in the row's r, m, p_min);
- every node costs one pass over the row, shared by all N keys: G_j = G / f_j with
  G = exp(sum_i log f_i), so a row costs N x T exponentials and logarithms (T ~ 70
  nodes for ViT rows), and the sum over nodes is one matrix product;
- keys are sorted by decreasing weight, and each piece of 16 nodes skips the keys whose
  factor is r and whose own terms are negligible from its first node on (_death_u).

Each estimate is checked at no extra cost against the trapezoid on every other node
(step 2h): the trapezoid's error at h is about the square of its error at 2h, so rows
whose two estimates differ by more than CHECK_TOLERANCE (none among ViT-like rows, whose
difference is at most 3e-7) are recomputed with the step halved, up to MAX_HALVINGS times.

Rows are processed in blocks whose workspace stays under a byte budget
(MAX_WORKSPACE_BYTES unless the caller passes another), and within a block in
cache-sized chunks of rows with similar grids.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from theory.left_tail import LeftTails

log = logging.getLogger(__name__)

#: Trapezoid step in u = log t: its error is about 2 |Gamma(k + 2 pi i / h)| / (k-1)! relative,
#: 1.2e-14 for first moments (k = 1) at STEP.
STEP = 0.28
#: The step when second moments (k = 2) are wanted: 3e-17 for them, so that variances
#: E[w^2] - E[w]^2 are right to a few ulps of E[w]^2 (0.24, 1e-15, was not enough for that).
SECOND_MOMENT_STEP = 0.22
#: First node of the grid, u = log t; the nodes below are summed in closed form.
LOWER_U = -2.0
#: The right tail beyond the grid is below this, relative to the moment it belongs to.
TAIL_TOLERANCE = 1e-17
#: Largest accepted relative difference between the estimates at steps h and 2h.
CHECK_TOLERANCE = 1e-5
#: Step halvings tried for rows that fail the check (never needed by ViT-like rows).
MAX_HALVINGS = 3
#: Default bound on the bytes of workspace held at once, beyond the float64 copy of the
#: input rows and the results (each rows x keys x 8 bytes).
MAX_WORKSPACE_BYTES = 64 * 2**20

# t p is clipped at _CLIP before exp: an underflowing or subnormal exp is 10-100x slower
# than a normal one. e^(-700) stands in for 0, which changes nothing at float64
# precision when r p_min^k >= _CLIP_SAFE (see _needs_exact_zeros); other rows zero the
# clipped entries explicitly.
_CLIP = 700.0
_CLIP_SAFE = 1e-280
# Moments smaller than this are not compared by the step check (absolute error below
# 1e-290: only keys whose weight^k is that small, e.g. second moments of weights < 1e-145).
_CHECK_FLOOR = 1e-280
# Entries of one (rows x nodes x keys) chunk: 512 KiB per float64 buffer, cache-sized.
_CHUNK_ENTRIES = 1 << 16
# Largest u = log t used as is; beyond (weights below ~1e-280) t p is formed as (t / 2^b) (p 2^b).
_MAX_U = 650.0
# Nodes per piece of a chunk: a piece skips the keys that are negligible from its first node.
_PIECE_NODES = 16
# Float64 buffers of chunk size held at once: -x (then W_2), y (then log f), W_1, and the
# absent-key marginal's log1p terms.
_CHUNK_BUFFERS = 4
# Float64 values held at once per (row, key) of a block: the sorted rows and key order,
# the key death times, estimates at two steps for two orders and their reordered copies,
# the left tails' powers of p (9) and results, with room to spare.
_PER_ENTRY_VALUES = 32


@dataclass(frozen=True)
class KeptMoments:
    """Results of :func:`kept_moments` for R rows of N keys.

    moments: (len(orders), R, N), M_k(j) = E[(p_j / (p_j + S))^k], 0 for absent keys.
    marginal: (R,), E[1/S ; S > 0] over the present keys (what an absent key's
    coefficient is made of) for rows with an absent key when requested, else NaN.
    """

    moments: np.ndarray
    marginal: np.ndarray


def kept_moments(
    rows: np.ndarray,
    drop_ratio: float,
    orders: tuple[int, ...] = (1,),
    *,
    marginal: bool = False,
    workspace_bytes: int | None = None,
) -> KeptMoments:
    """M_k(j) for every key of every row and order k in ``orders`` (1 and/or 2).

    rows: (R, N) float64, validated attention rows; 0 < drop_ratio < 1. With
    ``marginal``, also E[1/S ; S > 0] for every row that has an absent key.
    ``workspace_bytes`` bounds the memory held at once (default MAX_WORKSPACE_BYTES).
    """
    if not 0.0 < drop_ratio < 1.0:
        raise ValueError(f"kept_moments needs 0 < drop_ratio < 1, got {drop_ratio!r}")
    if not set(orders) <= {1, 2} or not orders:
        raise ValueError(f"orders must be a non-empty subset of (1, 2), got {orders!r}")
    budget = MAX_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    n_rows, n_keys = rows.shape
    moments = np.zeros((len(orders), n_rows, n_keys))
    marginals = np.full(n_rows, np.nan)
    block = rows_per_block(n_keys, budget - 8 * _CHUNK_BUFFERS * _chunk_entries(n_keys, budget), _PER_ENTRY_VALUES)
    for start in range(0, n_rows, block):
        stop = min(n_rows, start + block)
        _Block(rows[start:stop], drop_ratio, orders, marginal, budget).solve(
            moments[:, start:stop], marginals[start:stop]
        )
    return KeptMoments(moments, marginals)


def rows_per_block(n_keys: int, budget: int, values_per_entry: int) -> int:
    """Rows whose ``values_per_entry`` float64 values per key fit in ``budget`` bytes (at least 1)."""
    return max(1, budget // (8 * values_per_entry * n_keys))


def _chunk_entries(n_keys: int, budget: int) -> int:
    """Entries of one chunk buffer: cache-sized, within a quarter of the budget, at least one node."""
    return max(n_keys, min(_CHUNK_ENTRIES, budget // (8 * _CHUNK_BUFFERS * 4)))


class _Block:
    """One block of rows: their grids, the chunked trapezoid sums and the closed-form left tails."""

    def __init__(self, rows: np.ndarray, r: float, orders: tuple[int, ...], marginal: bool, budget: int):
        self.rows = rows
        self.r = r
        self.orders = orders
        self.present = rows > 0
        self.n_present = self.present.sum(axis=1)
        absent_rows = self.n_present < rows.shape[1]
        self.marginal_rows = absent_rows if marginal else np.zeros(rows.shape[0], dtype=bool)
        self.p_min = np.where(self.present, rows, np.inf).min(axis=1)
        self.chunk_entries = _chunk_entries(rows.shape[1], budget)
        self.log_r = math.log(r)
        self.log_keep = math.log1p(-r)
        upper = np.max([self._tail_x(order) for order in orders], axis=0)
        if self.marginal_rows.any():
            upper = np.where(self.marginal_rows, np.maximum(upper, self._marginal_tail_x()), upper)
        self.log_upper_t = np.log(upper) - np.log(self.p_min)  # no overflow for subnormal p_min
        # e^(-700) may stand in for a smaller exp(-t p) unless r p_min^k is tiny (see _CLIP).
        self.exact_zeros = r * self.p_min ** max(orders) < _CLIP_SAFE

    def _tail_x(self, order: int) -> np.ndarray:
        """X with tail <= TAIL_TOLERANCE * M_k(j) for every key j, per row.

        Beyond t = X / p_min the tail of key j is at most G_j(T) Gamma(k, X) / (k-1)!, with
        G_j(T) <= (r + (1 - r) e^-X)^m, and M_k(j) >= max(p_min^k, r^m); solved for X by
        a few fixed-point steps from X = 36.
        """
        m = self.n_present - 1
        floor = np.maximum(order * np.log(self.p_min), m * self.log_r)
        x = np.full(self.rows.shape[0], 36.0)
        for _ in range(4):
            log_tail = m * np.logaddexp(self.log_r, self.log_keep - x) + (order - 1) * np.log1p(x) - x
            x = x + np.maximum(log_tail - floor - math.log(TAIL_TOLERANCE), 0.0)
        return x

    def _marginal_tail_x(self) -> np.ndarray:
        """X for E[1/S ; S > 0]: its tail is at most m (1-r) (r + (1-r) e^-X)^(m-1) e^-X / p_min,
        and E[1/S ; S > 0] >= 1 - r^m."""
        m = self.n_present
        floor = np.log(-np.expm1(m * self.log_r)) - np.log(m)
        x = np.full(self.rows.shape[0], 36.0)
        for _ in range(4):
            log_tail = (m - 1) * np.logaddexp(self.log_r, self.log_keep - x) - x - np.log(self.p_min)
            x = x + np.maximum(log_tail - floor - math.log(TAIL_TOLERANCE), 0.0)
        return x

    def solve(self, moments_out: np.ndarray, marginal_out: np.ndarray) -> None:
        """Fill moments_out (orders, R, N) and marginal_out (R,) for this block."""
        pending = np.arange(self.rows.shape[0])
        step = STEP if max(self.orders) == 1 else SECOND_MOMENT_STEP
        for _ in range(MAX_HALVINGS + 1):
            fine, coarse, marginal_fine, marginal_coarse = self._estimates(pending, step)
            moments_out[:, pending] = fine
            marginal_out[pending] = np.where(self.marginal_rows[pending], marginal_fine, np.nan)
            # Relative change; moments below _CHECK_FLOOR (absent keys: 0) are not checked.
            row_change = (np.abs(fine - coarse) / np.maximum(fine, _CHECK_FLOOR)).max(axis=(0, 2))
            with np.errstate(invalid="ignore"):  # NaN / NaN for rows without a marginal: unused; inf - inf
                marginal_change = np.abs(marginal_fine - marginal_coarse) / marginal_fine  # (beyond float64): NaN
            row_change = np.where(self.marginal_rows[pending], np.maximum(row_change, marginal_change), row_change)
            failed = row_change > CHECK_TOLERANCE
            if not failed.any():
                return
            log.debug("%d rows changed by up to %.2g between steps %g and %g; halving the step",
                      failed.sum(), row_change.max(), 2 * step, step)
            pending, step = pending[failed], step / 2
        raise RuntimeError(
            f"integral method: {pending.size} rows still differ by more than {CHECK_TOLERANCE:g} between "
            f"steps {4 * step:g} and {2 * step:g} after {MAX_HALVINGS} halvings; please report these rows"
        )

    def _estimates(self, which: np.ndarray, step: float) -> tuple[np.ndarray, ...]:
        """Moments (orders, R, N) and marginals (R,) of the rows ``which`` at steps h and 2h."""
        counts = np.ceil((self.log_upper_t[which] - LOWER_U) / step).astype(np.int64) + 1
        with_marginal = self.marginal_rows[which]
        # Rows with marginals first, then by node count, so that chunks share one grid;
        # keys by decreasing weight, so that the keys a node can skip come first.
        order = np.lexsort((counts, ~with_marginal))
        rows, counts, with_marginal = which[order], counts[order], with_marginal[order]
        key_order = np.argsort(-self.rows[rows], axis=1)
        p = np.take_along_axis(self.rows[rows], key_order, axis=1)
        death_u = self._death_u(p)
        sums = np.zeros((len(self.orders), 2, *p.shape))
        marginals = np.zeros((2, p.shape[0]))
        size = min(self.chunk_entries, int(counts.max()) * p.size)
        buffers = [np.empty(size) for _ in range(_CHUNK_BUFFERS if with_marginal.any() else _CHUNK_BUFFERS - 1)]
        for start, stop in self._chunks(counts, with_marginal, p.shape[1]):
            self._add_nodes(
                p[start:stop],
                int(counts[stop - 1]),
                step,
                bool(self.exact_zeros[rows[start:stop]].any()),
                p[start:stop] > 0 if with_marginal[start] else None,
                None if with_marginal[start] else death_u[start:stop],
                sums[:, :, start:stop],
                marginals[:, start:stop],
                buffers,
            )
        self._add_left_tails(p, step, sums, marginals, with_marginal)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        unsorted = np.empty_like(sums)
        np.put_along_axis(unsorted, np.broadcast_to(key_order, sums.shape), sums, axis=-1)
        return unsorted[:, 0][:, inverse], unsorted[:, 1][:, inverse], marginals[0][inverse], marginals[1][inverse]

    def _death_u(self, p: np.ndarray) -> np.ndarray:
        """log t beyond which key j can be skipped: f_j taken as r and W_j as 0, per (row, key).

        Skipped at t >= X_j / p_j, with X_j large enough that (a) every skipped factor
        changes log G by at most q e^-X_j, q = (1 - r) / r, N of them below 1e-17 in all,
        and (b) the skipped terms of key j's own moment, at most (h / r) X^k e^-X with
        G_j <= 1 and f_j >= r, stay below 1e-17 p_j^k <= 1e-17 M_k(j). +inf for absent keys.
        """
        k = max(self.orders)
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
        factors = math.log(p.shape[1]) + self.log_keep - self.log_r - math.log(1e-17)
        own = math.log(STEP) - self.log_r - math.log(1e-17) - k * log_p
        x = np.maximum(factors, own + k * math.log(50.0))
        for _ in range(2):
            x = np.maximum(factors, own + k * np.log(x))
        return np.where(p > 0, np.log(x) - log_p, np.inf)

    def _chunks(self, counts: np.ndarray, with_marginal: np.ndarray, n_keys: int):
        """(start, stop) of consecutive sorted rows, chunk_entries per _PIECE_NODES nodes, one kind of row."""
        start, n_rows = 0, counts.size
        while start < n_rows:
            nodes = min(_PIECE_NODES, int(counts[start]))
            stop = min(n_rows, start + max(1, self.chunk_entries // (nodes * n_keys)))
            if with_marginal[start] != with_marginal[stop - 1]:
                stop = start + int(np.argmin(with_marginal[start:stop]))
            yield start, stop
            start = stop

    def _add_nodes(self, p, n_nodes, step, exact_zeros, present, death_u, sums, marginals, buffers) -> None:
        """Add the trapezoid terms of nodes 0..n_nodes-1 (steps h and 2h) for rows p (R, N).

        p: rows with keys by decreasing weight. sums: (orders, 2, R, N) and marginals: (2, R),
        added to in place; ``present`` is the rows' present-key mask when their marginal is
        wanted, else None; ``death_u`` (R, N) the log t from which each key may be skipped
        (None: skip none). Nodes go in pieces; a piece skips the keys every row may skip at
        its first node (a prefix, as keys are sorted).
        """
        n_rows, n_keys = p.shape
        per_piece = max(1, self.chunk_entries // (n_rows * n_keys))
        for first in range(0, n_nodes, per_piece):
            nodes = np.arange(first, min(n_nodes, first + per_piece))
            u = LOWER_U + step * nodes
            skipped = 0 if death_u is None else int((death_u <= u[0]).sum(axis=1).min())
            live = p[:, skipped:]
            shape = (n_rows, nodes.size, n_keys - skipped)
            neg_x, y, weighted = (buffer[: math.prod(shape)].reshape(shape) for buffer in buffers[:3])
            if u[-1] > _MAX_U:  # t would overflow (subnormal weights): (t / 2^b) (p 2^b) instead
                bits = math.ceil((u[-1] - _MAX_U) / math.log(2.0))
                np.einsum("t,rn->rtn", -np.exp(u - bits * math.log(2.0)), np.ldexp(live, bits), out=neg_x)
            else:
                np.einsum("t,rn->rtn", -np.exp(u), live, out=neg_x)  # -t p
            np.maximum(neg_x, -_CLIP, out=neg_x)
            np.exp(neg_x, out=y)
            if exact_zeros:
                np.copyto(y, 0.0, where=neg_x <= -_CLIP)
            if present is not None:
                log_excess = self._log_excess(neg_x, y, present, buffers[3][: y.size].reshape(shape))
            np.multiply(neg_x, y, out=weighted)  # -x y
            y *= 1.0 - self.r
            y += self.r  # f = r + (1 - r) y
            weighted /= y  # -x y / f = -W_1
            np.log(y, out=y)
            log_g = y.sum(axis=2) + skipped * self.log_r  # (R, T): log G, G the product of every factor
            with np.errstate(under="ignore"):
                node_weights = step * np.exp(log_g)
            even = nodes % 2 == 0
            columns = np.zeros((n_rows, 2, nodes.size))
            columns[:, 0] = node_weights
            columns[:, 1, even] = 2.0 * node_weights[:, even]
            for index, order in enumerate(self.orders):
                if order == 1:
                    sums[index, :, :, skipped:] -= np.matmul(columns, weighted).transpose(1, 0, 2)
                else:
                    np.multiply(weighted, neg_x, out=neg_x)  # x^2 y / f = W_2
                    sums[index, :, :, skipped:] += np.matmul(columns, neg_x).transpose(1, 0, 2)
            if present is not None:
                with np.errstate(under="ignore", over="ignore"):  # +inf: E[1/S] beyond float64
                    terms = np.exp(log_g + u + log_excess)  # t (G - r^m)
                    marginals[0] += step * terms.sum(axis=1)
                    marginals[1] += 2.0 * step * terms[:, even].sum(axis=1)

    def _log_excess(self, neg_x: np.ndarray, y: np.ndarray, present: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """log(1 - r^m / G) per (row, node), from A = log(G / r^m) = sum_present log1p(q y_i).

        log1p(q y) is formed as logaddexp(0, log q - x): q = (1 - r) / r overflows for r < 1e-308.
        """
        np.add(neg_x, self.log_keep - self.log_r, out=scratch)
        np.logaddexp(0.0, scratch, out=scratch)
        np.copyto(scratch, 0.0, where=(y == 0.0) | ~present[:, None, :])  # exact zeros, absent keys
        with np.errstate(divide="ignore"):  # A = 0 only where G = r^m: that term is 0
            return np.log(-np.expm1(-scratch.sum(axis=2)))

    def _add_left_tails(self, p, step, sums, marginals, with_marginal) -> None:
        """Add the nodes below LOWER_U, summed in closed form (:mod:`theory.left_tail`)."""
        tails = LeftTails(p, self.r)
        for index, order in enumerate(self.orders):
            sums[index] += tails.moments(LOWER_U, (step, 2.0 * step), order)
        for level, level_step in enumerate((step, 2.0 * step)):
            if with_marginal.any():
                marginals[level] += np.where(with_marginal, tails.marginal(LOWER_U, level_step), 0.0)
