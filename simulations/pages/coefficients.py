"""The coefficients page: c_j against p_j, Monte-Carlo estimates against exact, interval coverage.

:func:`figures` draws from the study's frame and summary (deterministic, each with the table it plots);
:func:`equations` lists the definitions the page measures, as sympy expressions.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import sympy as sp

from simulations.pages.figure import PALETTE, Figure, make_figure


def figures(frame: pd.DataFrame, summary: dict) -> list[Figure]:
    first = frame[frame["repeat"] == frame["repeat"].min()]
    n_max = int(first["n_keys"].max())
    shape = "vit_like" if "vit_like" in set(first["shape"]) else sorted(set(first["shape"]))[0]
    convention = "zero" if "zero" in set(first["all_dropped"]) else sorted(set(first["all_dropped"]))[0]
    row = first[(first["n_keys"] == n_max) & (first["shape"] == shape) & (first["all_dropped"] == convention)]
    row = row[["drop_ratio", "key", "p", "c_exact", "c_estimate", "ci_low", "ci_high"]]
    row = row.sort_values(["drop_ratio", "key"])

    def draw_rank(fig: plt.Figure) -> None:
        ax = fig.add_subplot()
        for colour, (ratio, group) in zip(PALETTE, row.groupby("drop_ratio", sort=True), strict=False):
            ax.plot(group["p"], group["c_exact"], "-", color=colour, label=f"exact, r={ratio:g}")
            ax.plot(group["p"], group["c_estimate"], ".", color=colour, alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("attention weight p_j")
        ax.set_ylabel("smoothing coefficient c_j")
        ax.legend(fontsize=7)

    scatter = first[["n_keys", "shape", "drop_ratio", "all_dropped", "key", "c_exact", "c_estimate"]]

    def draw_scatter(fig: plt.Figure) -> None:
        ax = fig.add_subplot()
        ax.scatter(scatter["c_exact"], scatter["c_estimate"], s=3, alpha=0.4, color=PALETTE[0], linewidths=0)
        low, high = scatter["c_exact"].min(), scatter["c_exact"].max()
        ax.plot([low, high], [low, high], "k--", linewidth=0.8, label="estimate = exact")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("exact c_j")
        ax.set_ylabel("Monte-Carlo estimate of c_j")
        ax.legend(fontsize=7)

    reliable = frame[frame["clt_reliable"].astype(bool)]
    coverage = (
        reliable.groupby(["n_keys", "drop_ratio"], sort=True)["covered"].mean().rename("coverage").reset_index()
    )
    nominal = float(summary.get("nominal_coverage", 0.95))

    def draw_coverage(fig: plt.Figure) -> None:
        ax = fig.add_subplot()
        for colour, (n, group) in zip(PALETTE, coverage.groupby("n_keys", sort=True), strict=False):
            ax.plot(group["drop_ratio"], group["coverage"], "o-", color=colour, label=f"N={n}")
        ax.axhline(nominal, color="k", linestyle="--", linewidth=0.8, label=f"nominal {nominal:g}")
        ax.set_xlabel("drop ratio r")
        ax.set_ylabel("interval coverage (CLT-reliable)")
        ax.legend(fontsize=7)

    return [
        make_figure(
            "c-versus-p", f"c_j against p_j (N={n_max}, {shape}, {convention} convention)",
            "Eq. 4: the coefficient falls as the weight grows. Lines: exact; dots: Monte-Carlo estimates.",
            "svg", row, draw_rank,
        ),
        make_figure(
            "estimate-versus-exact", "Monte-Carlo estimate against exact c_j (every cell, first repeat)",
            "Points on the diagonal: the sampler and the exact theory agree.", "png", scatter, draw_scatter,
        ),
        make_figure(
            "coverage", "Coverage of the 95% intervals by N and r",
            "Intervals whose CLT approximation is reliable; the dashed line is the nominal rate.",
            "svg", coverage, draw_coverage,
        ),
    ]


def _expected_weight() -> sp.Eq:
    from simulations.pages.symbols import c, j, p

    return sp.Eq(sp.Symbol("E[w_j]"), c[j] * p[j])


def _integral_coefficient() -> sp.Eq:
    from simulations.pages.symbols import N, c, j, k, p, r, t

    others = sp.Product(r + (1 - r) * sp.exp(-t * p[k]), (k, 1, N)) / (r + (1 - r) * sp.exp(-t * p[j]))
    return sp.Eq(c[j], (1 - r) * sp.Integral(sp.exp(-t * p[j]) * others, (t, 0, sp.oo)))


def equations() -> list[tuple[str, sp.Basic]]:
    """The definitions the page measures: (name, sympy expression)."""
    from simulations.pages.symbols import M, j, m, p, w

    return [
        ("expected weight (Eq. 3)", _expected_weight()),
        ("smoothing coefficient, integral form", _integral_coefficient()),
        ("Monte-Carlo estimate from M sampled masks",
         sp.Eq(sp.Symbol("hat{c}_j"), sp.Sum(w[j, m], (m, 1, M)) / (M * p[j]))),
    ]
