"""Figures of the real-ViT experiment pages (one result folder of :mod:`dropkey.lab.experiments` each).

Every curve is the mean over seeds with a band of +-1 standard error (over seeds); every
bar is a paired difference with its 95% t interval over seeds (the interval the verdicts read). Figures
are deterministic SVG via :func:`reports.figures.make_figure`, each with the table it plots.
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from reports.figures import PALETTE, Figure, make_figure
from reports.mechanism_figures import mechanism_figures


def _mean_se(frame: pd.DataFrame, by: list[str], column: str) -> pd.DataFrame:
    """Mean, SE over seeds and n of ``column`` per ``by`` group (seeds are the replicates)."""
    grouped = frame.groupby(by, sort=True)[column]
    out = grouped.agg(mean="mean", sd="std", n="count").reset_index()
    out["se"] = out["sd"] / np.sqrt(out["n"])
    return out.drop(columns="sd")


def _band(ax: plt.Axes, frame: pd.DataFrame, x: str, label: str, colour) -> None:
    ax.plot(frame[x], frame["mean"], "-", color=colour, label=label, linewidth=1.4)
    se = frame["se"].fillna(0.0)
    ax.fill_between(frame[x], frame["mean"] - se, frame["mean"] + se, color=colour, alpha=0.2, linewidth=0)


def _arm_order(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["arm"]))


def _curves_by_arm(data: pd.DataFrame, x: str, ylabel: str, facet: str | None = None) -> Callable[[plt.Figure], None]:
    """Draw mean +- SE curves per arm, one panel per value of ``facet`` (or a single panel)."""

    def draw(fig: plt.Figure) -> None:
        panels = sorted(set(data[facet])) if facet else [None]
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        arms = _arm_order(data)
        for ax, panel in zip(axes, panels, strict=True):
            part = data if panel is None else data[data[facet] == panel]
            for colour, arm in zip(PALETTE, arms, strict=False):
                _band(ax, part[part["arm"] == arm], x, arm, colour)
            ax.set_xlabel(x)
            if panel is not None:
                ax.set_title(f"{facet} {panel}", fontsize=9)
        axes[0].set_ylabel(ylabel)
        axes[-1].legend(fontsize=7)

    return draw


def _half_width(frame: pd.DataFrame) -> np.ndarray:
    """Half-width of the 95% t interval over seeds (0 where n < 2: no interval)."""
    n = frame["n"].to_numpy(dtype=float)
    t = np.where(n >= 2, stats.t.isf(0.025, np.maximum(n - 1, 1)), 0.0)
    return t * frame["standard_error"].fillna(0.0).to_numpy(dtype=float)


def _bars(data: pd.DataFrame, xlabel: str) -> Callable[[plt.Figure], None]:
    """Horizontal bars of paired differences with 95% t-interval whiskers."""

    def draw(fig: plt.Figure) -> None:
        ax = fig.add_subplot()
        y = np.arange(len(data))
        err = _half_width(data)
        colours = [PALETTE[0] if abs(v) > e else PALETTE[7] for v, e in zip(data["value"], err, strict=True)]
        ax.barh(y, data["value"], xerr=err, color=colours, capsize=3)
        ax.axvline(0.0, color="k", linewidth=0.8)
        ax.set_yticks(y, data["quantity"], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)

    return draw


def _differences(result, quantities: list[str]) -> pd.DataFrame:
    table = result.comparisons
    rows = table[table["quantity"].isin(quantities) & (table["group"] == "") & (table["layer"] == -1)]
    return rows.set_index("quantity").loc[[q for q in quantities if q in set(rows["quantity"])]].reset_index()[
        ["quantity", "value", "standard_error", "n", "description"]
    ]


def _accuracy_curves(result, slug: str = "test-accuracy") -> Figure:
    evaluated = result.runs.dropna(subset=["test_acc"])  # epochs with a test evaluation (eval_every)
    data = _mean_se(evaluated.assign(top1=100 * evaluated["test_acc"]), ["arm", "epoch"], "top1")
    return make_figure(
        slug, "Test accuracy over training", "Epochs with a test evaluation; mean over seeds, band ±1 SE.", "svg", data,
        _curves_by_arm(data, "epoch", "test top-1 (%)"),
    )


def _difference_figure(result, slug: str, title: str, quantities: list[str], xlabel: str) -> Figure:
    data = _differences(result, quantities)
    return make_figure(
        slug, title, "Paired by seed; whiskers: 95% t interval over seeds; blue bars: the interval excludes 0.",
        "svg", data, _bars(data, xlabel), size=(7.0, 0.5 + 0.35 * max(len(data), 2)),
    )


# --- per experiment ---------------------------------------------------------------------------------


def _attention_metric(result, metric: str) -> pd.DataFrame:
    rows = result.attention[(result.attention["metric"] == metric) & (result.attention["other_layer"] < 0)]
    return _mean_se(rows.rename(columns={"layer": "block"}), ["arm", "block", "epoch"], "value")


def attention_dynamics_figures(result) -> list[Figure]:
    peak, entropy = _attention_metric(result, "peak"), _attention_metric(result, "entropy")
    grads = result.attention[(result.attention["other_layer"] < 0)
                             & result.attention["metric"].isin(["abs_grad_top", "abs_grad_rest"])]
    wide = grads.pivot_table(index=["arm", "seed", "epoch", "layer"], columns="metric", values="value").reset_index()
    wide["ratio"] = wide["abs_grad_top"] / wide["abs_grad_rest"]
    ratio = _mean_se(wide.groupby(["arm", "seed", "epoch"], as_index=False)["ratio"].mean(), ["arm", "epoch"], "ratio")
    by_block = result.comparisons[result.comparisons["quantity"].str.endswith("_by_block")]
    by_block = by_block.assign(
        quantity=by_block["quantity"].str.replace("_by_block", "") + " block " + by_block["layer"].astype(str)
    )
    modes = pd.concat([
        _mean_se(result.finals, ["arm"], column).assign(metric=metric, mode=mode)
        for metric, mode, column in (("peak", "learned p (test time)", "learned_peak"),
                                     ("peak", "E[w] under the masks", "expected_peak"),
                                     ("entropy", "learned p (test time)", "learned_entropy"),
                                     ("entropy", "E[w] under the masks", "expected_entropy"))
    ], ignore_index=True)

    def draw_modes(fig: plt.Figure) -> None:
        axes = fig.subplots(1, 2)
        arms = _arm_order(result.finals)
        for ax, metric in zip(axes, ("peak", "entropy"), strict=True):
            part = modes[modes["metric"] == metric]
            width = 0.38
            for offset, (colour, mode) in zip(
                (-width / 2, width / 2),
                zip(PALETTE, ("learned p (test time)", "E[w] under the masks"), strict=False),  # the first 2 colours
                strict=True,
            ):
                rows = part[part["mode"] == mode].set_index("arm").loc[arms]
                ax.bar(np.arange(len(arms)) + offset, rows["mean"], width, yerr=2 * rows["se"].fillna(0),
                       color=colour, capsize=3, label=mode)
            ax.set_xticks(np.arange(len(arms)), arms)
            ax.set_ylabel(f"final {metric} (mean over blocks)")
            low = (part["mean"] - 2 * part["se"].fillna(0)).min()
            high = (part["mean"] + 2 * part["se"].fillna(0)).max()
            ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
        axes[0].legend(fontsize=7)

    return [
        make_figure("learned-versus-expected", "Final attention: learned p and its expectation under the masks",
                    "Left bars: the trained model's attention p as used at test time (no drop); right bars: E[w] under "
                    "its regulariser, exact (theory.expected_attention on the same rows; = p for none and dropout), "
                    "what a training step sees on average. Rows of the first 8 diagnostics images. "
                    "Whiskers ±2 SE over seeds.",
                    "svg", modes.dropna(subset=["mean"]), draw_modes),
        make_figure("peak", "Peak attention weight per block over training",
                    "max_j w_ij in eval mode on a fixed test batch, mean over heads, queries and seeds (band ±1 SE).",
                    "svg", peak, _curves_by_arm(peak, "epoch", "peak weight", facet="block"), size=(9.0, 3.2)),
        make_figure("entropy", "Attention entropy per block over training",
                    "Entropy of each attention row (nats), mean over heads, queries and seeds (band ±1 SE).",
                    "svg", entropy, _curves_by_arm(entropy, "epoch", "entropy (nats)", facet="block"), size=(9.0, 3.2)),
        make_figure("gradient-ratio", "Gradient on the most-attended logit against the rest",
                    "|dL/ds| on the peak key over the mean |dL/ds| on the other kept keys, mean over blocks "
                    "(band ±1 SE).",
                    "svg", ratio, _curves_by_arm(ratio, "epoch", "|grad top| / |grad rest|")),
        make_figure("final-differences", "Final-epoch differences against no regulariser, per block",
                    "Paired by seed; whiskers ±2 SE.", "svg", by_block[["quantity", "value", "standard_error", "n"]],
                    _bars(by_block, "difference"), size=(7.0, 0.5 + 0.3 * max(len(by_block), 2))),
    ]


def accuracy_figures(result) -> list[Figure]:
    return [
        _accuracy_curves(result),
        _difference_figure(result, "differences", "Top-1 differences",
                           ["top1_dropkey_minus_none", "top1_dropkey_minus_dropout", "top1_dropout_minus_none"],
                           "percentage points"),
    ]


def schedules_figures(result) -> list[Figure]:
    rows = []
    for arm in result.config["arms"]:
        ratios = arm["drop_ratio"] if isinstance(arm["drop_ratio"], list) else None
        depth = len(ratios) if ratios else int(result.finals["depth"].iloc[0])
        for block in range(depth):
            rows.append(
                {"arm": arm["name"], "block": block, "mean": ratios[block] if ratios else arm["drop_ratio"], "se": 0.0}
            )
    ratios = pd.DataFrame(rows)
    return [
        make_figure("ratios", "Drop ratio per block", "The three schedules share the same mean ratio.", "svg",
                    ratios, _curves_by_arm(ratios, "block", "drop ratio")),
        _accuracy_curves(result),
        _difference_figure(result, "differences", "Top-1 differences between schedules",
                           ["top1_decreasing_minus_constant", "top1_decreasing_minus_increasing",
                            "top1_increasing_minus_constant"], "percentage points"),
    ]


def alignment_figures(result) -> list[Figure]:
    table = result.comparisons
    mc = table[table["quantity"].str.match(r"top1_mc\d+_minus_plain")].copy()
    mc["k"] = mc["quantity"].str.extract(r"top1_mc(\d+)_")[0].astype(int)
    mc = mc.sort_values("k")[["k", "value", "standard_error", "n"]]
    finetune = _differences(result, ["top1_finetune_minus_plain"])

    def draw(fig: plt.Figure) -> None:
        ax = fig.add_subplot()
        ax.errorbar(mc["k"], mc["value"], yerr=2 * mc["standard_error"].fillna(0), fmt="o-", color=PALETTE[0],
                    capsize=3, label="Monte-Carlo inference (K passes)")
        if len(finetune):
            value, se = float(finetune["value"].iloc[0]), float(finetune["standard_error"].fillna(0).iloc[0])
            ax.axhline(value, color=PALETTE[1], label="fine-tuned without DropKey")
            ax.axhspan(value - 2 * se, value + 2 * se, color=PALETTE[1], alpha=0.15, linewidth=0)
        ax.axhline(0.0, color="k", linewidth=0.8, label="plain inference")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (stochastic passes averaged)")
        ax.set_ylabel("top-1 minus plain inference (pp)")
        ax.legend(fontsize=7)

    return [
        make_figure("monte-carlo", "Monte-Carlo inference and fine-tuning against plain inference",
                    "Paired by seed; whiskers and band ±2 SE.", "svg", mc, draw),
        _accuracy_curves(result),
    ]


def drop_ratio_figures(result) -> list[Figure]:
    table = result.comparisons
    sweep = table[table["quantity"].str.match(r"(top1|gap|peak)_dropkey_r[\d.]+_minus_none$")].copy()
    sweep["ratio"] = sweep["quantity"].str.extract(r"_r([\d.]+)_")[0].astype(float)
    sweep["measure"] = sweep["quantity"].str.extract(r"^(top1|gap|peak)_")[0]
    sweep = sweep.sort_values(["measure", "ratio"])[["measure", "ratio", "value", "standard_error", "n"]]
    labels = {"top1": "test top-1 (pp)", "gap": "train − test gap (pp)", "peak": "attention peak"}

    def draw(fig: plt.Figure) -> None:
        measures = [m for m in labels if m in set(sweep["measure"])]
        axes = fig.subplots(1, len(measures), squeeze=False)[0]
        for ax, measure in zip(axes, measures, strict=True):
            part = sweep[sweep["measure"] == measure]
            ax.errorbar(part["ratio"], part["value"], yerr=2 * part["standard_error"].fillna(0), fmt="o-",
                        color=PALETTE[0], capsize=3)
            ax.axhline(0.0, color="k", linewidth=0.8)
            ax.set_xlabel("constant drop ratio r")
            ax.set_ylabel(f"DropKey − none: {labels[measure]}")

    return [
        make_figure("sensitivity", "DropKey against no regulariser at each drop ratio",
                    "Paired by seed; whiskers ±2 SE over seeds.", "svg", sweep, draw, size=(9.0, 3.0)),
        _accuracy_curves(result),
    ]


def structured_figures(result) -> list[Figure]:
    return [
        _accuracy_curves(result),
        _difference_figure(result, "differences", "Structured masks against DropKey",
                           ["top1_block_minus_dropkey", "top1_cross_minus_dropkey",
                            "peak_block_minus_dropkey", "peak_cross_minus_dropkey"], "difference (pp for top1)"),
    ]


def collapse_figures(result) -> list[Figure]:
    finals = result.finals.assign(
        similarity_rise=result.finals["top_similarity_centred"] - result.finals["top_similarity_centred_init"])
    by_depth = _mean_se(finals, ["arm", "depth"], "top_similarity_centred")
    accuracy = _mean_se(finals, ["arm", "depth"], "top1")
    rise = _mean_se(finals, ["arm", "depth"], "similarity_rise")
    cosine = _mean_se(finals, ["arm", "depth"], "top_similarity")
    deepest = int(finals["depth"].max())
    keys = set(finals[finals["depth"] == deepest]["run_key"])
    rows = result.attention[
        result.attention["run_key"].isin(keys) & (result.attention["metric"] == "similarity_centred")
    ]
    last = rows[rows["epoch"] == rows.groupby("run_key")["epoch"].transform("max")]
    pairs = _mean_se(last.rename(columns={"layer": "block"}), ["arm", "block"], "value")
    return [
        make_figure("centred-similarity-by-depth", "Top-block centred similarity against depth, after training",
                    "Pearson correlation of attention-map columns between adjacent top blocks (the maps that multiply "
                    "V), mean over seeds, band ±1 SE.",
                    "svg", by_depth, _curves_by_arm(by_depth, "depth", "top-block centred similarity")),
        make_figure("similarity-rise-by-depth", "Rise of the top-block centred similarity over initialisation",
                    "Trained minus the same network at initialisation (the collapse claim reads the plain arm's trend "
                    "in depth); band ±1 SE over seeds.",
                    "svg", rise, _curves_by_arm(rise, "depth", "centred similarity: trained − init")),
        make_figure("centred-similarity-by-block", f"Centred similarity of block b and b + 1 (depth {deepest})",
                    "At the final epoch; band ±1 SE over seeds.",
                    "svg", pairs, _curves_by_arm(pairs, "block", "centred similarity(b, b+1)")),
        make_figure("cosine-similarity-by-depth", "DeepViT's uncentred cosine similarity against depth (reference)",
                    "DeepViT's own definition, shown for reference only: near-uniform maps score ~1 on it "
                    "(an untrained network does), and Re-attention's BatchNorm shifts its maps, "
                    "so it decides no claim here.",
                    "svg", cosine, _curves_by_arm(cosine, "depth", "top-block cosine similarity")),
        make_figure("accuracy-by-depth", "Test top-1 against depth",
                    "Final test top-1, mean over seeds, band ±1 SE (DeepViT: a plain ViT's accuracy saturates with "
                    "depth, Re-attention lets deeper nets improve).",
                    "svg", accuracy, _curves_by_arm(accuracy, "depth", "test top-1 (%)")),
        _difference_figure(result, "differences", "Collapse remedies at the deepest depth (centred similarity)",
                           ["centred_similarity_reattention_minus_plain", "centred_similarity_dropkey_minus_plain",
                            "centred_similarity_both_minus_reattention", "collapse_trend_plain"],
                           "centred similarity difference (no entropy adjustment in this figure)"),
    ]


FIGURES: dict[str, Callable] = {
    "attention_dynamics": attention_dynamics_figures,
    "accuracy": accuracy_figures,
    "schedules": schedules_figures,
    "alignment": alignment_figures,
    "structured": structured_figures,
    "drop_ratio": drop_ratio_figures,
    "collapse": collapse_figures,
    "gradient_mechanism": mechanism_figures,
}


def experiment_figures(result) -> list[Figure]:
    """The figures of one experiment result (an :class:`dropkey.lab.experiments.ExperimentResult`)."""
    figures = FIGURES[result.name](result)
    for figure in figures:  # a NaN would silently vanish from a plot (an SE is NaN for one seed: allowed)
        values = figure.data.select_dtypes("number").drop(columns=["se", "standard_error"], errors="ignore")
        if not np.isfinite(values.to_numpy(dtype=float)).all():
            raise ValueError(f"figure {figure.slug} of {result.name}: non-finite values in its data")
    return figures


__all__ = ["FIGURES", "experiment_figures"]
