"""The structured_masks page: effective coefficients, peak reduction, how far Block and Cross move from DropKey.

:func:`figures` draws from the study's frame and summary (deterministic, each with the table it plots);
:func:`equations` lists the definitions the page measures, as sympy expressions.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import sympy as sp

from simulations.pages.figure import PALETTE, Figure, make_figure

_VARIANT_COLOURS = {"dropkey": PALETTE[0], "block": PALETTE[1], "cross": PALETTE[2]}


def _largest_grid(frame: pd.DataFrame) -> str:
    sizes = frame.groupby("grid")["n_keys"].first()
    return str(sizes.idxmax())


def figures(frame: pd.DataFrame, summary: dict) -> list[Figure]:
    grid = _largest_grid(frame)
    first = frame[(frame["grid"] == grid) & (frame["row"] == frame["row"].min())]
    points = first[["shape", "variant", "drop_ratio", "key", "p", "c_dropkey", "c_eff", "c_eff_se"]].sort_values(
        ["shape", "drop_ratio", "variant", "key"]
    )
    shapes = sorted(set(points["shape"]))
    ratios = sorted(set(points["drop_ratio"]))

    def draw_coefficients(fig: plt.Figure) -> None:
        axes = fig.subplots(len(shapes), len(ratios), sharex="row", sharey="row", squeeze=False)
        for i, shape in enumerate(shapes):
            for column, ratio in enumerate(ratios):
                ax = axes[i][column]
                cell = points[(points["shape"] == shape) & (points["drop_ratio"] == ratio)]
                for variant, group in cell.groupby("variant", sort=True):
                    ax.plot(group["p"], group["c_eff"], ".", color=_VARIANT_COLOURS.get(variant, PALETTE[3]),
                            alpha=0.7, markersize=3, label=f"{variant} (MC)")
                exact = cell[cell["variant"] == cell["variant"].iloc[0]].sort_values("p")
                ax.plot(exact["p"], exact["c_dropkey"], "k-", linewidth=0.8, label="DropKey exact")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{shape}, r={ratio:g}", fontsize=8)
                if i == len(shapes) - 1:
                    ax.set_xlabel("p_j")
            axes[i][0].set_ylabel("c_eff = E[w_j] / p_j")
        axes[0][0].legend(fontsize=6)

    cells = pd.DataFrame(
        [
            {key: cell[key] for key in (
                "variant", "grid", "shape", "drop_ratio", "peak_ratio", "peak_ratio_dropkey",
                "peak_ratio_minus_dropkey_se", "entropy_gain", "entropy_gain_dropkey",
                "p_weighted_rel_c_diff", "p_weighted_rel_c_conditional_diff", "variance_ratio",
            )}
            for cell in summary["cells"].values()
        ]
    ).sort_values(["shape", "grid", "variant", "drop_ratio"])

    def draw_peaks(fig: plt.Figure) -> None:
        axes = fig.subplots(1, len(shapes), squeeze=False)[0]
        for ax, shape in zip(axes, shapes, strict=False):
            sub = cells[cells["shape"] == shape]
            for (grid_, variant), group in sub.groupby(["grid", "variant"], sort=True):
                style = "-" if grid_ == grid else ":"
                ax.errorbar(group["drop_ratio"], group["peak_ratio"], yerr=group["peak_ratio_minus_dropkey_se"],
                            fmt="o" + style, color=_VARIANT_COLOURS.get(variant, PALETTE[3]), markersize=3,
                            label=f"{variant} {grid_} (MC)")
            for grid_, group in sub[sub["variant"] == "dropkey"].groupby("grid", sort=True):
                ax.plot(group["drop_ratio"], group["peak_ratio_dropkey"], "k--", linewidth=0.8,
                        label=f"DropKey exact {grid_}")
            ax.axhline(1.0, color="grey", linewidth=0.6)
            ax.set_title(shape, fontsize=9)
            ax.set_xlabel("drop ratio r")
        axes[0].set_ylabel("peak ratio max(q) / max(p)")
        axes[0].legend(fontsize=6)

    structured = cells[cells["variant"] != "dropkey"]

    def draw_decomposition(fig: plt.Figure) -> None:
        axes = fig.subplots(1, len(shapes), sharey=True, squeeze=False)[0]
        for ax, shape in zip(axes, shapes, strict=False):
            sub = structured[(structured["shape"] == shape) & (structured["grid"] == grid)]
            for variant, group in sub.groupby("variant", sort=True):
                colour = _VARIANT_COLOURS.get(variant, PALETTE[3])
                ax.plot(group["drop_ratio"], group["p_weighted_rel_c_diff"], "o-", color=colour,
                        label=f"{variant}: total")
                ax.plot(group["drop_ratio"], group["p_weighted_rel_c_conditional_diff"], "s--", color=colour,
                        label=f"{variant}: correlation part")
            ax.set_title(f"{shape}, {grid}", fontsize=9)
            ax.set_xlabel("drop ratio r")
        axes[0].set_ylabel("Σ p |c_eff − c| / Σ p c")
        axes[0].legend(fontsize=6)

    return [
        make_figure(
            "c-versus-p", f"Effective coefficients against p ({grid} grid, first row of each shape)",
            "Dots: Monte-Carlo c_eff = E[w_j]/p_j per key and variant; line: independent DropKey's exact c_j. "
            "DropKey's dots sit on the line; Block and Cross scatter around it by key position (border keys are "
            "kept more often) and by correlation.",
            "png", points, draw_coefficients, size=(8.0, 5.0),
        ),
        make_figure(
            "peak-ratio", "Peak reduction max(q)/max(p) against the drop ratio",
            "Mean over rows; below 1: the expected attention's peak is lowered. Dashed: independent DropKey (exact); "
            "error bars: Monte-Carlo SE.",
            "svg", cells, draw_peaks, size=(8.0, 3.4),
        ),
        make_figure(
            "decomposition", "How far the structured coefficients move from DropKey's",
            "p-weighted relative deviation of c_eff from DropKey's exact c (solid) and of its correlation part "
            "c_cond = c_eff (1 − r) / P(kept) (dashed); the gap between them is the marginal (border) effect.",
            "svg", structured, draw_decomposition, size=(8.0, 3.4),
        ),
    ]


def equations() -> list[tuple[str, sp.Basic]]:
    """The definitions the page measures: (name, sympy expression)."""
    from simulations.pages.symbols import N, gamma, j, p, r

    return [
        ("effective coefficient", sp.Eq(sp.Symbol("c^eff_j"), sp.Symbol("E[w_j]") / p[j])),
        ("seed-rate calibration", sp.Eq(sp.Sum(1 - (1 - gamma) ** sp.Indexed("C", j), (j, 1, N)) / N, r)),
        ("total-variation distance", sp.Eq(sp.Symbol("TV(a, b)"),
                                           sp.Rational(1, 2) * sp.Sum(sp.Abs(sp.Indexed("a", j) - sp.Indexed("b", j)),
                                                                      (j, 1, N)))),
    ]
