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


def forest_table(items: Sequence[tuple[Claim, Finding]]) -> pd.DataFrame:
    """One row per finding: claim, quantity, cell, direction, e, oriented standardised mean and interval."""
    rows = []
    for claim, finding in items:
        d = finding.decision
        sign = -1.0 if d.direction == "down" else 1.0
        low, high = sorted((sign * d.ci_low / d.smallest_effect, sign * d.ci_high / d.smallest_effect))
        rows.append({"claim": claim.id, "quantity": finding.quantity.name, "cell": finding.label,
                     "direction": d.direction, "smallest_effect": d.smallest_effect, "n": d.n,
                     "mean": d.mean, "ci_low": d.ci_low, "ci_high": d.ci_high, "outcome": d.outcome,
                     "oriented_mean": sign * d.mean / d.smallest_effect, "oriented_low": low, "oriented_high": high})
    return pd.DataFrame(rows)


def forest_figure(items: Sequence[tuple[Claim, Finding]]) -> Figure | None:
    """The forest plot (None when no empirical claim was measured)."""
    table = forest_table(items)
    measured = table[np.isfinite(table["oriented_mean"])] if len(table) else table
    if not len(measured):
        return None
    labels = [f"{row.claim}: {row.quantity}{f' [{row.cell}]' if row.cell else ''} ({row.direction})"
              for row in measured.itertuples()]

    def draw(fig) -> None:
        ax = fig.add_subplot()
        y = np.arange(len(measured))[::-1]
        ax.axvspan(-1.0, 1.0, color="#e8e8e8", zorder=0, label="|effect| < smallest that matters")
        ax.axvline(0.0, color="#444444", linewidth=0.8)
        for yi, row in zip(y, measured.itertuples(), strict=True):
            colour = OUTCOME_COLOURS[row.outcome]
            ax.plot([row.oriented_low, row.oriented_high], [yi, yi], color=colour, linewidth=1.6)
            ax.plot([row.oriented_mean], [yi], "o", color=colour, markersize=3.5)
        ax.set_xscale("symlog", linthresh=2.0)
        low = min(-2.0, float(measured["oriented_low"].min()))
        high = max(2.0, float(measured["oriented_high"].max()))
        ticks = [t for t in (-1000, -100, -10, -2, -1, 0, 1, 2, 10, 100, 1000) if low * 1.5 <= t <= high * 1.5]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_yticks(y, labels, fontsize=6.5)
        ax.set_ylim(-0.8, len(measured) - 0.2)
        ax.set_xlabel("effect / smallest effect that matters (claimed rise or fall points right; |x| > 2 log scale)")
        for outcome, colour in OUTCOME_COLOURS.items():
            if outcome in set(measured["outcome"]):
                ax.plot([], [], color=colour, linewidth=1.6, label=outcome)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.9 / (1.2 + 0.17 * len(measured))),
                  ncol=4, frameon=False)

    height = 1.6 + 0.17 * len(measured)
    return make_figure(
        "forest", "Every empirical finding: 95% interval against the smallest effect that matters",
        "One line per quantity and cell, coloured by its outcome; each interval is divided by its own registered "
        "smallest effect, so the grey band holds the effects too small to matter.",
        "svg", table, draw, size=(9.0, height),
    )
