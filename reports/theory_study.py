"""The theory 'study' of the report: every symbolic derivation, checked, with its expressions as MathML.

It is not a simulation (no frame to summarise: the summary holds each derivation's expressions,
pre-rendered, which its table cannot), so it computes its frame and summary together
(:meth:`DerivationsStudy.compute`). Its seed feeds the derivations' numeric cross-checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from simulations.registry import Study
from theory.checks import check_seed

QUESTION = "Do the paper's equations (Eqs. 3-11) hold as printed, and what do they imply beyond it?"
METHOD = ("Each statement is derived with sympy (symbolically where possible, exactly for small N otherwise) "
          "and cross-checked numerically against brute-force enumeration of every mask.")


@dataclass(frozen=True)
class TheoryConfig:
    """The derivations have one setting: the seed of their numeric cross-checks."""

    seed: int = 0

    def __post_init__(self) -> None:
        check_seed(self.seed)

    @classmethod
    def quick(cls) -> TheoryConfig:
        return cls()

    @classmethod
    def full(cls) -> TheoryConfig:
        return cls()


def derive(config: Any, *, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """Every derivation (:func:`theory.derivations.verify_all`), its expressions pre-rendered as MathML.

    ``config`` is a :class:`TheoryConfig` or a mapping with a ``seed``.
    """
    from reports.html import expression_record
    from theory.derivations import verify_all

    seed = config["seed"] if isinstance(config, dict) else config.seed
    records = []
    for result in verify_all(seed=int(seed)):
        records.append(
            {
                "key": result.key,
                "title": result.title,
                "statement": result.statement,
                "status": result.status,
                "holds": bool(result.holds),
                "details": result.details,
                "expressions": [expression_record(name, expr) for name, expr in result.expressions.items()],
            }
        )
    frame = pd.DataFrame(
        [{"key": r["key"], "title": r["title"], "status": r["status"], "holds": r["holds"]} for r in records]
    )
    return frame, {"derivations": records}


def _summary_comes_with_the_frame(frame: pd.DataFrame) -> dict:
    raise NotImplementedError("the theory's summary is computed with its frame: use THEORY.compute(config)")


@dataclass(frozen=True)
class DerivationsStudy(Study):
    """A study whose ``run`` returns the frame and the summary together."""

    def compute(self, config: Any, *, progress: bool = False) -> tuple[pd.DataFrame, dict]:
        return self.run(config, progress=progress)


THEORY = DerivationsStudy(
    name="theory",
    title="Symbolic derivations",
    config_class=TheoryConfig,
    run=derive,
    summarise=_summary_comes_with_the_frame,
    question=QUESTION,
    method=METHOD,
    rank=1000,
)
