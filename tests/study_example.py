"""How often DropKey drops every key of a row: Monte-Carlo counts against the exact r^N.

The worked example of docs/extending.md ("Adding a study"): a whole study in one file. Placed
in ``simulations/`` it would be found by the registry; the tests register it from here
(tests/test_reports.py::test_a_registered_example_study_gets_a_report_page).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from simulations.registry import Study
from theory.checks import check_drop_ratio, check_int, check_seed, check_tuple
from theory.seeding import child_sequences, generator

QUESTION = "How often does DropKey drop every key of a row, the case the all-dropped convention decides?"
METHOD = ("For rows of N keys and drop ratios r, masks are drawn and the rows left with no key counted; "
          "the fraction must match r^N within its binomial standard error.")


@dataclass(frozen=True)
class AllDroppedConfig:
    """ns: row lengths (1..64). drop_ratios: r in (0, 1). num_samples: masks per cell (>= 1)."""

    ns: tuple[int, ...] = (1, 2, 4)
    drop_ratios: tuple[float, ...] = (0.3, 0.6)
    num_samples: int = 20_000
    seed: int = 0

    def __post_init__(self) -> None:
        check_tuple(self.ns, "ns", lambda v, n: check_int(v, n, 1, 64))
        check_tuple(self.drop_ratios, "drop_ratios", lambda v, n: check_drop_ratio(v, n, allow_zero=False))
        check_int(self.num_samples, "num_samples", 1)
        check_seed(self.seed)

    @classmethod
    def quick(cls) -> AllDroppedConfig:
        return cls()

    @classmethod
    def full(cls) -> AllDroppedConfig:
        return cls(ns=(1, 2, 4, 8), num_samples=200_000)


def run(config: AllDroppedConfig, *, progress: bool = False) -> pd.DataFrame:
    """One row per (N, r): the fraction of all-dropped rows, r^N and its standard error."""
    cells = [(n, r) for n in config.ns for r in config.drop_ratios]
    rows = []
    for (n, r), sequence in zip(cells, child_sequences(config.seed, len(cells)), strict=True):
        dropped = (generator(sequence).random((config.num_samples, n)) < r).all(axis=1)
        exact = r**n
        rows.append({"n_keys": n, "drop_ratio": r, "estimate": dropped.mean(), "exact": exact,
                     "standard_error": np.sqrt(exact * (1 - exact) / config.num_samples)})
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame) -> dict:
    z = (frame["estimate"] - frame["exact"]) / frame["standard_error"]
    return {"cells": len(frame), "max_abs_z": float(z.abs().max())}


def headline(summary: dict) -> list[str]:
    return [f"max |z| over {summary['cells']} cells: {summary['max_abs_z']:.2f}"]


def figures(frame: pd.DataFrame, summary: dict) -> list:
    """The estimates against r^N (the report's deterministic figure maker, imported only for a page)."""
    from simulations.pages.figure import make_figure

    def draw(fig) -> None:
        ax = fig.add_subplot()
        ax.errorbar(frame["exact"], frame["estimate"], yerr=frame["standard_error"], fmt="o")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set_xlabel("exact r^N")
        ax.set_ylabel("fraction of all-dropped rows")

    return [make_figure("estimate-versus-exact", "All-dropped rows: counted against r^N",
                        "Points on the diagonal: the masks drop every key as often as the theory says.",
                        "svg", frame, draw)]


def equations() -> list:
    import sympy as sp

    from simulations.pages.symbols import N, r

    return [("probability that every key of a row is dropped", sp.Eq(sp.Symbol("P(all dropped)"), r**N))]


STUDY = Study(
    name="all_dropped",
    title="All-dropped rows: how often",
    config_class=AllDroppedConfig,
    run=run,
    summarise=summarise,
    question=QUESTION,
    method=METHOD,
    page=__name__,  # this module: its figures() and equations()
    headline=headline,
)
