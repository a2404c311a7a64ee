"""The record every derivation returns: what was claimed, how it was settled, and the sympy objects.

Statuses:

- ``"proved"``: a symbolic proof. Where a step is an argument rather than a sympy
  computation (an induction, a cited textbook theorem), ``details`` says so.
- ``"checked"``: only an exact or numeric check, no proof; ``details`` says which.
- ``"refuted"``: the statement as claimed (docs/theory.md) does not hold;
  ``details`` says what is wrong and what the correct statement is.
- ``"failed"``: the check itself could not run (an exception); nothing is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

STATUSES = ("proved", "checked", "refuted", "failed")


@dataclass(frozen=True)
class Derivation:
    """One claim of the theory (docs/theory.md), derived and checked."""

    key: str
    title: str
    statement: str
    status: str
    holds: bool
    expressions: dict[str, sp.Basic] = field(default_factory=dict)
    details: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.holds and self.status in ("refuted", "failed"):
            raise ValueError(f"a {self.status!r} derivation cannot hold")
