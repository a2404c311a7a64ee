"""Toy regimes: where DropKey smooths the toy's attention more than post-softmax dropout, and where less.

The toy of :mod:`simulations.toy_optimisation` (minimise L = 1/2 ||sum_j w_j v_j - y||^2
over logits s, p = softmax(s), and values v_j) is run in three regimes, each under
the regularisers none, dropkey and dropout from the same initial problems (paired
by problem), at every drop ratio r of the config:

- ``free_sampled``: the toy's own setting. Logits and values are learned by
  gradient descent with one sampled mask per problem and step; DropKey and
  dropout at a given r draw the same masks (common random numbers, the toy's mask
  stream, so at the toy's settings and sizes the trajectories are the toy's, bit for bit).
  The logits' step size is ``learning_rate`` times each ``logit_lr_multipliers``.
- ``fixed_exact``: values v_j = c + offset w, c ~ N(0, fixed_value_std^2 I), w a random
  unit vector (one per problem, shared by every offset in ``fixed_value_offsets``), are
  fixed; the logits are learned by deterministic gradient descent on the EXACT expected
  training loss: DropKey by summing over all 2^N keep masks (an all-dropped row gets
  weights 1/N, the "uniform" convention), dropout by its closed form
  E[L] = L(sum p v) + 1/2 r/(1-r) sum_j p_j^2 ||v_j||^2. The step is
  ``fixed_learning_rate`` / mean_j ||v_j||^2 per problem (the objective scales with the
  values' squared size). Two targets: y = sum_j lambda_j v_j with lambda ~ Dirichlet(alpha)
  (``inside`` the values' hull: some p fits y exactly) and y = (max_j v_j.u + outside_margin) u
  for a random unit u (``outside``: at least outside_margin from the hull). The offset
  matters because DropKey's objective depends on the values only through their differences
  (moving values and target together changes nothing), dropout's penalty on ||v_j||^2,
  i.e. on their distance from the origin. The logit/value step ratio is infinite (values
  never move): ``logit_lr_multiplier`` is inf there; ``value_offset`` is 0 in the
  free-values regimes (their initial values are centred at the origin).
- ``free_exact``: logits and values learned on the exact expected loss (step sizes
  as in free_sampled), from free_sampled's initial problems.

Measured at every checkpoint, per problem, on the clean objective (p = softmax(s)):
``peak`` max_j p_j, ``entropy`` of p (nats), ``clean_loss`` L(p), ``expected_loss``
the exact expected training loss of the row's regulariser (enumerated; for none,
L(p)), ``expected_grad_norm`` ||d E[L] / ds||, ``grad_noise`` the trace of the
covariance of the per-mask logit gradient, estimated from ``probe_masks`` masks
(the same masks for every regulariser; 0 for none, which has no masks), and
``value_spread`` mean_j ||v_j - y||. ``none`` does not depend on r: it is run once
and its rows are repeated under every r, so that every cell holds all three.

The exact expectations and the gradient noise are computed in :mod:`simulations.toy_exact`.

Tidy output: one row per (cell, regulariser, problem); a cell is a value of
:data:`CELL_COLUMNS`. :func:`peak_differences` gives the paired differences
peak(dropout) - peak(DropKey) per cell (positive: DropKey smooths more).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm import tqdm

from simulations.common import check_tidy, concat_frames, frame_from_columns
from simulations.registry import Study
from simulations.toy_exact import (
    MAX_KEYS,
    clean_loss,
    dropout_free_values_minimum,
    enumerated_expected_loss,
    expected_loss,
    gradient_noise,
)
from simulations.toy_optimisation import (
    ToyOptimisationConfig,
    _initial_problem,
    _single_thread,
    training_gradients,
)
from theory.checks import check_choice, check_drop_ratio, check_int, check_real, check_seed, check_tuple
from theory.conventions import entropy
from theory.seeding import child_sequences, generator, integer_seed

log = logging.getLogger(__name__)

#: regime -> (values, objective)
REGIMES = {"free_sampled": ("free", "sampled"), "fixed_exact": ("fixed", "exact"), "free_exact": ("free", "exact")}
REGULARISERS = ("none", "dropkey", "dropout")
TARGETS = ("inside", "outside")
CELL_COLUMNS = (
    "regime",
    "values",
    "target",
    "objective",
    "value_offset",
    "logit_lr_multiplier",
    "drop_ratio",
    "step",
)
KEY_COLUMNS = CELL_COLUMNS + ("regulariser", "problem")
MEASURE_COLUMNS = (
    "peak",
    "entropy",
    "clean_loss",
    "expected_loss",
    "expected_grad_norm",
    "grad_noise",
    "value_spread",
)
COLUMNS = KEY_COLUMNS + MEASURE_COLUMNS

QUESTION = (
    "Does DropKey smooth the toy's attention more than post-softmax dropout, and in which settings? "
    "The toy's own comparison (values learned, one sampled mask per step) finds dropout smoothing more. "
    "This map varies what that result could depend on: the training length, the logits' step size "
    "relative to the values', learned or fixed values, the sampled loss or its exact expectation, and, "
    "with fixed values, whether the target is reachable (inside the values' convex hull) and how far "
    "the values sit from the origin."
)
METHOD = (
    "Every cell trains the same initial problems (N = 8 keys, d = 4) under no regulariser, DropKey and "
    "dropout at the same drop ratio r, and compares the attention p = softmax(s) problem by problem: "
    "the paired difference peak(dropout) - peak(DropKey) of max_j p_j (positive where DropKey smooths "
    "more), with its mean, standard error and 95% t interval over problems. Sampled-mask runs draw one "
    "mask per problem and step, the same for DropKey and dropout; exact runs descend the expected "
    "training loss itself, enumerating all 2^N masks for DropKey (weights 1/N when all are dropped) and "
    "using the closed form L(sum_j p_j v_j) + 1/2 r/(1-r) sum_j p_j^2 ||v_j||^2 for dropout. Each run "
    "is measured after several training lengths: peak, entropy, clean and exact expected loss, the "
    "expected loss's logit gradient, and the variance of the per-mask logit gradient over probe masks "
    "shared by the regularisers."
)
EXPLANATION = (
    "With learned values neither exact objective prefers any p at its optimum: DropKey's expected loss "
    "is 0 at v_j = y for every p (every mask's output is then y), and dropout's is M^2 k / (2(N + k)), "
    "k = r/(1-r), at v_j = y / ((N + k) p_j) for every p; the exact-loss runs approach these minima. "
    "The final p is therefore set by the path: dropout's optimum for a peaked p needs large values on "
    "the small keys, so when the logits move faster than the values descent flattens p instead, while "
    "DropKey's optimum does not depend on p and p keeps the peak the rich-get-richer loop gave it. The "
    "gap opens on the exact loss too, earlier than with sampled masks, so it is not an effect of the "
    "sampling noise. That noise differs all the same: at DropKey's optimum every mask's gradient is "
    "zero, so its gradient noise vanishes and its logits freeze, whereas dropout's per-mask output "
    "y sum_j b_j p_j / (1-r) is not y, so its gradient noise stays where its expected gradient is near "
    "zero. With fixed values DropKey's objective depends on the values only through their differences, "
    "dropout's penalty on their distance from the origin: with values centred on the origin the two "
    "end close, with small differences of either sign (DropKey is marginally ahead only with the target "
    "outside the hull at the smaller r), and offsetting the values makes dropout smooth more, inside "
    "or outside the hull."
)


def _increasing_steps(values: object, name: str) -> tuple[int, ...]:
    steps = check_tuple(values, name, lambda v, n: check_int(v, n, 1, 100_000))
    if list(steps) != sorted(steps):
        raise ValueError(f"{name} must be increasing, got {values!r}")
    return steps


@dataclass(frozen=True)
class ToyRegimesConfig:
    """Sizes and hyper-parameters of the regime map.

    n_problems (>= 2), n_keys N in [2, 12] (2^N masks are enumerated), dim d >= 2.
    checkpoints: increasing steps in [1, 100000] at which every run is measured; the
    last is the training length. drop_ratios in (0, 1); logit_lr_multipliers in
    (0, 1000] (free-values regimes); regimes from REGIMES.
    learning_rate in (0, 10]: the values' step (free values); fixed_learning_rate in
    (0, 10]: the logits' step with fixed values, divided by mean_j ||v_j||^2 per problem.
    target_norm M, logit_init_std, value_init_std: free-values problems as in the toy.
    fixed_value_std in (0, 10], fixed_value_offsets in [0, 100], dirichlet_alpha in
    (0, 100], outside_margin in (0, 10]: fixed-values problems.
    probe_masks (>= 2): masks per measurement for the gradient noise.
    """

    n_problems: int = 500
    n_keys: int = 8
    dim: int = 4
    checkpoints: tuple[int, ...] = (50, 200, 1500)
    drop_ratios: tuple[float, ...] = (0.1, 0.3)
    logit_lr_multipliers: tuple[float, ...] = (1.0, 20.0)
    regimes: tuple[str, ...] = tuple(REGIMES)
    learning_rate: float = 0.5
    fixed_learning_rate: float = 2.0
    target_norm: float = 1.0
    logit_init_std: float = 0.1
    value_init_std: float = 0.1
    fixed_value_std: float = 1.0
    fixed_value_offsets: tuple[float, ...] = (0.0, 2.0)
    dirichlet_alpha: float = 1.0
    outside_margin: float = 0.5
    probe_masks: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.n_problems, "n_problems", 2)
        check_int(self.n_keys, "n_keys", 2, MAX_KEYS)
        check_int(self.dim, "dim", 2, 4096)
        _increasing_steps(self.checkpoints, "checkpoints")
        check_tuple(self.drop_ratios, "drop_ratios", lambda v, n: check_drop_ratio(v, n, allow_zero=False))
        check_tuple(
            self.logit_lr_multipliers,
            "logit_lr_multipliers",
            lambda v, n: check_real(v, n, 0.0, 1000.0, low_open=True),
        )
        check_tuple(self.regimes, "regimes", lambda v, n: check_choice(v, n, tuple(REGIMES)))
        check_real(self.learning_rate, "learning_rate", 0.0, 10.0, low_open=True)
        check_real(self.fixed_learning_rate, "fixed_learning_rate", 0.0, 10.0, low_open=True)
        check_real(self.target_norm, "target_norm", 0.0, 100.0, low_open=True)
        check_real(self.logit_init_std, "logit_init_std", 0.0, 10.0)
        check_real(self.value_init_std, "value_init_std", 0.0, 10.0)
        check_real(self.fixed_value_std, "fixed_value_std", 0.0, 10.0, low_open=True)
        check_tuple(self.fixed_value_offsets, "fixed_value_offsets", lambda v, n: check_real(v, n, 0.0, 100.0))
        check_real(self.dirichlet_alpha, "dirichlet_alpha", 0.0, 100.0, low_open=True)
        check_real(self.outside_margin, "outside_margin", 0.0, 10.0, low_open=True)
        check_int(self.probe_masks, "probe_masks", 2, 4096)
        check_seed(self.seed)

    @classmethod
    def quick(cls) -> ToyRegimesConfig:
        """256 problems, 400 steps (about 15 s on one core)."""
        return cls(n_problems=256, checkpoints=(25, 100, 400))

    @classmethod
    def full(cls) -> ToyRegimesConfig:
        """500 problems, 1500 steps (the toy's training length; about 2 minutes on one core)."""
        return cls()


# --- problems, training, measurement --------------------------------------------------------------


def matching_toy_config(config: ToyRegimesConfig, **overrides: object) -> ToyOptimisationConfig:
    """The :class:`ToyOptimisationConfig` that shares this config's problems, step sizes and seed."""
    shared = ("n_problems", "n_keys", "dim", "learning_rate", "target_norm", "logit_init_std", "value_init_std", "seed")
    settings: dict = {name: getattr(config, name) for name in shared}
    settings.update(steps=config.checkpoints[-1], n_records=2, drop_ratios=config.drop_ratios, **overrides)
    return ToyOptimisationConfig(**settings)


def _free_problems(config: ToyRegimesConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The toy's initial problems (its 'init' stream): targets (B, d), logits (B, N), values (B, N, d)."""
    return _initial_problem(matching_toy_config(config))


def _fixed_problems(
    config: ToyRegimesConfig, sequence: np.random.SeedSequence
) -> dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]]:
    """(target, values) per (target placement, value offset): values (B, N, d), target (B, d).

    Base values v_j ~ N(0, fixed_value_std^2 I), shifted by offset * w (one random unit w per
    problem, the same for every offset, so offsets are paired); ``inside``: y = sum_j lambda_j v_j,
    lambda ~ Dirichlet(alpha) (shifts with the values); ``outside``: y = (max_j v_j.u + margin) u.
    """
    rng = generator(sequence)
    b, n, d = config.n_problems, config.n_keys, config.dim
    base = config.fixed_value_std * rng.normal(size=(b, n, d))
    mixture = rng.dirichlet(np.full(n, config.dirichlet_alpha), size=b)
    direction, shift = (rng.normal(size=(b, d)) for _ in range(2))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    shift /= np.linalg.norm(shift, axis=1, keepdims=True)
    problems = {}
    for offset in config.fixed_value_offsets:
        values = base + offset * shift[:, None, :]
        reach = np.einsum("bnd,bd->bn", values, direction).max(-1)  # the hull's support in direction u
        targets = {
            "inside": np.einsum("bn,bnd->bd", mixture, values),
            "outside": (reach + config.outside_margin)[:, None] * direction,
        }
        for name, target in targets.items():
            problems[name, offset] = (torch.tensor(target), torch.tensor(values))
    return problems


Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _sampled_step(
    regulariser: str, r: float, target: torch.Tensor, rates: tuple[float, float], masks: torch.Generator
) -> Step:
    """One gradient step with one sampled mask per problem (the toy's update, same mask stream)."""

    def step(logits: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = None
        if regulariser != "none":
            keep = torch.rand(logits.shape, generator=masks, dtype=torch.float64) >= r
        grad_logits, grad_values = training_gradients(regulariser, logits, values, target, keep, r)
        return (logits - rates[0] * grad_logits).detach(), (values - rates[1] * grad_values).detach()

    return step


def _exact_step(regulariser: str, r: float, target: torch.Tensor, rates: tuple[float | torch.Tensor, float]) -> Step:
    """One full-batch gradient step on the exact expected loss (values fixed when their rate is 0).

    The logits' rate may be a (B, 1) tensor (one step size per problem).
    """

    def step(logits: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.detach().requires_grad_(True)
        if rates[1] == 0.0:
            (grad_logits,) = torch.autograd.grad(expected_loss(regulariser, logits, values, target, r).sum(), logits)
            return (logits - rates[0] * grad_logits).detach(), values
        values = values.detach().requires_grad_(True)
        loss = expected_loss(regulariser, logits, values, target, r).sum()
        grad_logits, grad_values = torch.autograd.grad(loss, (logits, values))
        return (logits - rates[0] * grad_logits).detach(), (values - rates[1] * grad_values).detach()

    return step


def _measure(
    regulariser: str, r: float, logits: torch.Tensor, values: torch.Tensor, target: torch.Tensor, probe: torch.Tensor
) -> dict[str, np.ndarray]:
    """The measure columns (each (B,)) of one state under a regulariser at drop ratio r."""
    s = logits.detach().requires_grad_(True)
    objective = expected_loss(regulariser, s, values, target, r)
    (grad,) = torch.autograd.grad(objective.sum(), s)
    noise = torch.zeros(logits.shape[0], dtype=torch.float64)  # none has no masks
    if regulariser != "none":
        noise = gradient_noise(regulariser, logits, values, target, probe, r)
    with torch.no_grad():
        p = torch.softmax(logits, -1).numpy()
        clean = clean_loss(logits, values, target)
        exact = clean if regulariser == "none" else enumerated_expected_loss(regulariser, logits, values, target, r)
        columns = {
            "peak": p.max(-1),
            "entropy": entropy(p),
            "clean_loss": clean.numpy(),
            "expected_loss": exact.numpy(),
            "expected_grad_norm": grad.norm(dim=-1).numpy(),
            "grad_noise": noise.numpy(),
            "value_spread": (values - target[:, None, :]).norm(dim=-1).mean(-1).numpy(),
        }
    bad = [name for name, column in columns.items() if not np.all(np.isfinite(column))]
    if bad:
        raise ValueError(f"non-finite {bad} under {regulariser} r={r:g}; lower the learning rates")
    return columns


class _Run(NamedTuple):
    """One training run: a setting of a regime, a regulariser and a drop ratio (index: its position)."""

    regime: str
    target: str
    value_offset: float
    multiplier: float
    regulariser: str
    drop_ratio: float
    index: int


def _runs(config: ToyRegimesConfig) -> list[_Run]:
    """Every run of the map, none once per setting (it does not depend on r)."""
    runs = []
    for regime in config.regimes:
        if regime == "fixed_exact":
            settings = [(t, o, math.inf) for o in config.fixed_value_offsets for t in TARGETS]
        else:
            settings = [("free", 0.0, m) for m in config.logit_lr_multipliers]
        for target, offset, multiplier in settings:
            for regulariser in REGULARISERS:
                ratios = config.drop_ratios[:1] if regulariser == "none" else config.drop_ratios
                runs.extend(_Run(regime, target, offset, multiplier, regulariser, r, i) for i, r in enumerate(ratios))
    return runs


def _train(
    config: ToyRegimesConfig,
    run_: _Run,
    problem: tuple[torch.Tensor, ...],
    step: Step,
    probes: dict[float, torch.Tensor],
) -> list[pd.DataFrame]:
    """Train one run from its initial problem; its rows at every checkpoint (under every r for none)."""
    target, logits, values = problem
    b = config.n_problems
    keys = dict(zip(("values", "objective"), REGIMES[run_.regime], strict=True))
    keys.update(regime=run_.regime, target=run_.target, regulariser=run_.regulariser)
    ratios = config.drop_ratios if run_.regulariser == "none" else (run_.drop_ratio,)
    frames = []
    for count in range(1, config.checkpoints[-1] + 1):
        logits, values = step(logits, values)
        if count not in config.checkpoints:
            continue
        for ratio in ratios:
            columns = {name: np.full(b, value, dtype=object) for name, value in keys.items()}
            columns.update(
                value_offset=np.full(b, run_.value_offset),
                logit_lr_multiplier=np.full(b, run_.multiplier),
                drop_ratio=np.full(b, ratio),
                step=np.full(b, count),
                problem=np.arange(b),
            )
            probe = probes[ratio][config.checkpoints.index(count)]
            columns.update(_measure(run_.regulariser, ratio, logits, values, target, probe))
            frames.append(frame_from_columns({name: columns[name] for name in COLUMNS}))
    return frames


def run(config: ToyRegimesConfig, *, progress: bool = False) -> pd.DataFrame:
    """Every regime x setting x regulariser x r, measured at every checkpoint (see the module doc).

    Streams (children of the seed): 0 and 1 are the toy's init and mask streams (so
    free_sampled reproduces :mod:`simulations.toy_optimisation` at its settings), 2 is
    unused (the toy's covariance stream), 3 draws the fixed-values problems, 4 the probe masks.
    """
    _, masks_root, _, fixed_sequence, probe_root = child_sequences(config.seed, 5)
    mask_children = masks_root.spawn(len(config.drop_ratios))
    probe_children = probe_root.spawn(len(config.drop_ratios))
    shape = (len(config.checkpoints), config.probe_masks, config.n_problems, config.n_keys)
    probes = {
        r: torch.from_numpy(generator(seq).random(shape) >= r)
        for r, seq in zip(config.drop_ratios, probe_children, strict=True)
    }
    free = _free_problems(config)
    fixed = _fixed_problems(config, fixed_sequence) if "fixed_exact" in config.regimes else {}
    frames: list[pd.DataFrame] = []
    with _single_thread():
        for run_ in tqdm(_runs(config), desc="toy_regimes", disable=not progress):
            regulariser, r = run_.regulariser, run_.drop_ratio
            if run_.regime == "fixed_exact":
                target, values = fixed[run_.target, run_.value_offset]
                scale = (values**2).sum(-1).mean(-1, keepdim=True)  # a step free of the values' scale
                problem = (target, free[1], values)
                step = _exact_step(regulariser, r, target, (config.fixed_learning_rate / scale, 0.0))
            else:
                problem, rates = free, (config.learning_rate * run_.multiplier, config.learning_rate)
                if run_.regime == "free_exact":
                    step = _exact_step(regulariser, r, free[0], rates)
                else:
                    masks = torch.Generator().manual_seed(integer_seed(mask_children[run_.index]))
                    step = _sampled_step(regulariser, r, free[0], rates, masks)
            frames.extend(_train(config, run_, problem, step, probes))
            log.debug("ran %s", run_)
    frame = concat_frames(frames)
    check_tidy(frame, KEY_COLUMNS)
    frame.attrs.update(n_keys=config.n_keys, target_norm=config.target_norm)
    return frame


# --- summary ------------------------------------------------------------------------------------------


def cell_label(cell: dict) -> str:
    """A readable name of a cell (a mapping with the CELL_COLUMNS)."""
    tail = f"r={float(cell['drop_ratio']):g}, step {int(cell['step'])}"
    if cell["values"] == "fixed":
        offset = float(cell["value_offset"])
        return f"fixed values offset {offset:g}, target {cell['target']} hull, exact loss, {tail}"
    objective = "sampled masks" if cell["objective"] == "sampled" else "exact loss"
    return f"free values, {objective}, logit lr x{float(cell['logit_lr_multiplier']):g}, {tail}"


def _python_scalar(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def _cells(frame: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """(cell, its rows) in the map's order: regime, target, multiplier, r, step."""
    check_tidy(frame, KEY_COLUMNS)
    order = {name: i for i, name in enumerate(REGIMES)}
    groups = frame.groupby(list(CELL_COLUMNS), sort=True)
    cells = [({c: _python_scalar(v) for c, v in zip(CELL_COLUMNS, key, strict=True)}, group) for key, group in groups]
    return sorted(cells, key=lambda item: (order[item[0]["regime"]],) + tuple(item[0][c] for c in CELL_COLUMNS[2:]))


def _paired(group: pd.DataFrame, column: str, label: str) -> np.ndarray:
    """column(dropout) - column(dropkey) per problem, in problem order."""
    by = {name: part.set_index("problem")[column].sort_index() for name, part in group.groupby("regulariser")}
    for name in ("dropkey", "dropout"):
        if name not in by:
            raise ValueError(f"frame: cell '{label}' has no {name} rows")
    if not by["dropkey"].index.equals(by["dropout"].index):
        raise ValueError(f"frame: cell '{label}' has different problems under dropkey and dropout")
    return (by["dropout"] - by["dropkey"]).to_numpy(dtype=np.float64)


def peak_differences(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per cell label, peak(dropout) - peak(DropKey) per problem (sorted by problem); > 0: DropKey smooths more."""
    return {cell_label(cell): _paired(group, "peak", cell_label(cell)) for cell, group in _cells(frame)}


def mean_interval(differences: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Mean, standard error, n and the two-sided Student-t interval of paired differences."""
    array = np.asarray(differences, dtype=np.float64)
    if array.size < 2 or not np.all(np.isfinite(array)):
        raise ValueError(f"differences must be >= 2 finite numbers, got {array.size} with non-finite ones")
    mean, se = float(array.mean()), float(array.std(ddof=1) / math.sqrt(array.size))
    half = float(stats.t.ppf(0.5 + level / 2, array.size - 1)) * se
    return {"mean": mean, "se": se, "n": int(array.size), "ci_low": mean - half, "ci_high": mean + half}


def summarise(frame: pd.DataFrame) -> dict:
    """Per cell: the paired peak and entropy differences (dropout - DropKey) and every measure's mean per
    regulariser."""
    cells = {}
    for cell, group in _cells(frame):
        label = cell_label(cell)
        means = group.groupby("regulariser", sort=True)[list(MEASURE_COLUMNS)].mean()
        cells[label] = {
            "cell": cell,
            "peak_dropout_minus_dropkey": mean_interval(_paired(group, "peak", label)),
            "entropy_dropout_minus_dropkey": mean_interval(_paired(group, "entropy", label)),
            "means": {name: row.to_dict() for name, row in means.iterrows()},
        }
    summary: dict = {"n_problems": int(frame["problem"].nunique()), "cells": cells}
    if {"n_keys", "target_norm"} <= set(frame.attrs):  # not kept by a CSV round trip
        summary["dropout_free_values_minimum"] = {
            f"r={r:g}": dropout_free_values_minimum(r, frame.attrs["n_keys"], frame.attrs["target_norm"])
            for r in sorted(set(frame["drop_ratio"]))
        }
    return summary


def _headline(summary: dict) -> list[str]:
    lines = []
    for label, entry in summary["cells"].items():
        difference = entry["peak_dropout_minus_dropkey"]
        lines.append(f"{label}: peak(dropout) - peak(dropkey) = {difference['mean']:+.4f} +- {difference['se']:.4f}")
    return lines


STUDY = Study(
    name="toy_regimes",
    title="DropKey against dropout across toy regimes",
    config_class=ToyRegimesConfig,
    run=run,
    summarise=summarise,
    question=QUESTION,
    method=METHOD,
    explanation=EXPLANATION,
    page="simulations.pages.toy_regimes",
    headline=_headline,
    rank=50,
)
