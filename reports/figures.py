"""Figures of the study pages, as deterministic inline SVG (line plots) or PNG data URIs (dense plots).

Determinism: a fixed ``svg.hashsalt``, no date or creator metadata, PNG without
the Software tag, fixed sizes and dpi, sorted data. The SVG is inlined in HTML5,
so its XML header, doctype, metadata block and namespace declarations (which
contain w3.org URLs, not fetched but flagged by a network scan) are removed.

Each figure also returns the (small, aggregated) table it plots, embedded in the
page as a CSV download.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from reports.html import data_uri  # noqa: E402

log = logging.getLogger(__name__)

STYLE = {
    "svg.hashsalt": "dropkey-lab",
    "svg.fonttype": "path",  # glyphs as paths: no font files needed offline
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "figure.dpi": 100,
    "font.size": 9,
}
PALETTE = sns.color_palette("colorblind", 10)


@dataclass(frozen=True)
class Figure:
    slug: str
    title: str
    caption: str
    kind: str  # "svg" or "png"
    markup: str  # inline <svg> or <img src="data:...">
    data: pd.DataFrame


def _svg_markup(figure: matplotlib.figure.Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = re.sub(r"<\?xml[^>]*\?>\s*", "", text)
    text = re.sub(r"<!DOCTYPE[^>]*>\s*", "", text, flags=re.S)
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    return text.strip()


def _png_markup(figure: matplotlib.figure.Figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return f'<img alt="{alt}" src="{data_uri(buffer.getvalue(), "image/png")}">'


def make_figure(
    slug: str, title: str, caption: str, kind: str, data: pd.DataFrame, draw: Callable[[plt.Figure], None],
    size: tuple[float, float] = (7.0, 3.6),
) -> Figure:
    """Draw with ``draw(fig)`` under the report style and serialise as ``kind``."""
    with plt.rc_context(STYLE), sns.axes_style("whitegrid"):
        figure = plt.figure(figsize=size, layout="constrained")
        try:
            draw(figure)
            markup = _svg_markup(figure) if kind == "svg" else _png_markup(figure, title)
        finally:
            plt.close(figure)
    return Figure(slug, title, caption, kind, markup, data.reset_index(drop=True))


# --- coefficients -------------------------------------------------------------------------------


def coefficients_figures(frame: pd.DataFrame, summary: dict) -> list[Figure]:
    first = frame[frame["repeat"] == frame["repeat"].min()]
    n_max = int(first["n_keys"].max())
    shape = "vit_like" if "vit_like" in set(first["shape"]) else sorted(set(first["shape"]))[0]
    convention = "zero" if "zero" in set(first["all_dropped"]) else sorted(set(first["all_dropped"]))[0]
    row = first[(first["n_keys"] == n_max) & (first["shape"] == shape) & (first["all_dropped"] == convention)]
    row = row[["drop_ratio", "key", "p", "c_exact", "c_estimate", "ci_low", "ci_high"]].sort_values(["drop_ratio", "key"])

    def draw_rank(fig: plt.Figure) -> None:
        ax = fig.add_subplot()
        for colour, (r, group) in zip(PALETTE, row.groupby("drop_ratio", sort=True)):
            ax.plot(group["p"], group["c_exact"], "-", color=colour, label=f"exact, r={r:g}")
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
        for colour, (n, group) in zip(PALETTE, coverage.groupby("n_keys", sort=True)):
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


# --- gradient damping ---------------------------------------------------------------------------


def gradient_damping_figures(frame: pd.DataFrame, summary: dict) -> list[Figure]:
    damping = frame.assign(
        mc=frame["ratio_mc"] / frame["ratio_undamped"],
        exact=frame["ratio_exact"] / frame["ratio_undamped"],
        first_order=frame["ratio_first_order"] / frame["ratio_undamped"],
    )
    medians = damping.groupby(["beta_mean", "drop_ratio"], sort=True)[["mc", "exact", "first_order"]].median().reset_index()

    def draw_medians(fig: plt.Figure) -> None:
        groups = list(medians.groupby("beta_mean", sort=True))
        axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
        for ax, (beta_mean, group) in zip(axes, groups):
            ax.plot(group["drop_ratio"], group["mc"], "o-", color=PALETTE[0], label="Monte-Carlo")
            if group["exact"].notna().any():
                ax.plot(group["drop_ratio"], group["exact"], "s--", color=PALETTE[1], label="exact (enumeration)")
            ax.plot(group["drop_ratio"], group["first_order"], "^:", color=PALETTE[2], label="first order c_s p_s/(c_t p_t)")
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


# --- toy optimisation -----------------------------------------------------------------------------


def _run_label(regulariser: str, r: float) -> str:
    return regulariser if regulariser == "none" else f"{regulariser} r={r:g}"


def toy_optimisation_figures(frame: pd.DataFrame, summary: dict) -> list[Figure]:
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
        for colour, ((regulariser, r), group) in zip(PALETTE, runs):
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
        labels = [_run_label(g, r) for g, r in zip(final["regulariser"], final["drop_ratio"])]
        colours = [PALETTE[["none", "dropkey", "dropout", "dropattention"].index(g) % 10] for g in final["regulariser"]]
        ax.bar(range(len(final)), final["mean"], yerr=final["se"], color=colours)
        ax.set_xticks(range(len(final)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("final peak weight (mean ± SE)")

    return [
        make_figure(
            "trajectories", "Peak attention weight and loss during training",
            "Means over problems on the clean objective; DropAttention coincides with DropKey for one query and is not drawn.",
            "svg", trajectories, draw_trajectories, size=(8.0, 3.6),
        ),
        make_figure(
            "final-peak", "Final peak weight by regulariser", "Lower is smoother attention.", "svg", final, draw_final,
        ),
    ]


# --- train/test mismatch ----------------------------------------------------------------------------


def train_test_mismatch_figures(frame: pd.DataFrame, summary: dict) -> list[Figure]:
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
        for colour, (r, group) in zip(PALETTE, cell.groupby("drop_ratio", sort=True)):
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
        for colour, (n, group) in zip(PALETTE, gaps.groupby("n_keys", sort=True)):
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
            "relative-gap", "Train/test gap by drop ratio", "Median over problems and row shapes.", "svg", gaps, draw_gap,
        ),
    ]


# --- structured masks ---------------------------------------------------------------------------------

_VARIANT_COLOURS = {"dropkey": PALETTE[0], "block": PALETTE[1], "cross": PALETTE[2]}


def _largest_grid(frame: pd.DataFrame) -> str:
    sizes = frame.groupby("grid")["n_keys"].first()
    return str(sizes.idxmax())


def structured_masks_figures(frame: pd.DataFrame, summary: dict) -> list[Figure]:
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
            for k, r in enumerate(ratios):
                ax = axes[i][k]
                cell = points[(points["shape"] == shape) & (points["drop_ratio"] == r)]
                for variant, group in cell.groupby("variant", sort=True):
                    ax.plot(group["p"], group["c_eff"], ".", color=_VARIANT_COLOURS.get(variant, PALETTE[3]),
                            alpha=0.7, markersize=3, label=f"{variant} (MC)")
                exact = cell[cell["variant"] == cell["variant"].iloc[0]].sort_values("p")
                ax.plot(exact["p"], exact["c_dropkey"], "k-", linewidth=0.8, label="DropKey exact")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{shape}, r={r:g}", fontsize=8)
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
        for ax, shape in zip(axes, shapes):
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
        for ax, shape in zip(axes, shapes):
            sub = structured[(structured["shape"] == shape) & (structured["grid"] == grid)]
            for variant, group in sub.groupby("variant", sort=True):
                colour = _VARIANT_COLOURS.get(variant, PALETTE[3])
                ax.plot(group["drop_ratio"], group["p_weighted_rel_c_diff"], "o-", color=colour, label=f"{variant}: total")
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


def _toy_regimes_figures(frame: pd.DataFrame, summary: dict) -> list[Figure]:
    from reports.toy_regimes_figures import toy_regimes_figures  # it builds on this module: imported on use

    return toy_regimes_figures(frame, summary)


FIGURES: dict[str, Callable[[pd.DataFrame, dict], list[Figure]]] = {
    "coefficients": coefficients_figures,
    "gradient_damping": gradient_damping_figures,
    "toy_optimisation": toy_optimisation_figures,
    "train_test_mismatch": train_test_mismatch_figures,
    "structured_masks": structured_masks_figures,
    "toy_regimes": _toy_regimes_figures,
}


def study_figures(name: str, frame: pd.DataFrame, summary: dict) -> list[Figure]:
    """The figures of a study page ([] for a study without figures, e.g. the theory)."""
    make = FIGURES.get(name)
    return make(frame, summary) if make else []
