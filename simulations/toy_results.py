"""The toy optimisation's results: the columns of its tidy frame and their summary.

:mod:`simulations.toy_optimisation` runs the toy and writes frames with :data:`COLUMNS`;
:func:`summarise` turns a frame (fresh, or read back from a result folder) into the numbers the
report's claims read: final loss, peak and entropy per regulariser, paired comparisons, the
links of the rich-get-richer chain and the parts of the expected training loss. Both names are
re-exported by :mod:`simulations.toy_optimisation`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from simulations.common import check_tidy

KEY_COLUMNS = ("regulariser", "drop_ratio", "problem", "step")
TRAJECTORY_COLUMNS = (
    "loss",
    "peak_weight",
    "entropy",
    "top_key",
    "second_key",
    "p_top",
    "p_second",
    "beta_top",
    "beta_second",
    "sum_p_beta_minus_m",
    "grad_beta_top",
    "grad_beta_second",
    "eq11_mean_term",
    "eq11_alpha_term",
    "eq11_target_term",
    "eq11_total",
    "logit_gap",
    "next_beta_gap_change",
    "next_logit_gap_change",
    "value_spread",
)
FINAL_COLUMNS = (
    "dropkey_mean_term",
    "dropkey_variance_diagonal",
    "dropkey_variance_cross",
    "dropkey_variance_cross_se",
    "dropkey_expected_loss",
    "dropout_mean_term",
    "dropout_variance",
    "dropout_expected_loss",
)
COLUMNS = KEY_COLUMNS + TRAJECTORY_COLUMNS + FINAL_COLUMNS


def _mean_se(values: pd.Series) -> dict[str, float]:
    array = values.to_numpy(dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"mean": math.nan, "se": math.nan, "n": 0}
    se = float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else math.nan
    return {"mean": float(array.mean()), "se": se, "n": int(array.size)}


def _link_indicators(frame: pd.DataFrame) -> dict[str, tuple[pd.Series, pd.Series | None]]:
    """Per link of the chain: (holds, counted) over the frame's (problem, step) records.

    ``counted`` None means every record counts; the growth links count only records that
    have a next recording interval.
    """
    a = frame["sum_p_beta_minus_m"] < 0
    b = frame["grad_beta_top"] < frame["grad_beta_second"]
    has_next = frame["next_beta_gap_change"].notna()
    c_up = frame["next_beta_gap_change"] > 0
    c_above = frame["beta_top"] > frame["beta_second"]
    d_strict = frame["eq11_target_term"].abs() > (
        frame["eq11_mean_term"].abs() + frame["eq11_alpha_term"].abs()
    )
    d_sign = np.sign(frame["eq11_total"]) == np.sign(frame["eq11_target_term"])
    e_eq11 = frame["eq11_total"] < 0
    e_growth = frame["next_logit_gap_change"] > 0
    return {
        "a_sum_p_beta_below_m": (a, None),
        "b_grad_beta_top_below_second": (b, None),
        "c_beta_gap_grows_next": (c_up, has_next),
        "c_beta_top_above_second": (c_above, None),
        "d_target_term_dominates_strictly": (d_strict, None),
        "d_total_has_target_term_sign": (d_sign, None),
        "e_eq11_negative": (e_eq11, None),
        "e_logit_gap_grows_next": (e_growth, has_next),
        "chain_all_links": (a & b & (c_up | c_above) & d_sign & e_eq11, None),
    }


def _link_fractions(frame: pd.DataFrame) -> dict[str, float]:
    """Fraction of (problem, step) records where each link of the chain holds."""
    if len(frame) == 0:
        return {}
    fractions: dict[str, float] = {"n_records": int(len(frame))}
    for name, (holds, counted) in _link_indicators(frame).items():
        fractions[name] = float(holds[counted].mean()) if counted is not None else float(holds.mean())
    return fractions


def far_from_optimum(frame: pd.DataFrame) -> pd.Series:
    """Records 'far from the optimum': sum p beta < far_fraction * M (the frame's attrs, see the config)."""
    far_fraction = float(frame.attrs.get("far_fraction", 0.5))
    m = float(frame.attrs.get("target_norm", 1.0))
    return frame["sum_p_beta_minus_m"] + m < far_fraction * m


def link_fractions_by_problem(frame: pd.DataFrame, regulariser: str = "none") -> pd.DataFrame:
    """Per problem (rows, sorted), the fraction of its far-from-optimum records where each link holds.

    The problem is the independent unit (its records along one trajectory are correlated);
    a problem with no far record (or no counted one, for the growth links) gets NaN.
    """
    check_tidy(frame, KEY_COLUMNS)
    runs = frame[frame["regulariser"] == regulariser]
    if not len(runs):
        raise ValueError(f"the frame has no {regulariser!r} trajectories")
    far = runs[far_from_optimum(runs)]
    problems = np.sort(runs["problem"].unique())
    columns = {}
    for name, (holds, counted) in _link_indicators(far).items():
        mask = pd.Series(True, index=far.index) if counted is None else counted
        columns[name] = holds[mask].groupby(far["problem"][mask]).mean().reindex(problems)
    return pd.DataFrame(columns, index=pd.Index(problems, name="problem"))


def final_differences(
    frame: pd.DataFrame, column: str, regulariser_a: str, regulariser_b: str
) -> dict[str, np.ndarray]:
    """Per drop ratio ("r=0.1"), the per-problem final ``column(a) - column(b)`` (problems sorted).

    Every regulariser starts from the same problems, so the differences are paired by problem;
    ``none`` runs once (r = 0) and pairs with every r.
    """
    check_tidy(frame, KEY_COLUMNS)
    final = frame[frame["step"] == frame["step"].max()]
    present = set(final["regulariser"])
    for name in (regulariser_a, regulariser_b):
        if name not in present:
            raise ValueError(f"the frame has no {name!r} trajectories (it has {sorted(present)})")

    def values(name: str, r: float) -> pd.Series:
        rows = final[(final["regulariser"] == name) & (final["drop_ratio"] == (0.0 if name == "none" else r))]
        return rows.set_index("problem")[column].sort_index()

    ratios = sorted(r for r in final["drop_ratio"].unique() if r > 0)
    differences = {}
    for r in ratios:
        a, b = values(regulariser_a, r), values(regulariser_b, r)
        if not a.index.equals(b.index):
            raise ValueError(f"{regulariser_a!r} and {regulariser_b!r} at r={r:g} do not share their problems")
        differences[f"r={r:g}"] = (a - b).to_numpy(dtype=np.float64)
    return differences


def summarise(frame: pd.DataFrame) -> dict:
    """Final loss, final peak/entropy per regulariser, paired comparisons, links and E[L] parts.

    Links of the rich-get-richer chain, as fractions of (problem, recorded step)
    rows, all on the clean objective at that step (s, t = top two keys by p):
    (a) sum p beta - M < 0; (b) dL/dbeta_s < dL/dbeta_t; (c) beta_s - beta_t grows
    over the next recording interval (same pair), and beta_s > beta_t; (d) the
    -M(beta_s - beta_t) term dominates Eq. 11 (strictly: larger than the other two
    in absolute value together; or: the total has its sign); (e) Eq. 11 < 0, i.e.
    dL/dp_s < dL/dp_t, and the logit gap s_s - s_t (= log p_s/p_t) grows over the
    next interval. Reported over all records and over records 'far from the
    optimum' (sum p beta < far_fraction * M). For regularised runs the links are
    evaluated on the clean objective along the regularised trajectory.
    Entropies are in nats.
    """
    check_tidy(frame, KEY_COLUMNS)
    far_fraction = float(frame.attrs.get("far_fraction", 0.5))
    m = float(frame.attrs.get("target_norm", 1.0))
    last_step = int(frame["step"].max())
    final = frame[frame["step"] == last_step]
    summary: dict = {"last_step": last_step, "n_problems": int(final["problem"].nunique())}

    none_final = final[final["regulariser"] == "none"]
    if len(none_final):
        loss = none_final["loss"].to_numpy()
        summary["none_final_loss"] = {
            "mean": float(loss.mean()),
            "median": float(np.median(loss)),
            "max": float(loss.max()),
            "fraction_below_1e-6": float((loss < 1e-6).mean()),
        }

    per_run = {}
    for (regulariser, r), group in final.groupby(["regulariser", "drop_ratio"], sort=True):
        entry = {
            "peak_weight": _mean_se(group["peak_weight"]),
            "entropy": _mean_se(group["entropy"]),
            "clean_loss": _mean_se(group["loss"]),
            "value_spread": _mean_se(group["value_spread"]),
        }
        if regulariser != "none":
            for name in FINAL_COLUMNS:
                entry[name] = _mean_se(group[name])
        per_run[f"{regulariser}@{r:g}"] = entry
    summary["final"] = per_run

    # Paired comparisons at matched r (same initial problems, same masks).
    indexed = final.set_index(["regulariser", "drop_ratio", "problem"]).sort_index()
    comparisons = {}
    ratios = sorted(r for r in final["drop_ratio"].unique() if r > 0)
    regularisers = set(final["regulariser"])
    for r in ratios:
        if not {"dropkey", "dropout"} <= regularisers:
            break
        key = indexed.loc[("dropkey", r)]
        out = indexed.loc[("dropout", r)]
        peak_difference = out["peak_weight"] - key["peak_weight"]
        entropy_difference = out["entropy"] - key["entropy"]
        entry = {
            "peak_dropout_minus_dropkey": _mean_se(peak_difference),
            "entropy_dropout_minus_dropkey": _mean_se(entropy_difference),
            "fraction_dropout_peak_lower": float((peak_difference < 0).mean()),
            "dropout_smooths_more": bool(peak_difference.mean() < 0 and entropy_difference.mean() > 0),
        }
        if "none" in regularisers:
            plain = indexed.loc[("none", 0.0)]
            entry["peak_dropkey_minus_none"] = _mean_se(key["peak_weight"] - plain["peak_weight"])
            entry["peak_dropout_minus_none"] = _mean_se(out["peak_weight"] - plain["peak_weight"])
        # Which penalty does each final state pay?  E[L] parts at the other method's optimum.
        entry["dropkey_state_dropout_penalty"] = _mean_se(key["dropout_variance"])
        entry["dropout_state_dropkey_penalty"] = _mean_se(
            out["dropkey_variance_diagonal"] + out["dropkey_variance_cross"]
        )
        comparisons[f"r={r:g}"] = entry
    summary["paired_comparisons"] = comparisons

    if {"dropkey", "dropattention"} <= regularisers:
        differences = []
        for r in ratios:
            a = indexed.loc[("dropkey", r), "peak_weight"].to_numpy()
            b = indexed.loc[("dropattention", r), "peak_weight"].to_numpy()
            differences.append(np.abs(a - b).max())
        summary["dropattention_max_abs_diff_final_peak_vs_dropkey"] = float(max(differences))

    links = {}
    for regulariser, group in frame.groupby("regulariser", sort=True):
        far = far_from_optimum(group)
        links[regulariser] = {
            "all_records": _link_fractions(group),
            "far_from_optimum": _link_fractions(group[far]),
            "n_far_records": int(far.sum()),
        }
    summary["links"] = links
    summary["far_fraction"] = far_fraction
    summary["target_norm"] = m
    return summary


def headline(summary: dict) -> list[str]:
    lines = []
    if "none_final_loss" in summary:
        lines.append(f"no regulariser: final loss median {summary['none_final_loss']['median']:.2e}")
    for name, entry in summary["final"].items():
        lines.append(
            f"{name}: peak {entry['peak_weight']['mean']:.3f}, entropy {entry['entropy']['mean']:.3f}"
        )
    for name, entry in summary["paired_comparisons"].items():
        difference = entry["peak_dropout_minus_dropkey"]
        lines.append(
            f"{name}: peak(dropout) - peak(dropkey) = {difference['mean']:+.3f} +- {difference['se']:.3f}"
        )
    if "none" in summary["links"]:
        chain = summary["links"]["none"]["far_from_optimum"]
        lines.append(f"rich-get-richer chain (none, far from optimum): {chain}")
    return lines
