"""Figures of the gradient-mechanism page (:mod:`dropkey.lab.experiments.gradient_mechanism`).

Every point is a mean over mask passes of a paired difference (regulariser minus no regulariser) of
the first-order change of the clean attention of the probe set (the run's training images) along one
step of its gradient at the peak learning rate (a plain gradient step, and, in one figure, Adam's
preconditioned step); whiskers are 95 % t intervals over the passes (the replicates the claim reads).
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from reports.figures import PALETTE, Figure, make_figure

REGULARISERS = ("dropkey", "dropout")


def _cells(result) -> pd.DataFrame:
    return pd.read_csv(result.folder / "cells.csv")


def _whiskers(ax: plt.Axes, data: pd.DataFrame, x: str, label: str, colour, width: float = 1.2) -> None:
    half = (data["ci_high"] - data["ci_low"]) / 2
    ax.errorbar(data[x], data["mean"], yerr=half.fillna(0.0), fmt="-o", color=colour, label=label,
                linewidth=width, markersize=3, capsize=2)


def _panels(data: pd.DataFrame, x: str, lines: str, ylabel: str) -> Callable[[plt.Figure], None]:
    """One panel per (trained run, regulariser), one line per value of ``lines``."""

    def draw(fig: plt.Figure) -> None:
        arms = list(dict.fromkeys(data["trained_arm"]))
        axes = fig.subplots(len(arms), len(REGULARISERS), sharex=True, sharey=True, squeeze=False)
        for row, arm in enumerate(arms):
            for col, regulariser in enumerate(REGULARISERS):
                ax = axes[row][col]
                part = data[(data["trained_arm"] == arm) & (data["regulariser"] == regulariser)]
                for colour, (value, line) in zip(PALETTE, part.groupby(lines, sort=True), strict=False):
                    _whiskers(ax, line.sort_values(x), x, f"{lines} {value}", colour)
                ax.axhline(0.0, color="k", linewidth=0.7)
                ax.set_title(f"{arm} run: {regulariser} - none", fontsize=9)
                if row == len(arms) - 1:
                    ax.set_xlabel(x)
            axes[row][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=7)

    return draw


def _logit_ratio(result) -> pd.DataFrame:
    """Per trained run, regulariser and ratio: mean over batches and blocks of the log top/rest logit gradient."""
    probes = pd.read_csv(result.folder / "probes.csv")
    rows = probes[probes["metric"] == "log_top_rest_gradient"]
    per_batch = rows.groupby(["trained_arm", "epoch", "regulariser", "drop_ratio", "batch"], as_index=False)[
        "value"].mean()
    out = per_batch.groupby(["trained_arm", "epoch", "regulariser", "drop_ratio"], as_index=False)["value"].agg(
        mean="mean", sd="std", n="count")
    t = stats.t.isf(0.025, np.maximum(out["n"] - 1, 1))
    half = t * out["sd"] / np.sqrt(out["n"])
    return out.assign(ci_low=out["mean"] - half, ci_high=out["mean"] + half).drop(columns="sd")


def _compensation(result, ratio: float) -> pd.DataFrame:
    """Per probed run and checkpoint: the block-mean clean peak p and DropKey's exact E[w] peak at ``ratio``."""
    probes = pd.read_csv(result.folder / "probes.csv")
    clean = probes[probes["regulariser"] == "clean"]
    learned = clean[clean["metric"] == "peak"].assign(quantity="learned p")
    expected = clean[(clean["metric"] == "expected_peak") & np.isclose(clean["drop_ratio"], ratio)].assign(
        quantity=f"E[w] under DropKey r={ratio:g}")
    rows = pd.concat([learned, expected], ignore_index=True)
    return rows.groupby(["trained_arm", "quantity", "epoch"], as_index=False)["value"].mean()


def mechanism_figures(result) -> list[Figure]:
    cells = _cells(result)
    probed = np.array(sorted(set(cells["drop_ratio"])))  # the scale's ratio, or the probed one closest to it
    ratio = float(probed[np.argmin(np.abs(probed - float(result.config["scale"]["drop_ratio"])))])
    plain, adam = cells[cells["step"] == "sgd"], cells[cells["step"] == "adam"]
    by_block = plain[(plain["metric"] == "peak") & np.isclose(plain["drop_ratio"], ratio)]
    by_ratio = plain[(plain["metric"] == "peak") & (plain["block"] == -1)]
    entropy = plain[(plain["metric"] == "entropy") & np.isclose(plain["drop_ratio"], ratio)]
    adam_peak = adam[(adam["metric"] == "peak") & (adam["block"] == -1)]
    logit = _logit_ratio(result)
    compensation = _compensation(result, ratio)

    def draw_compensation(fig: plt.Figure) -> None:
        ax = fig.add_subplot()
        styles = {"learned p": "-o", f"E[w] under DropKey r={ratio:g}": "--s"}
        for colour, (arm, part) in zip(PALETTE, compensation.groupby("trained_arm", sort=False), strict=False):
            for quantity, line in part.groupby("quantity", sort=False):
                ax.plot(line["epoch"], line["value"], styles[quantity], color=colour, label=f"{arm} run: {quantity}",
                        markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean clean peak weight (block mean)")
        ax.legend(fontsize=7)

    def draw_logit(fig: plt.Figure) -> None:
        arms = list(dict.fromkeys(logit["trained_arm"]))
        axes = fig.subplots(1, len(arms), sharey=True, squeeze=False)[0]
        for ax, arm in zip(axes, arms, strict=True):
            part = logit[logit["trained_arm"] == arm]
            for colour, ((regulariser, r), line) in zip(PALETTE, part.groupby(["regulariser", "drop_ratio"]),
                                                        strict=False):
                label = "none" if regulariser == "none" else f"{regulariser} r={r:g}"
                _whiskers(ax, line.sort_values("epoch"), "epoch", label, colour, 1.6 if regulariser == "none" else 1)
            ax.set_title(f"{arm} run", fontsize=9)
            ax.set_xlabel("epoch")
        axes[0].set_ylabel("log(|E dL/ds_top| / mean |E dL/ds_other|)")
        axes[-1].legend(fontsize=6)

    return [
        make_figure("peak-step-by-block", f"Peak change per gradient step, regulariser - none, by block (r={ratio:g})",
                    "First-order change of each block's clean attention peak along one plain step of the expected "
                    "gradient at the peak learning rate (block -1: the mean over blocks), paired by mask pass; "
                    "whiskers: 95% t interval over passes. The claim reads block -1.",
                    "svg", by_block, _panels(by_block, "epoch", "block", "peak change per step"), size=(8.0, 6.0)),
        make_figure("peak-step-by-ratio", "Peak change per gradient step (block mean), regulariser - none, by ratio",
                    "Block mean, one line per checkpoint epoch; whiskers: 95% t interval over mask passes.",
                    "svg", by_ratio, _panels(by_ratio, "drop_ratio", "epoch", "peak change per step"),
                    size=(8.0, 6.0)),
        make_figure("entropy-step-by-block", f"Entropy change per gradient step, regulariser minus none (r={ratio:g})",
                    "As the peak figure, for the mean clean attention entropy (nats).", "svg", entropy,
                    _panels(entropy, "epoch", "block", "entropy change per step (nats)"), size=(8.0, 6.0)),
        make_figure("peak-adam-step-by-ratio", "Peak change per AdamW step (block mean), regulariser minus none",
                    "The same difference along Adam's preconditioned step (the checkpoint's own second moments): "
                    "shown, not decided (it weighs every parameter alike, so noise-dominated coordinates count as much "
                    "as the rest).", "svg", adam_peak,
                    _panels(adam_peak, "drop_ratio", "epoch", "peak change per AdamW step"), size=(8.0, 6.0)),
        make_figure("compensation", "Learned peaks and DropKey's expected peaks over training",
                    "Block-mean clean attention peak of each probed run at its checkpoints (its training images), "
                    "and the peak of DropKey's exact E[w] of the same rows (theory.expected_attention). The "
                    "compensation hypothesis: the DropKey run's p is sharper than the plain run's while its E[w] "
                    "stays near the plain run's p. One seed each: descriptive (the registered claim needs the "
                    "outcome experiments' seeds).", "svg", compensation, draw_compensation, size=(7.0, 3.6)),
        make_figure("logit-gradient-ratio", "Expected logit gradient of the most-attended key against the others",
                    "The real-ViT counterpart of the Lagrangian argument (Eq. 11): per row, the log ratio of the "
                    "expected gradient's magnitude on the row's most-attended key (clean weights) to the mean over "
                    "its other keys; mean over blocks, 95% t interval over probe batches.", "svg", logit, draw_logit,
                    size=(8.0, 3.5)),
    ]


__all__ = ["mechanism_figures"]
