"""The toy_optimisation page: peak weight and loss trajectories, final peak by regulariser.

:func:`figures` draws from the study's frame and summary (deterministic, each with the table it plots);
:func:`equations` lists the definitions the page measures, as sympy expressions.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import sympy as sp

from simulations.pages.figure import PALETTE, Figure, make_figure


def _run_label(regulariser: str, r: float) -> str:
    return regulariser if regulariser == "none" else f"{regulariser} r={r:g}"


def figures(frame: pd.DataFrame, summary: dict) -> list[Figure]:
    trajectories = (
        frame.groupby(["regulariser", "drop_ratio", "step"], sort=True)[["peak_weight", "entropy", "loss"]]
        .mean()
        .reset_index()
    )
    shown = trajectories[trajectories["regulariser"] != "dropattention"]  # identical to DropKey (one query)

    def draw_trajectories(fig: plt.Figure) -> None:
        left, right = fig.subplots(1, 2)
        styles = {"none": "-", "dropkey": "-", "dropout": "--"}
        runs = list(shown.groupby(["regulariser", "drop_ratio"], sort=True))
        for colour, ((regulariser, r), group) in zip(PALETTE, runs, strict=False):
            label = _run_label(regulariser, r)
            style = styles.get(regulariser, ":")
            left.plot(group["step"] + 1, group["peak_weight"], style, color=colour, label=label)
            right.plot(group["step"] + 1, group["loss"], style, color=colour, label=label)
        for ax in (left, right):
            ax.set_xscale("log")
            ax.set_xlabel("step + 1")
        right.set_yscale("log")
        left.set_ylabel("mean peak weight max p")
        right.set_ylabel("mean clean loss")
        left.legend(fontsize=6)

    last = frame[frame["step"] == frame["step"].max()]
    final = (
        last.groupby(["regulariser", "drop_ratio"], sort=True)["peak_weight"]
        .agg(["mean", "std", "count"])
        .reset_index()
    )
    final["se"] = final["std"] / np.sqrt(final["count"])
    final = final.drop(columns="std")

    def draw_final(fig: plt.Figure) -> None:
        ax = fig.add_subplot()
        labels = [_run_label(g, r) for g, r in zip(final["regulariser"], final["drop_ratio"], strict=False)]
        colours = [PALETTE[["none", "dropkey", "dropout", "dropattention"].index(g) % 10] for g in final["regulariser"]]
        ax.bar(range(len(final)), final["mean"], yerr=final["se"], color=colours)
        ax.set_xticks(range(len(final)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("final peak weight (mean ± SE)")

    return [
        make_figure(
            "trajectories", "Peak attention weight and loss during training",
            "Means over problems on the clean objective; DropAttention coincides with DropKey for one query and is "
            "not drawn.",
            "svg", trajectories, draw_trajectories, size=(8.0, 3.6),
        ),
        make_figure(
            "final-peak", "Final peak weight by regulariser", "Lower is smoother attention.", "svg", final, draw_final,
        ),
    ]


def equations() -> list[tuple[str, sp.Basic]]:
    """The definitions the page measures: (name, sympy expression)."""
    from simulations.pages.symbols import L, M, N, alpha, beta, j, p, s

    t_ = sp.Symbol("t_")
    return [
        ("objective (Eq. 5)", sp.Eq(L, sp.Rational(1, 2) * (sp.Sum(p[j] * beta[j], (j, 1, N)) - M) ** 2
                                    + sp.Rational(1, 2) * sp.Sum(p[j] * alpha[j], (j, 1, N)) ** 2)),
        ("logit-gradient gap (Eq. 11)", sp.Eq(sp.Symbol("dL/dp_s - dL/dp_t"),
                                              (sp.Sum(p[j] * beta[j], (j, 1, N)) - M) * (beta[s] - beta[t_])
                                              + sp.Sum(p[j] * alpha[j], (j, 1, N)) * (alpha[s] - alpha[t_]))),
    ]
