"""The figures of the report's pages: the deterministic figure maker and each study's figures.

The maker (:class:`Figure`, :func:`make_figure`, :data:`STYLE`, :data:`PALETTE`) lives in
:mod:`simulations.pages.figure`, so a study can draw its own page; it is re-exported here for the
report's own figures (:mod:`reports.vit_figures`, :mod:`reports.forest`). A study's figures come
from its :class:`simulations.registry.Study` (its ``page`` module).
"""

from __future__ import annotations

import pandas as pd

from reports.studies import study
from simulations.pages.figure import PALETTE, STYLE, Figure, make_figure


def study_figures(name: str, frame: pd.DataFrame, summary: dict) -> list[Figure]:
    """The figures of a study page ([] for a study without figures, e.g. the theory)."""
    return study(name).figures(frame, summary)


__all__ = ["PALETTE", "STYLE", "Figure", "make_figure", "study_figures"]
