"""The index's forest plot: every empirical finding's interval against its smallest effect that matters.

Quantities of different claims have different units, so each interval is drawn in units of its
own registered smallest effect e: the shaded band [-1, 1] holds every effect too small to matter.
For claims of a rise or a fall ("up", "down") the axis is oriented so that the claimed direction
points right (a "down" quantity's sign is flipped); "no-gain" and "equal" quantities are drawn
as measured. Beyond +-2 the axis is logarithmic, so large effects stay on the page.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from reports.figures import Figure, make_figure
from reports.verdicts import Claim, Finding

OUTCOME_COLOURS = {"confirmed": "#1b7a36", "contradicted": "#b3261e", "inconclusive": "#9a6b00",
                   "not yet measured": "#777777"}


#: A quantity measured in more cells than this is drawn on one line, its cells' intervals overlaid.
MAX_CELL_LINES = 4


def forest_table(items: Sequence[tuple[Claim, Finding]]) -> pd.DataFrame:
    """One row per finding: claim, quantity, cell, the line it is drawn on, oriented standardised interval."""
    rows = []
    counts: dict[tuple[str, str], int] = {}
    for claim, finding in items:
        counts[(claim.id, finding.quantity.name)] = counts.get((claim.id, finding.quantity.name), 0) + 1
    for claim, finding in items:
        d = finding.decision
        sign = -1.0 if d.direction == "down" else 1.0
        low, high = sorted((sign * d.ci_low / d.smallest_effect, sign * d.ci_high / d.smallest_effect))
        cells = counts[(claim.id, finding.quantity.name)]
        if cells > MAX_CELL_LINES:
            line = f"{claim.id}: {finding.quantity.name} ({cells} cells)"
        else:
            line = f"{claim.id}: {finding.quantity.name}" + (f" [{finding.label}]" if finding.label else "")
        rows.append({"line": f"{line} ({d.direction})", "claim": claim.id, "quantity": finding.quantity.name,
                     "cell": finding.label, "direction": d.direction, "smallest_effect": d.smallest_effect, "n": d.n,
                     "mean": d.mean, "ci_low": d.ci_low, "ci_high": d.ci_high, "outcome": d.outcome,
                     "oriented_mean": sign * d.mean / d.smallest_effect, "oriented_low": low, "oriented_high": high})
    return pd.DataFrame(rows)


def forest_figure(items: Sequence[tuple[Claim, Finding]]) -> Figure | None:
    """The forest plot (None when no empirical claim was measured)."""
    table = forest_table(items)
    measured = table[np.isfinite(table["oriented_mean"])] if len(table) else table
    if not len(measured):
        return None
    lines = list(dict.fromkeys(measured["line"]))
    position = {line: len(lines) - 1 - i for i, line in enumerate(lines)}

    def draw(fig) -> None:
        ax = fig.add_subplot()
        ax.axvspan(-1.0, 1.0, color="#e8e8e8", zorder=0, label="|effect| < smallest that matters")
        ax.axvline(0.0, color="#444444", linewidth=0.8)
        for row in measured.itertuples():
            colour = OUTCOME_COLOURS[row.outcome]
            many = row.line.endswith("cells) (" + row.direction + ")")
            yi = position[row.line]
            ax.plot([row.oriented_low, row.oriented_high], [yi, yi], color=colour,
                    linewidth=0.9 if many else 1.6, alpha=0.45 if many else 1.0)
            ax.plot([row.oriented_mean], [yi], "|" if many else "o", color=colour, markersize=6 if many else 3.5)
        ax.set_xscale("symlog", linthresh=2.0)
        low = min(-2.0, float(measured["oriented_low"].min()))
        high = max(2.0, float(measured["oriented_high"].max()))
        ticks = [t for t in (-1000, -100, -10, -2, -1, 0, 1, 2, 10, 100, 1000) if low * 1.5 <= t <= high * 1.5]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_yticks([position[line] for line in lines], lines, fontsize=6.5)
        ax.set_ylim(-0.8, len(lines) - 0.2)
        ax.set_xlabel("effect / smallest effect that matters (claimed rise or fall points right; |x| > 2 log scale)")
        for outcome, colour in OUTCOME_COLOURS.items():
            if outcome in set(measured["outcome"]):
                ax.plot([], [], color=colour, linewidth=1.6, label=outcome)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.9 / (1.6 + 0.2 * len(lines))),
                  ncol=4, frameon=False)

    return make_figure(
        "forest", "Every empirical finding: 95% interval against the smallest effect that matters",
        "One line per quantity (a quantity measured in many cells, e.g. the toy regime map, overlays its cells' "
        "intervals on one line: ticks are cell means), coloured by outcome; each interval is divided by its own "
        "registered smallest effect, so the grey band holds the effects too small to matter. The claims table below "
        "lists every cell.",
        "svg", table, draw, size=(9.0, 1.6 + 0.2 * len(lines)),
    )
