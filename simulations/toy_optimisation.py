"""The paper's toy objective (docs/theory.md section 3), optimised for thousands of problems at once.

Each problem: minimise L = 1/2 || sum_j w_j v_j - y ||^2 jointly over logits s
(p = softmax(s)) and values v_j in R^d by gradient descent, with y = M e,
||e|| = 1. All problems are one batch of float64 torch tensors (CPU); every
regulariser starts from the same initial problems (paired comparison).

Regularisers (w is the weight vector used in the training loss):
- ``none``: w = p.
- ``dropkey``: keys masked before the softmax with drop ratio r (logit -> -inf,
  no rescale); an all-dropped row gets uniform weights 1/N (the "uniform"
  convention, what the official code gives in fp32).
- ``dropout``: post-softmax inverted dropout, w_j = b_j p_j / (1 - r).
- ``dropattention``: DropAttention-style key dropping after the softmax with
  renormalisation, w = b p / sum(b p) (uniform if all dropped). With one query
  per problem this is the same function of (s, b) as DropKey, so with the same
  masks it gives the same trajectory up to rounding; it is run on DropKey's mask
  stream to show exactly that (``dropattention_max_abs_diff`` in the summary).

Masks for a drop ratio come from one SeedSequence child shared by all
regularisers at that ratio (common random numbers).

Recorded at ``n_records`` steps (0, then geometrically spaced), per problem, on the clean objective
(p = softmax(s)): loss, peak weight max_j p_j, entropy of p, the top two keys
s, t (by p), beta_j = v_j . e, the three terms of Eq. 11,
(sum p beta)(beta_s - beta_t), (sum p alpha).(alpha_s - alpha_t) and
-M (beta_s - beta_t), the beta-gradients p_j (sum p beta - M) of s and t, and
the change of beta_s - beta_t and of the logit gap s_s - s_t over the next
recording interval (for the same pair). These test each link of the
rich-get-richer chain (see :func:`summarise`).

At the final step the expected training loss under DropKey and under dropout
(at the run's r) is split as E[L] = L(E[o]) + 1/2 tr Cov(o):
- dropout: E[o] = sum p v, 1/2 tr Cov(o) = 1/2 r/(1-r) sum p_j^2 ||v_j||^2 (exact;
  masks are independent so there are no cross terms);
- DropKey: E[o] = sum E[w_j] v_j and the diagonal part 1/2 sum Var(w_j) ||v_j||^2
  are exact (theory.expected_attention / theory.attention_variance, uniform
  convention); the cross part 1/2 sum_{j != k} Cov(w_j, w_k) v_j . v_k is not
  given by the theory and is estimated by Monte-Carlo (with its SE).
These columns are NaN at every other step and for ``none``.

Tidy output: one row per (regulariser, drop_ratio, problem, step). The columns and the
summary are in :mod:`simulations.toy_results` (re-exported here).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import theory
from dropkey import regularisers
from simulations.common import concat_frames, frame_from_columns
from simulations.registry import Study
from simulations.toy_results import (
    COLUMNS,
    FINAL_COLUMNS,
    KEY_COLUMNS,
    TRAJECTORY_COLUMNS,
    far_from_optimum,
    final_differences,
    headline,
    link_fractions_by_problem,
    summarise,
)
from theory.checks import check_choice, check_drop_ratio, check_int, check_real, check_seed, check_tuple
from theory.seeding import child_sequences, generator, integer_seed

log = logging.getLogger(__name__)

#: The question this study answers and how (the first paragraphs of its report page).
QUESTION = (
    "In the paper's toy objective (Eq. 5), does attention follow the rich-get-richer chain of Eqs. 5-11 "
    "without a regulariser, and does DropKey end with lower attention peaks?"
)
METHOD = (
    "Hundreds of toy problems (logits and values learned by gradient descent) start from the same initial"
    " points under no regulariser, DropKey, post-softmax dropout and DropAttention at several drop "
    "ratios; each link of the chain is recorded along the way, and the final peak weights are compared "
    "problem by problem."
)

REGULARISERS = ("none", "dropkey", "dropout", "dropattention")


@dataclass(frozen=True)
class ToyOptimisationConfig:
    """Sizes and hyper-parameters of the toy optimisation.

    n_problems (>= 2), n_keys N (>= 2), dim d (>= 2): batch and problem sizes.
    steps (>= 1): gradient steps.  n_records (in [2, steps + 1]): recorded steps,
    step 0 plus geometrically spaced steps up to ``steps`` (early steps, where the
    rich-get-richer loop acts, are resolved one by one; see :func:`record_steps`).
    learning_rate in (0, 10]: step size for the values; logit_lr_multiplier in
    (0, 1000]: the logits' step size is learning_rate times this (a time-scale
    separation: with 1 the values solve each problem before attention moves).
    drop_ratios in (0, 1); regularisers from REGULARISERS ('none' runs once).
    target_norm M in (0, 100]; logit_init_std in [0, 10]; value_init_std in [0, 10].
    covariance_samples (>= 2): masks for the Monte-Carlo cross-covariance term.
    far_fraction in (0, 1]: a record is 'far from the optimum' when sum p beta < far_fraction * M.
    """

    n_problems: int = 1000
    n_keys: int = 8
    dim: int = 4
    steps: int = 1500
    n_records: int = 40
    learning_rate: float = 0.5
    logit_lr_multiplier: float = 20.0
    drop_ratios: tuple[float, ...] = (0.1, 0.3, 0.5)
    regularisers: tuple[str, ...] = REGULARISERS
    target_norm: float = 1.0
    logit_init_std: float = 0.1
    value_init_std: float = 0.1
    covariance_samples: int = 2000
    far_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.n_problems, "n_problems", 2)
        check_int(self.n_keys, "n_keys", 2, 1024)
        check_int(self.dim, "dim", 2, 4096)
        check_int(self.steps, "steps", 1)
        check_int(self.n_records, "n_records", 2, self.steps + 1)
        check_real(self.learning_rate, "learning_rate", 0.0, 10.0, low_open=True)
        check_real(self.logit_lr_multiplier, "logit_lr_multiplier", 0.0, 1000.0, low_open=True)
        check_tuple(self.drop_ratios, "drop_ratios", lambda v, n: check_drop_ratio(v, n, allow_zero=False))
        check_tuple(self.regularisers, "regularisers", lambda v, n: check_choice(v, n, REGULARISERS))
        check_real(self.target_norm, "target_norm", 0.0, 100.0, low_open=True)
        check_real(self.logit_init_std, "logit_init_std", 0.0, 10.0)
        check_real(self.value_init_std, "value_init_std", 0.0, 10.0)
        check_int(self.covariance_samples, "covariance_samples", 2)
        check_real(self.far_fraction, "far_fraction", 0.0, 1.0, low_open=True)
        check_seed(self.seed)

    @classmethod
    def quick(cls) -> ToyOptimisationConfig:
        """512 problems, 400 steps: a few seconds."""
        return cls(n_problems=512, steps=400, n_records=30, covariance_samples=1000)

    @classmethod
    def full(cls) -> ToyOptimisationConfig:
        """1000 problems, 1500 steps, 40 records (about a minute; results.csv ~130 MB)."""
        return cls()


def record_steps(steps: int, n_records: int) -> np.ndarray:
    """Step 0 and about ``n_records - 1`` geometrically spaced steps in [1, steps] (ends included).

    Integer steps are deduplicated and, where geometric spacing would skip small
    steps, the grid is filled from 1 upward, so exactly ``n_records`` distinct
    steps are returned.
    """
    chosen = {0, steps}
    count = n_records - 1
    while len(chosen) < n_records:
        grid = np.unique(np.round(np.geomspace(1, steps, count)).astype(int))
        chosen = {0, steps} | set(grid.tolist())
        count += 1
    ordered = sorted(chosen)
    # Keep 0, the final step and the earliest of the rest so that exactly n_records remain.
    return np.array(ordered[: n_records - 1] + [steps]) if ordered[-1] == steps else np.array(ordered)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Small batched tensors run fastest (and most reproducibly) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _initial_problem(config: ToyOptimisationConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets y (B, d) with ||y|| = M, logits (B, N), values (B, N, d), from the 'init' child."""
    rng = generator(child_sequences(config.seed, 3)[0])
    b, n, d = config.n_problems, config.n_keys, config.dim
    direction = rng.normal(size=(b, d))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    logits = config.logit_init_std * rng.normal(size=(b, n))
    values = config.value_init_std * rng.normal(size=(b, n, d))
    as_tensor = lambda array: torch.tensor(array, dtype=torch.float64)  # noqa: E731
    return as_tensor(config.target_norm * direction), as_tensor(logits), as_tensor(values)


def training_weights(
    regulariser: str, logits: torch.Tensor, keep: torch.Tensor | None, drop_ratio: float
) -> torch.Tensor:
    """The weights w used in the training loss for a regulariser (differentiable in logits): the library's
    registered regulariser of that name (:mod:`dropkey.regularisers`, default all-dropped convention)."""
    return regularisers.create(regulariser).weights(logits, keep, drop_ratio)


def training_gradients(
    regulariser: str,
    logits: torch.Tensor,
    values: torch.Tensor,
    target: torch.Tensor,
    keep: torch.Tensor | None,
    drop_ratio: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the summed training loss 1/2 sum_b ||sum_j w_j v_j - y_b||^2 for one mask per problem.

    logits (B, N), values (B, N, d), target (B, d), keep (B, N) or None for 'none'.
    Returns (d/dlogits (B, N), d/dvalues (B, N, d)); problems do not interact, so
    row b of each is problem b's own gradient. The inputs are not modified.
    """
    logits = logits.detach().requires_grad_(True)
    values = values.detach().requires_grad_(True)
    weights = training_weights(regulariser, logits, keep, drop_ratio)
    output = torch.einsum("bn,bnd->bd", weights, values)
    loss = 0.5 * ((output - target) ** 2).sum()
    grad_logits, grad_values = torch.autograd.grad(loss, (logits, values))
    return grad_logits, grad_values


def _snapshot(
    logits: torch.Tensor, values: torch.Tensor, target: torch.Tensor, m: float
) -> dict[str, np.ndarray]:
    """Clean-objective diagnostics of one recorded step, as numpy arrays of shape (B,)."""
    p = torch.softmax(logits, dim=-1)
    e = target / m
    beta = torch.einsum("bnd,bd->bn", values, e)
    alpha = values - beta[..., None] * e[:, None, :]
    output = torch.einsum("bn,bnd->bd", p, values)
    loss = 0.5 * ((output - target) ** 2).sum(-1)
    top2 = torch.topk(p, 2, dim=-1).indices
    s_idx, t_idx = top2[:, 0:1], top2[:, 1:2]

    def take(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.gather(x, 1, s_idx)[:, 0], torch.gather(x, 1, t_idx)[:, 0]

    p_s, p_t = take(p)
    beta_s, beta_t = take(beta)
    logit_s, logit_t = take(logits)
    alpha_s = torch.gather(alpha, 1, s_idx[..., None].expand(-1, 1, alpha.shape[-1]))[:, 0]
    alpha_t = torch.gather(alpha, 1, t_idx[..., None].expand(-1, 1, alpha.shape[-1]))[:, 0]
    sum_p_beta = (p * beta).sum(-1)
    sum_p_alpha = torch.einsum("bn,bnd->bd", p, alpha)
    beta_gap = beta_s - beta_t
    term_mean = sum_p_beta * beta_gap
    term_alpha = (sum_p_alpha * (alpha_s - alpha_t)).sum(-1)
    term_target = -m * beta_gap
    log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    columns = {
        "loss": loss,
        "peak_weight": p.max(-1).values,
        "entropy": -(p * log_p).sum(-1),
        "top_key": s_idx[:, 0],
        "second_key": t_idx[:, 0],
        "p_top": p_s,
        "p_second": p_t,
        "beta_top": beta_s,
        "beta_second": beta_t,
        "sum_p_beta_minus_m": sum_p_beta - m,
        "grad_beta_top": p_s * (sum_p_beta - m),
        "grad_beta_second": p_t * (sum_p_beta - m),
        "eq11_mean_term": term_mean,
        "eq11_alpha_term": term_alpha,
        "eq11_target_term": term_target,
        "eq11_total": term_mean + term_alpha + term_target,
        "logit_gap": logit_s - logit_t,
        "value_spread": (values - target[:, None, :]).norm(dim=-1).mean(-1),
    }
    return {name: value.numpy().copy() for name, value in columns.items()}


def _pair_gaps(
    logits: torch.Tensor, values: torch.Tensor, e: torch.Tensor, pair: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """beta_s - beta_t and s_s - s_t for a fixed pair of key indices per problem."""
    beta = torch.einsum("bnd,bd->bn", values, e).numpy()
    rows = np.arange(beta.shape[0])
    s, t = pair
    return beta[rows, s] - beta[rows, t], logits.numpy()[rows, s] - logits.numpy()[rows, t]


def expected_loss_parts(
    p: np.ndarray,
    values: np.ndarray,
    target: np.ndarray,
    drop_ratio: float,
    *,
    num_samples: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """E[L] = L(E[o]) + 1/2 tr Cov(o) under DropKey (uniform) and dropout, per problem (B,).

    DropKey: mean term and diagonal variance exact (theory); cross-covariance by
    Monte-Carlo over ``num_samples`` masks, with the SE of its estimate.
    """
    expected = theory.expected_attention(p, drop_ratio, all_dropped="uniform")
    variance = theory.attention_variance(p, drop_ratio, all_dropped="uniform")
    norms2 = (values**2).sum(-1)  # (B, N)
    mean_output = np.einsum("bn,bnd->bd", expected, values)
    dropkey_mean = 0.5 * ((mean_output - target) ** 2).sum(-1)
    dropkey_diagonal = 0.5 * (variance * norms2).sum(-1)
    # Cross terms: 1/2 sum_{j != k} Cov(w_j, w_k) v_j.v_k = 1/2 (||o - E o||^2 - sum_j (w_j - E w_j)^2 ||v_j||^2),
    # averaged over masks; each sample's bracket is unbiased for the cross part (E[w] is exact).
    batch, n = p.shape
    cross_sum = np.zeros(batch)
    cross_sq = np.zeros(batch)
    chunk = max(1, 2_000_000 // max(batch * n, 1))
    for start in range(0, num_samples, chunk):
        size = min(chunk, num_samples - start)
        kept = rng.random((size, batch, n)) >= drop_ratio
        kept_weight = kept * p
        norm = kept_weight.sum(-1, keepdims=True)
        weights = np.where(norm > 0, kept_weight / np.where(norm > 0, norm, 1.0), 1.0 / n)
        centred = weights - expected
        deviation = np.einsum("sbn,bnd->sbd", centred, values)
        bracket = 0.5 * ((deviation**2).sum(-1) - (centred**2 * norms2).sum(-1))
        cross_sum += bracket.sum(0)
        cross_sq += (bracket**2).sum(0)
    cross = cross_sum / num_samples
    cross_var = np.maximum(cross_sq / num_samples - cross**2, 0.0) * num_samples / (num_samples - 1)
    dropout_mean = 0.5 * ((np.einsum("bn,bnd->bd", p, values) - target) ** 2).sum(-1)
    dropout_variance = 0.5 * drop_ratio / (1.0 - drop_ratio) * (p**2 * norms2).sum(-1)
    return {
        "dropkey_mean_term": dropkey_mean,
        "dropkey_variance_diagonal": dropkey_diagonal,
        "dropkey_variance_cross": cross,
        "dropkey_variance_cross_se": np.sqrt(cross_var / num_samples),
        "dropkey_expected_loss": dropkey_mean + dropkey_diagonal + cross,
        "dropout_mean_term": dropout_mean,
        "dropout_variance": dropout_variance,
        "dropout_expected_loss": dropout_mean + dropout_variance,
    }


def _train(
    config: ToyOptimisationConfig,
    regulariser: str,
    drop_ratio: float,
    masks_sequence: np.random.SeedSequence | None,
    covariance_sequence: np.random.SeedSequence,
    progress: bool,
) -> pd.DataFrame:
    """Train every problem under one regulariser; return its trajectory rows."""
    target, logits, values = _initial_problem(config)
    m = config.target_norm
    e = target / m
    mask_generator = torch.Generator()
    if masks_sequence is not None:
        mask_generator.manual_seed(integer_seed(masks_sequence))
    b, n = logits.shape
    lr_values = config.learning_rate
    lr_logits = config.learning_rate * config.logit_lr_multiplier
    records: list[dict[str, np.ndarray]] = []
    steps_recorded: list[int] = []
    pair: tuple[np.ndarray, np.ndarray] | None = None
    pair_gaps: tuple[np.ndarray, np.ndarray] | None = None
    to_record = set(record_steps(config.steps, config.n_records).tolist())
    label = f"{regulariser} r={drop_ratio:g}"
    for step in tqdm(range(config.steps + 1), desc=label, disable=not progress, leave=False):
        if step in to_record:
            with torch.no_grad():
                snapshot = _snapshot(logits, values, target, m)
                if pair is not None and pair_gaps is not None:
                    beta_gap, logit_gap = _pair_gaps(logits, values, e, pair)
                    records[-1]["next_beta_gap_change"] = beta_gap - pair_gaps[0]
                    records[-1]["next_logit_gap_change"] = logit_gap - pair_gaps[1]
                pair = (snapshot["top_key"], snapshot["second_key"])
                pair_gaps = (
                    snapshot["beta_top"] - snapshot["beta_second"],
                    snapshot["logit_gap"],
                )
                snapshot["next_beta_gap_change"] = np.full(b, np.nan)
                snapshot["next_logit_gap_change"] = np.full(b, np.nan)
                records.append(snapshot)
                steps_recorded.append(step)
        if step == config.steps:
            break
        keep = None
        if regulariser != "none":
            keep = torch.rand((b, n), generator=mask_generator, dtype=torch.float64) >= drop_ratio
        grad_logits, grad_values = training_gradients(regulariser, logits, values, target, keep, drop_ratio)
        with torch.no_grad():
            logits = (logits - lr_logits * grad_logits).detach()
            values = (values - lr_values * grad_values).detach()
    frames = []
    for step, record in zip(steps_recorded, records, strict=True):
        columns = {
            "regulariser": np.full(b, regulariser, dtype=object),
            "drop_ratio": np.full(b, drop_ratio),
            "problem": np.arange(b),
            "step": np.full(b, step),
        }
        columns.update({name: record[name] for name in TRAJECTORY_COLUMNS})
        if step == config.steps and regulariser != "none":
            with torch.no_grad():
                p = torch.softmax(logits, dim=-1).numpy()
            parts = expected_loss_parts(
                p,
                values.numpy(),
                target.numpy(),
                drop_ratio,
                num_samples=config.covariance_samples,
                rng=generator(covariance_sequence),
            )
            columns.update(parts)
        else:
            columns.update({name: np.full(b, np.nan) for name in FINAL_COLUMNS})
        frames.append(frame_from_columns(columns))
    return concat_frames(frames)


def run(config: ToyOptimisationConfig, *, progress: bool = False) -> pd.DataFrame:
    """Trajectories of every problem under every regulariser (see the module docstring)."""
    _, masks_root, covariance_root = child_sequences(config.seed, 3)
    mask_children = masks_root.spawn(len(config.drop_ratios))
    covariance_children = covariance_root.spawn(len(config.drop_ratios))
    runs: list[tuple[str, float, np.random.SeedSequence | None, np.random.SeedSequence]] = []
    for regulariser in config.regularisers:
        if regulariser == "none":
            runs.append(("none", 0.0, None, covariance_children[0]))
            continue
        for index, r in enumerate(config.drop_ratios):
            # dropattention deliberately shares DropKey's masks (see the module docstring).
            runs.append((regulariser, r, mask_children[index], covariance_children[index]))
    frames = []
    with _single_thread():
        for regulariser, r, masks, covariance in tqdm(runs, desc="toy_optimisation", disable=not progress):
            frames.append(_train(config, regulariser, r, masks, covariance, progress))
            log.debug("trained %s r=%g", regulariser, r)
    frame = concat_frames(frames)
    frame.attrs["far_fraction"] = config.far_fraction
    frame.attrs["target_norm"] = config.target_norm
    return frame


STUDY = Study(
    name="toy_optimisation",
    title="The paper's toy objective, optimised",
    config_class=ToyOptimisationConfig,
    run=run,
    summarise=summarise,
    question=QUESTION,
    method=METHOD,
    page="simulations.pages.toy_optimisation",
    headline=headline,
    rank=30,
)


__all__ = [
    "COLUMNS",
    "FINAL_COLUMNS",
    "KEY_COLUMNS",
    "REGULARISERS",
    "STUDY",
    "TRAJECTORY_COLUMNS",
    "ToyOptimisationConfig",
    "expected_loss_parts",
    "far_from_optimum",
    "final_differences",
    "link_fractions_by_problem",
    "record_steps",
    "run",
    "summarise",
    "training_gradients",
    "training_weights",
]
