"""The train_test_mismatch page: Monte-Carlo inference against K, the train/test gap by drop ratio.

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
    rms = (
        frame.assign(train2=frame["dist_to_train"] ** 2, test2=frame["dist_to_test"] ** 2, gap2=frame["gap"] ** 2)
        .groupby(["shape", "n_keys", "drop_ratio", "k"], sort=True)[["train2", "test2", "gap2"]]
        .mean()
        .pipe(np.sqrt)
        .rename(columns={"train2": "rms_to_train", "test2": "rms_to_test", "gap2": "rms_gap"})
        .reset_index()
    )
    n_max = int(rms["n_keys"].max())
    shape = "vit_like" if "vit_like" in set(rms["shape"]) else sorted(set(rms["shape"]))[0]
    cell = rms[(rms["n_keys"] == n_max) & (rms["shape"] == shape)]

    def draw_rms(fig: plt.Figure) -> None:
        ax = fig.add_subplot()
        for colour, (r, group) in zip(PALETTE, cell.groupby("drop_ratio", sort=True), strict=False):
            ax.plot(group["k"], group["rms_to_train"], "o-", color=colour, label=f"to E_train[o], r={r:g}")
            ax.plot(group["k"], group["rms_to_test"], "x--", color=colour, alpha=0.7)
            ax.axhline(float(group["rms_gap"].iloc[0]), color=colour, linewidth=0.6, linestyle=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K (masked passes averaged)")
        ax.set_ylabel("RMS distance")
        ax.legend(fontsize=7)

    gaps = (
        frame[frame["k"] == frame["k"].min()]
        .groupby(["n_keys", "drop_ratio"], sort=True)["relative_gap"]
        .median()
        .rename("median_relative_gap")
        .reset_index()
    )

    def draw_gap(fig: plt.Figure) -> None:
        ax = fig.add_subplot()
        for colour, (n, group) in zip(PALETTE, gaps.groupby("n_keys", sort=True), strict=False):
            ax.plot(group["drop_ratio"], group["median_relative_gap"], "o-", color=colour, label=f"N={n}")
        ax.set_xlabel("drop ratio r")
        ax.set_ylabel("median ||E_train[o] − o_test|| / ||o_test||")
        ax.legend(fontsize=7)

    return [
        make_figure(
            "mc-inference", f"Monte-Carlo inference against K (N={n_max}, {shape})",
            "Solid: distance to the training expectation (slope −1/2); dashed: distance to plain inference; "
            "dotted: the train/test gap (plain inference's distance to E_train[o]).",
            "svg", rms, draw_rms,
        ),
        make_figure(
            "relative-gap", "Train/test gap by drop ratio", "Median over problems and row shapes.", "svg", gaps,
            draw_gap,
        ),
    ]


def equations() -> list[tuple[str, sp.Basic]]:
    """The definitions the page measures: (name, sympy expression)."""
    from simulations.pages.symbols import K, N, c, j, k, p, v

    return [
        ("training expectation", sp.Eq(sp.Symbol("E_train[o]"), sp.Sum(c[j] * p[j] * v[j], (j, 1, N)))),
        ("plain inference", sp.Eq(sp.Symbol("o_test"), sp.Sum(p[j] * v[j], (j, 1, N)))),
        ("Monte-Carlo inference with K masks", sp.Eq(sp.Symbol("hat{o}_K"), sp.Sum(sp.Indexed("o", k), (k, 1, K)) / K)),
        ("its RMS error", sp.Eq(sp.Symbol("RMS_K"), sp.Symbol("sigma") / sp.sqrt(K))),
    ]
