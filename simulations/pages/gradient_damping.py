"""The gradient_damping page: the damping of the rich-get-richer loop by drop ratio, first order against measured.

:func:`figures` draws from the study's frame and summary (deterministic, each with the table it plots);
:func:`equations` lists the definitions the page measures, as sympy expressions.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import sympy as sp

from simulations.pages.figure import PALETTE, Figure, make_figure


def figures(frame: pd.DataFrame, summary: dict) -> list[Figure]:
    damping = frame.assign(
        mc=frame["ratio_mc"] / frame["ratio_undamped"],
        exact=frame["ratio_exact"] / frame["ratio_undamped"],
        first_order=frame["ratio_first_order"] / frame["ratio_undamped"],
    )
    columns = ["mc", "exact", "first_order"]
    medians = damping.groupby(["beta_mean", "drop_ratio"], sort=True)[columns].median().reset_index()

    def draw_medians(fig: plt.Figure) -> None:
        groups = list(medians.groupby("beta_mean", sort=True))
        axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
        for ax, (beta_mean, group) in zip(axes, groups, strict=False):
            ax.plot(group["drop_ratio"], group["mc"], "o-", color=PALETTE[0], label="Monte-Carlo")
            if group["exact"].notna().any():
                ax.plot(group["drop_ratio"], group["exact"], "s--", color=PALETTE[1], label="exact (enumeration)")
            ax.plot(group["drop_ratio"], group["first_order"], "^:", color=PALETTE[2],
                    label="first order c_s p_s/(c_t p_t)")
            ax.axhline(1.0, color="k", linewidth=0.8)
            ax.set_title(f"beta mean {beta_mean:g}", fontsize=9)
            ax.set_xlabel("drop ratio r")
        axes[0].set_ylabel("median ratio / (p_s / p_t)")
        axes[0].legend(fontsize=7)

    scatter = damping[["shape", "n_keys", "beta_mean", "drop_ratio", "row", "first_order", "mc", "exact"]]

    def draw_scatter(fig: plt.Figure) -> None:
        ax = fig.add_subplot()
        reference = np.where(scatter["exact"].notna(), scatter["exact"], scatter["mc"])
        ax.scatter(reference, scatter["first_order"], s=4, alpha=0.5, color=PALETTE[0], linewidths=0)
        low, high = float(np.nanmin(reference)), float(np.nanmax(reference))
        ax.plot([low, high], [low, high], "k--", linewidth=0.8)
        ax.set_xlabel("measured damping (exact where enumerated, else Monte-Carlo)")
        ax.set_ylabel("first-order damping")

    return [
        make_figure(
            "damping-by-ratio", "Damping of the top key's gradient ratio",
            "Below 1: DropKey shrinks the update ratio of the top two keys (the rich-get-richer loop is damped).",
            "svg", medians, draw_medians, size=(8.0, 3.4),
        ),
        make_figure(
            "first-order-versus-measured", "First-order prediction against the measured damping, per row",
            "The paper's form is exact to leading order in M; departures from the diagonal are its error.",
            "png", scatter, draw_scatter,
        ),
    ]


def equations() -> list[tuple[str, sp.Basic]]:
    """The definitions the page measures: (name, sympy expression)."""
    from simulations.pages.symbols import M, N, beta, c, j, k, p, s, w

    t_ = sp.Symbol("t_")
    undamped = p[s] / p[t_]
    return [
        ("beta-gradient of key j under DropKey",
         sp.Eq(sp.Symbol("dL/dbeta_j"), w[j] * (sp.Sum(w[k] * beta[k], (k, 1, N)) - M))),
        ("undamped ratio", sp.Eq(sp.Symbol("rho_0"), undamped)),
        ("first-order DropKey ratio", sp.Eq(sp.Symbol("rho_1"), c[s] * p[s] / (c[t_] * p[t_]))),
    ]
