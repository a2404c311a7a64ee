"""Verdicts: the types of the claims registry and the machinery that turns evidence into a verdict.

A :class:`Claim` (registered in :mod:`reports.claims`) names where the paper makes it, the
derivations and studies that measure it, the tests that guard the measuring code, and how its
verdict is reached:

- *Empirical* claims pre-register, per measured quantity (:class:`Quantity`), the claimed
  direction, the smallest effect that matters (with a one-line justification) and alpha. The
  measured paired differences (one per seed, problem or attention row) go through
  :func:`reports.statistics.paired_decision`: a t interval and an outcome in {confirmed,
  contradicted, inconclusive, not yet measured}; several quantities or cells combine by
  :func:`reports.statistics.combine` (all confirmed: confirmed; all contradicted: contradicted;
  some of each: partly; else inconclusive). "Not significant" is never a contradiction.
- *Exact* checks (counts of violations of an inequality by exactly computed coefficients) and
  the symbolic derivations need no statistics: a single violation or a refuted derivation
  contradicts.

Statuses: "confirmed", "partly", "contradicted", "inconclusive", "not yet measured". Only a study
or experiment that did not run gives "not yet measured"; one that ran but lacks what a claim
reads raises :class:`~reports.evidence.EvidenceError` (:func:`assess` does not catch it).

Caveat policy: an imprecision of the paper that does not change a claim's conclusion (Eq. 11
omits mu_t - mu_s, zero for softmax weights) is named in the reason; one that limits where a
formula holds (the DropKey beta-gradient form is exact to leading order only) makes an
otherwise confirmed verdict "partly" when the formula's exactly computed error exceeds the
tolerance stated in the rule.

Code checks that are not claims of the paper (e.g. Monte-Carlo inference converging at the
central-limit rate) are :class:`Check` records, shown apart from the claims.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reports.evidence import Evidence, Sample
from reports.statistics import OUTCOMES, Decision, _check, combine, paired_decision
from theory.checks import check_choice

log = logging.getLogger(__name__)

STATUSES = ("confirmed", "partly", "contradicted", "inconclusive", "not yet measured")
VIT_PREFIX = "vit_"  # 'measured_by' names of real-ViT experiments: vit_<experiment>
ALPHA = 0.05  # every claim's alpha: two-sided 95% intervals


@dataclass(frozen=True)
class Quantity:
    """A measured quantity of an empirical claim, registered before the data (see the module doc)."""

    name: str
    meaning: str  # what one paired difference is
    direction: str  # "up", "down", "no-gain" or "equal" (reports.statistics)
    smallest_effect: float
    justification: str  # why that smallest effect
    replicate: str = "seeds"  # the independent unit one difference belongs to (seeds, problems, rows)
    unit: str = ""  # of the quantity (pp, nats, ...)
    covariate: str = ""  # decided at a matched covariate (its meaning), if any
    alpha: float = ALPHA

    def __post_init__(self) -> None:
        _check(self.direction, self.smallest_effect, self.alpha)

    def decide(self, sample: Sample) -> Finding:
        covariate = sample.covariate if self.covariate else None
        decision = paired_decision(sample.differences, direction=self.direction, smallest_effect=self.smallest_effect,
                                   alpha=self.alpha, covariate=covariate)
        return Finding(self, sample.label, decision)

    def in_words(self) -> str:
        matched = f", at a matched {self.covariate}" if self.covariate else ""
        unit = f" {self.unit}" if self.unit else ""
        one = self.replicate[:-1] if self.replicate.endswith("s") else self.replicate
        return (f"{self.name} ({self.meaning}; one per {one}{matched}): claimed {self.direction}, "
                f"smallest effect {self.smallest_effect:g}{unit} "
                f"({self.justification}), alpha {self.alpha:g}")


@dataclass(frozen=True)
class Finding:
    """One quantity decided in one cell."""

    quantity: Quantity
    label: str
    decision: Decision

    @property
    def name(self) -> str:
        return f"{self.quantity.name} [{self.label}]" if self.label else self.quantity.name

    def text(self) -> str:
        d = self.decision
        unit = f" {self.quantity.unit}" if self.quantity.unit else ""
        text = f"{self.name}: {d.interval_text()}{unit}, n = {d.n} {self.quantity.replicate}: {d.outcome}"
        if d.outcome == "inconclusive":
            text += (f" (detectable at this n: {d.detectable_effect:.3g}{unit}; about {d.seeds_needed} "
                     f"{self.quantity.replicate} needed for {self.quantity.smallest_effect:g}{unit})")
        if d.outcome == "confirmed" and d.negligible:  # the registered rule tries "confirmed" first; say its size
            text += (f" (in the claimed direction, but negligible: the whole interval lies within "
                     f"±{self.quantity.smallest_effect:g}{unit}, the smallest effect that matters)")
        if d.n_missing:
            text += f" [{d.n_missing} without a value left out]"
        return text


@dataclass(frozen=True)
class Verdict:
    status: str
    key_number: str
    reason: str
    findings: tuple[Finding, ...] = ()

    def __post_init__(self) -> None:
        check_choice(self.status, "status", STATUSES)


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    source: str
    theory: tuple[str, ...]  # derivation keys (theory.derivations)
    measured_by: tuple[str, ...]  # study names, or vit_<experiment> for real-ViT experiments
    tests: tuple[str, ...]  # pytest node ids
    rule_in_words: str
    measure: Callable[[Evidence], Any]
    rule: Callable[[Any], Verdict]
    quantities: tuple[Quantity, ...] = ()  # the registered quantities of an empirical claim

    @property
    def empirical(self) -> bool:
        return bool(self.quantities)


@dataclass(frozen=True)
class Check:
    """A check of the code shown with the claims but not a claim of the paper: passed, failed or not run."""

    id: str
    statement: str
    measured_by: str
    tests: tuple[str, ...]
    rule_in_words: str
    evaluate: Callable[[Evidence], tuple[str, str]]  # -> (status in CHECK_STATUSES, key number)


CHECK_STATUSES = ("passed", "failed", "not run")


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits ("n/a" for None/NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def not_measured(reason: str) -> Verdict:
    return Verdict("not yet measured", "—", reason)


# --- theory -------------------------------------------------------------------------------------


def theory_gate(statuses: Mapping[str, str]) -> Verdict | None:
    """A verdict forced by the derivations alone (refuted, failed, missing), else None."""
    refuted = sorted(key for key, status in statuses.items() if status == "refuted")
    if refuted:
        return Verdict("contradicted", f"refuted: {', '.join(refuted)}",
                       "the derivation refutes the statement as printed")
    missing = sorted(key for key, status in statuses.items() if status == "missing")
    if missing:
        return not_measured(f"theory not run in this build ({', '.join(missing)})")
    unknown = sorted(key for key, status in statuses.items() if status not in ("proved", "checked"))
    if unknown:
        return not_measured(f"derivation check failed: {', '.join(unknown)}")
    return None


def theory_phrase(statuses: Mapping[str, str]) -> str:
    return ", ".join(f"{key} {status}" for key, status in sorted(statuses.items()))


# --- empirical decisions ------------------------------------------------------------------------


def decide(quantities: Sequence[Quantity], samples: Sequence[Sample]) -> tuple[Finding, ...]:
    """Each sample decided by its registered quantity (ValueError for a sample of an unregistered one)."""
    registered = {quantity.name: quantity for quantity in quantities}
    findings = []
    for sample in samples:
        if sample.quantity not in registered:
            raise ValueError(f"quantity {sample.quantity!r} is not registered for this claim ({sorted(registered)})")
        findings.append(registered[sample.quantity].decide(sample))
    return tuple(findings)


def _by_outcome(findings: Sequence[Finding]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {outcome: [] for outcome in OUTCOMES}
    for finding in findings:
        grouped[finding.decision.outcome].append(finding.name)
    return grouped


def findings_key(findings: Sequence[Finding], prefix: str = "", *, cells: int = 4) -> str:
    """The key number: every finding's interval (few), or the count per outcome (many: cells x quantities)."""
    if len(findings) <= cells:
        return prefix + "; ".join(f"{f.name} {f.decision.interval_text()}" for f in findings)
    counts = {outcome: len(names) for outcome, names in _by_outcome(findings).items() if names}
    return prefix + f"{len(findings)} findings: " + ", ".join(f"{count} {outcome}" for outcome, count in counts.items())


def findings_reason(findings: Sequence[Finding]) -> str:
    parts = [f"{outcome}: {', '.join(names)}" for outcome, names in _by_outcome(findings).items() if names]
    return "; ".join(parts)


def empirical_rule(quantities: Sequence[Quantity], *, prefix: Callable[[Any], str] | None = None,
                   explain: Callable[[tuple[Finding, ...], str], str] | None = None):
    """The rule of a purely empirical claim: decide every sample, combine the outcomes."""

    def rule(samples: Sequence[Sample] | None) -> Verdict:
        if samples is None:
            return not_measured("the study or experiment that measures it has not run (or its result predates "
                                "the quantities this claim reads)")
        findings = decide(quantities, samples)
        status = combine(f.decision.outcome for f in findings)
        key = findings_key(findings, prefix(samples) if prefix else "")
        reason = explain(findings, status) if explain else findings_reason(findings)
        return Verdict(status, key, reason, findings)

    return rule


def words(quantities: Sequence[Quantity], extra: str = "") -> str:
    """The rule in words: the registration of every quantity, then the shared decision rule."""
    registered = "; ".join(quantity.in_words() for quantity in quantities)
    return (f"{extra + ' ' if extra else ''}Registered: {registered}. Per quantity and cell, a two-sided "
            "t interval over the paired differences decides it (reports.statistics.paired_decision); "
            "the claim is confirmed if every cell is, contradicted if every cell is, partly if some are "
            "each, else inconclusive.")


def assess(target: Claim, evidence: Evidence) -> Verdict:
    """The claim's verdict on this evidence (an EvidenceError propagates: see the module doc)."""
    return target.rule(target.measure(evidence))
