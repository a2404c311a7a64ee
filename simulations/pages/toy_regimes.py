"""The toy_regimes page (:mod:`simulations.toy_regimes`): the map, peaks by training length, gradient noise.

:func:`figures`: deterministic SVG via :func:`simulations.pages.figure.make_figure`, each with the small
aggregated table it plots (sorted, so the same frame gives the same figure); :func:`equations`: the
exact expected losses the page's regimes train on, as sympy expressions.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import sympy as sp

from simulations.pages.figure import PALETTE, Figure, make_figure
from simulations.toy_regimes import CELL_COLUMNS, REGIMES

_REGIME_TITLES = {
    "free_sampled": "free values, sampled masks",
    "fixed_exact": "fixed values, exact loss",
    "free_exact": "free values, exact loss",
}
_STYLES = {"none": ":", "dropkey": "-", "dropout": "--"}


def _detail(row: pd.Series) -> str:
    """What distinguishes a setting within its regime."""
    if row["values"] == "fixed":
        return f"offset {row['value_offset']:g}, target {row['target']} hull"
    return f"logit lr x{row['logit_lr_multiplier']:g}"


def _setting(row: pd.Series) -> str:
    """The part of a cell that is neither r nor the step: one panel of the per-setting figures."""
    return f"{_REGIME_TITLES[row['regime']]}\n{_detail(row)}"


def _map_table(summary: dict) -> pd.DataFrame:
    """One row per cell: the paired peak difference's mean, SE, n and 95% t interval."""
    rows = []
    for label, entry in summary["cells"].items():
        cell = entry["cell"]
        row = {name: cell[name] for name in CELL_COLUMNS}
        row.update(label=label, **entry["peak_dropout_minus_dropkey"])
        rows.append(row)
    table = pd.DataFrame(rows)
    table["row"] = [f"{_detail(row)}, r={row['drop_ratio']:g}" for _, row in table.iterrows()]
    return table


def _draw_map(table: pd.DataFrame):
    """One panel per regime, one line per (setting, r), its training lengths side by side."""
    steps = sorted(set(table["step"]))
    regimes = [regime for regime in REGIMES if regime in set(table["regime"])]
    dodge = 0.6 / max(len(steps), 1)

    def draw(fig: plt.Figure) -> None:
        lines = [list(dict.fromkeys(table.loc[table["regime"] == regime, "row"])) for regime in regimes]
        axes = fig.subplots(len(regimes), 1, sharex=True, squeeze=False, height_ratios=[len(n) for n in lines])[:, 0]
        for ax, regime, names in zip(axes, regimes, lines, strict=False):
            part = table[table["regime"] == regime]
            for k, (colour, step) in enumerate(zip(PALETTE, steps, strict=False)):
                at = part[part["step"] == step]
                y = np.array([names.index(name) for name in at["row"]]) + (k - (len(steps) - 1) / 2) * dodge
                error = [at["mean"] - at["ci_low"], at["ci_high"] - at["mean"]]
                ax.errorbar(
                    at["mean"], y, xerr=error, fmt="o", color=colour, markersize=3, capsize=2, label=f"step {step}"
                )
            ax.axvline(0.0, color="k", linewidth=0.8)
            ax.set_yticks(np.arange(len(names)), names, fontsize=7)
            ax.set_ylim(len(names) - 0.5, -0.5)
            ax.set_title(_REGIME_TITLES[regime], fontsize=8)
        axes[-1].set_xlabel("peak(dropout) − peak(DropKey)   (> 0: DropKey smooths more; 95% t interval)")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncol=len(steps), fontsize=7)

    return draw


def _trajectory_table(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean and SE of ``column`` per (setting, regulariser, r, step) over problems."""
    keys = [c for c in CELL_COLUMNS if c != "step"] + ["regulariser", "step"]
    grouped = frame.groupby(keys, sort=True)[column].agg(mean="mean", sd="std", n="count").reset_index()
    grouped["se"] = grouped["sd"] / np.sqrt(grouped["n"])
    grouped = grouped.drop(columns="sd")
    grouped.insert(0, "setting", [_setting(row) for _, row in grouped.iterrows()])
    rank = grouped["regime"].map({regime: i for i, regime in enumerate(REGIMES)})
    grouped = grouped.assign(rank=rank).sort_values(["rank"] + keys, kind="stable").drop(columns="rank")
    # none does not depend on r (its rows repeat under every r): keep one copy.
    first_ratio = grouped["drop_ratio"] == grouped["drop_ratio"].min()
    return grouped[(grouped["regulariser"] != "none") | first_ratio].reset_index(drop=True)


def _draw_by_setting(table: pd.DataFrame, ylabel: str, log_y: bool):
    settings = list(dict.fromkeys(table["setting"]))
    ratios = sorted(set(table["drop_ratio"]))

    def draw(fig: plt.Figure) -> None:
        columns = min(4, len(settings))
        rows = -(-len(settings) // columns)
        axes = fig.subplots(rows, columns, sharex=True, squeeze=False).ravel()
        for ax, setting in zip(axes, settings, strict=False):
            part = table[table["setting"] == setting]
            for (regulariser, ratio), line in part.groupby(["regulariser", "drop_ratio"], sort=True):
                colour = "grey" if regulariser == "none" else PALETTE[ratios.index(ratio) % len(PALETTE)]
                label = regulariser if regulariser == "none" else f"{regulariser} r={ratio:g}"
                ax.plot(
                    line["step"],
                    line["mean"],
                    _STYLES[regulariser],
                    marker="o",
                    markersize=2.5,
                    color=colour,
                    label=label,
                )
            ax.set_xscale("log")
            if log_y:
                ax.set_yscale("log")
            ax.set_title(setting, fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("step", fontsize=7)
        for ax in axes[len(settings) :]:
            ax.set_visible(False)
        for ax in axes[::columns]:
            ax.set_ylabel(ylabel, fontsize=7)
        axes[0].legend(fontsize=5)

    return draw


def figures(frame: pd.DataFrame, summary: dict) -> list[Figure]:
    """The map (paired peak differences per cell), mean peaks by training length, and the gradient noise."""
    table = _map_table(summary)
    peaks = _trajectory_table(frame, "peak")
    masked = frame[(frame["regulariser"] != "none") & (frame["values"] == "free")]
    noise = _trajectory_table(masked, "grad_noise") if len(masked) else pd.DataFrame()
    n_settings = peaks["setting"].nunique()
    drawn = [
        make_figure(
            "regime-map",
            "The map: where DropKey smooths more than dropout",
            "One row per cell (setting, drop ratio and training length): mean over problems of the paired "
            "difference peak(dropout) − peak(DropKey) of the final attention, with its 95% t interval. Right of "
            "the zero line DropKey's attention is flatter, left of it dropout's.",
            "svg",
            table,
            _draw_map(table),
            size=(8.0, max(4.0, 0.3 * table["row"].nunique() + 2.0)),
        ),
        make_figure(
            "peak-by-length",
            "Peak attention weight against training length, per setting",
            "Mean over problems of max_j p_j at each recorded step (clean objective); solid DropKey, dashed "
            "dropout, dotted no regulariser; colours are drop ratios.",
            "svg",
            peaks,
            _draw_by_setting(peaks, "mean peak max p", log_y=False),
            size=(8.0, 2.2 * -(-n_settings // 4) + 0.4),
        ),
    ]
    if len(noise):
        drawn.append(
            make_figure(
                "gradient-noise",
                "Gradient noise on the logits with learned values",
                "Mean over problems of the per-mask logit gradient's variance (trace, over probe masks shared "
                "by the regularisers). DropKey's falls towards zero as training converges (at its optimum every "
                "mask's output is y); dropout's stays.",
                "svg",
                noise,
                _draw_by_setting(noise, "gradient variance", log_y=True),
                size=(8.0, 2.2 * -(-noise["setting"].nunique() // 4) + 0.4),
            )
        )
    return drawn


def equations() -> list[tuple[str, sp.Basic]]:
    """The definitions the page measures: (name, sympy expression)."""
    from simulations.pages.symbols import N, j, p, r, v, w

    return [
        ("exact expected training loss under DropKey (all 2^N masks b, P(b) = r^(N-|b|) (1-r)^|b|)",
         sp.Eq(sp.Symbol("E_b[L]"), sp.Sum(sp.Symbol("P(b)") * sp.Rational(1, 2)
                                            * (sp.Sum(w[j] * v[j], (j, 1, N)) - sp.Symbol("y")) ** 2,
                                            (sp.Symbol("b"), 1, 2 ** N)))),
        ("exact expected training loss under post-softmax dropout",
         sp.Eq(sp.Symbol("E_b[L_dropout]"), sp.Rational(1, 2) * (sp.Sum(p[j] * v[j], (j, 1, N)) - sp.Symbol("y")) ** 2
               + r / (2 * (1 - r)) * sp.Sum(p[j] ** 2 * v[j] ** 2, (j, 1, N)))),
    ]
