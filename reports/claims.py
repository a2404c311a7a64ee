"""The registry of every claim the suite checks, each with its rule registered before the data.

One entry per claim (and per code check); the types and the decision machinery are in
:mod:`reports.verdicts`, what each claim reads in :mod:`reports.measures`, the statistics in
:mod:`reports.statistics`. Every empirical quantity states its direction, the smallest effect
that matters and why; those numbers were fixed here before the experiments that decide them
were run at the scale shown in the report.

Real-ViT claims read ``results/<scale>/<experiment>/per_seed.csv`` (:mod:`dropkey.lab.experiments`),
judged at the largest scale measured (full > medium > quick); their key number names that
scale and the number of seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from reports import measures
from reports.evidence import Evidence, Sample
from reports.verdicts import (
    ALPHA,
    CHECK_STATUSES,
    STATUSES,
    VIT_PREFIX,
    Check,
    Claim,
    Finding,
    Quantity,
    Verdict,
    assess,
    combine,
    decide,
    empirical_rule,
    findings_key,
    findings_reason,
    fmt,
    theory_gate,
    theory_phrase,
    words,
)

__all__ = ["ALPHA", "CHECKS", "CHECK_STATUSES", "CLAIMS", "REQUIRED_CLAIM_IDS", "STATUSES", "VIT_PREFIX", "Check",
           "Claim", "Finding", "Quantity", "Verdict", "assess", "check", "claim", "fmt"]

TOP1 = "half a percentage point of top-1 accuracy; the paper's reported gains from DropKey are larger"
PEAK = "one percentage point of attention mass on the most-attended key"
SIMILARITY = "a twentieth of the correlation scale; DeepViT's collapse moves top-block similarity far more"

# --- rules of the claims that combine a derivation with a measurement ---------------------------------


def _derivations_only(statuses: Mapping[str, str], what: str) -> Verdict:
    return Verdict("confirmed", theory_phrase(statuses), f"derivations hold; {what}")


def _theory_and_samples(keys: tuple[str, ...], quantities: tuple[Quantity, ...], *, caveat: str = "",
                        not_run: str = "the numeric study was not run in this build"):
    """Rule: the derivations gate; then the derivation counts as one confirmed outcome next to the findings."""

    def rule(numbers: dict[str, Any]) -> Verdict:
        statuses = numbers["derivations"]
        gate = theory_gate(statuses)
        if gate is not None:
            return gate
        if numbers["samples"] is None:
            return _derivations_only(statuses, not_run + (f"; caveat: {caveat}" if caveat else ""))
        findings = decide(quantities, numbers["samples"])
        status = combine(["confirmed", *(f.decision.outcome for f in findings)])
        reason = f"{theory_phrase(statuses)}; {findings_reason(findings)}"
        verdict = Verdict(status, findings_key(findings), reason + (f"; caveat: {caveat}" if caveat else ""), findings)
        return _with_first_order_caveat(verdict, numbers.get("first_order_errors"))

    return rule


FIRST_ORDER_TOLERANCE = 0.05  # the caveat policy's tolerance on the paper's first-order ratio (exact error)


def _with_first_order_caveat(verdict: Verdict, errors: Mapping[str, float] | None) -> Verdict:
    """Demote a confirmed damping verdict to partly where the first-order form misses by > 5% (exact errors)."""
    if errors is None:
        return verdict
    worst = max(errors, key=errors.get)
    key = f"{verdict.key_number}; first-order ratio error ≤ {100 * errors[worst]:.1f}% (worst {worst})"
    if verdict.status == "confirmed" and errors[worst] > FIRST_ORDER_TOLERANCE:
        reason = (f"{verdict.reason}; the first-order form c_s p_s/(c_t p_t) misses the exact ratio by "
                  f"{100 * errors[worst]:.1f}% > {100 * FIRST_ORDER_TOLERANCE:.0f}% at {worst} "
                  "(exact to leading order only)")
        return Verdict("partly", key, reason, verdict.findings)
    return Verdict(verdict.status, key, verdict.reason, verdict.findings)


def _measure_theory(*keys: str, samples=None, first_order: bool = False):
    def measure(evidence: Evidence) -> dict[str, Any]:
        numbers: dict[str, Any] = {"derivations": measures.derivation_statuses(evidence, keys)}
        numbers["samples"] = samples(evidence) if samples is not None else None
        if first_order:
            numbers["first_order_errors"] = measures.first_order_errors(evidence)
        return numbers

    return measure


def _exact_counts_rule(violations, key, broken: str, holds: str):
    """Rule of an exact scan: contradicted by a single violation (no statistics: the coefficients are exact)."""

    def rule(numbers: dict) -> Verdict:
        gate = theory_gate(numbers["derivations"])
        if gate is not None:
            return gate
        counts = numbers["counts"]
        if counts is None:
            return _derivations_only(numbers["derivations"], "numeric scan not run")
        found = violations(counts)
        if found > 0:
            return Verdict("contradicted", key(counts, found), broken)
        return Verdict("confirmed", key(counts, found), f"proved ({theory_phrase(numbers['derivations'])}); {holds}")

    return rule


rule_eq4 = _exact_counts_rule(
    lambda counts: counts["c_order_violations"],
    lambda counts, found: f"{found} violations of c_s < c_t in {counts['pairs']} adjacent pairs",
    "exact coefficients violate the inequality on the study's rows", "no violation on the study's rows")
rule_order = _exact_counts_rule(
    lambda counts: counts["w_order_violations"] + counts["max_violations"] + counts["entropy_violations"],
    lambda counts, found: f"{found} violations (order, max, entropy) on {counts['rows']} rows",
    "exact E[w] breaks order or majorisation on the study's rows", "order kept, max down and entropy up on every row")


def rule_dropout(numbers: dict) -> Verdict:
    gate = theory_gate(numbers["derivations"])
    if gate is not None:
        return gate
    return Verdict("confirmed", theory_phrase(numbers["derivations"]), "E[w_j] = p_j exactly: c_j = 1 for every key")


def _measure_counts(*keys: str):
    def measure(evidence: Evidence) -> dict[str, Any]:
        return {"derivations": measures.derivation_statuses(evidence, keys), "counts": measures.order_counts(evidence)}

    return measure


def _explain_regimes(findings: tuple[Finding, ...], status: str) -> str:
    """Name the toy regimes where each regulariser smooths more (the claim's answer is a map).

    Cells are grouped by regime (the label before ", r="); "negligible" marks a confirmed cell whose
    whole interval lies below the smallest effect that matters.
    """

    def side(finding: Finding) -> str:
        d = finding.decision
        if d.outcome == "confirmed":
            return "DropKey smooths more (negligibly)" if d.negligible else "DropKey smooths more"
        if d.ci_high < 0:
            return "dropout smooths more"
        return "no difference that matters" if d.outcome == "contradicted" else "undecided"

    grouped: dict[str, dict[str, list[str]]] = {}
    for finding in findings:
        regime, _, cell = finding.label.partition(", r=")
        grouped.setdefault(side(finding), {}).setdefault(regime, []).append(f"r={cell}")
    order = ("DropKey smooths more", "DropKey smooths more (negligibly)", "dropout smooths more",
             "no difference that matters", "undecided")
    parts = []
    for name in order:
        if name in grouped:
            cells = "; ".join(f"{regime} ({', '.join(items)})" for regime, items in grouped[name].items())
            parts.append(f"{name} in: {cells}")
    return ". ".join(parts)


# --- real-ViT claims -----------------------------------------------------------------------------------


def _scale_prefix(samples: Sequence[Sample]) -> str:
    """'[medium scale, n = 3 seeds] ': where the real-ViT numbers come from."""
    scales = sorted({sample.scale for sample in samples})
    n = sorted({int(sample.differences.size) for sample in samples})
    return f"[{'/'.join(scales)} scale, n = {'/'.join(map(str, n))} seeds] "


def _batch_prefix(samples: Sequence[Sample]) -> str:
    """'[small_data scale, 32 cells, n = 16 mask passes] ': where the mechanism's numbers come from."""
    scales = sorted({sample.scale for sample in samples})
    n = sorted({int(sample.differences.size) for sample in samples})
    cells = len({sample.label for sample in samples})
    return f"[{'/'.join(scales)} scale, {cells} cells, n = {'/'.join(map(str, n))} mask passes] "


def _vit_claim(claim_id: str, statement: str, source: str, experiment: str, quantities: tuple[Quantity, ...],
               extra: str, tests: tuple[str, ...]) -> Claim:
    """A claim measured by real-ViT experiment ``experiment`` at its largest scale measured."""
    wanted = {quantity.name: bool(quantity.covariate) for quantity in quantities}

    def measure(evidence: Evidence) -> list[Sample] | None:
        return measures.vit_samples(evidence, experiment, wanted)

    return Claim(claim_id, statement, source, (), (VIT_PREFIX + experiment,), tests, words(quantities, extra),
                 measure, empirical_rule(quantities, prefix=_scale_prefix), quantities)


# --- the registry ----------------------------------------------------------------------------------

#: the calibrated regime's run length (results/small_data/calibration): 500 images / batch 32 = 15 steps x 100 epochs
MECHANISM_STEPS = 1500
MECHANISM = (
    Quantity("peak_step_dropkey_minus_none", "first-order change of the clean attention peak (mean over blocks, "
             "heads, rows and the run's training images) along one plain gradient step at the peak learning rate: the "
             "training-set gradient under one DropKey mask pass minus the exact one without a regulariser (the plain "
             "step is the gradient the paper's argument is about; the Adam-preconditioned step is shown, not "
             "decided)", "down", 0.01 / MECHANISM_STEPS,
             f"a change per step that, kept over the calibrated run's {MECHANISM_STEPS} steps, adds up to one "
             "percentage point of peak (vit-attention-peaks' smallest effect)", replicate="mask passes"),
    Quantity("entropy_step_dropkey_minus_none", "first-order change of the clean attention entropy along the same "
             "step, DropKey minus no regulariser", "up", 0.02 / MECHANISM_STEPS,
             f"a change per step that adds up to 0.02 nats over {MECHANISM_STEPS} steps (vit-attention-peaks' "
             "smallest entropy effect)", replicate="mask passes", unit="nats"),
)

COVERAGE = Quantity(
    "coverage_minus_nominal", "coverage of one attention row's 95% Monte-Carlo intervals of c_j (CLT-reliable "
    "intervals) minus 0.95", "equal", 0.025,
    "a miss rate off by half its nominal 5%: a bias of the exact c of about 0.4 interval SE already does that",
    replicate="rows")
CHAIN = Quantity(
    "link_fraction_minus_half", "fraction of one toy problem's far-from-optimum records in which the link holds, "
    "minus 1/2", "up", 0.1, "a link that holds in fewer than 60% of the records cannot drive a loop",
    replicate="problems")
DAMPING = Quantity(
    "log_damping", "log of one attention row's expected beta-gradient ratio of its top two keys (exact, else "
    "Monte-Carlo) over the undamped p_s/p_t, far from the optimum", "down", 0.01,
    "a 1% smaller growth ratio per step compounds to a factor 1/e over 100 steps", replicate="rows")
TOY_SHRINK = Quantity(
    "peak_dropkey_minus_none", "final peak weight of one toy problem trained with DropKey minus the same problem "
    "trained without a regulariser", "down", 0.01, PEAK, replicate="problems")
TOY_VERSUS = Quantity(
    "peak_dropout_minus_dropkey", "final peak weight of one toy problem under post-softmax dropout minus under "
    "DropKey, from the same initial problem", "up", 0.01, PEAK, replicate="problems")
STRUCTURED = Quantity(
    "relative_first_moment_change", "for one attention row, TV(E_structured[w], E_DropKey[w]) minus DropKey's own "
    "Monte-Carlo TV noise, over DropKey's smoothing TV(E_DropKey[w], p)", "no-gain", 0.10,
    "the tolerance fixed when the study was first run: 10% of DropKey's own smoothing", replicate="rows")


def _top1(name: str, meaning: str, direction: str = "up") -> Quantity:
    return Quantity(name, meaning, direction, 0.5, TOP1, unit="pp")


def _centred(name: str, meaning: str, covariate: str = "", direction: str = "down") -> Quantity:
    return Quantity(name, meaning, direction, 0.05, SIMILARITY, covariate=covariate)


SENSITIVITY_RATIOS = (0.05, 0.1, 0.2, 0.3)  # the drop_ratio sweep (Scale.sensitivity_ratios)
ENTROPY_COVARIATE = "top-block attention entropy (difference of the two runs, nats)"

CLAIMS: tuple[Claim, ...] = (
    Claim(
        "eq3-expected-output",
        "Under DropKey the expected output is E[o] = Σ c_j p_j v_j with c_j = (1−r) E[1/(p_j + S_−j)].",
        "Eq. 3", ("expected-output", "row-sum"), ("theory", "coefficients"),
        ("tests/test_derivations.py::test_expected_output_at_n4",
         "tests/test_theory_properties.py::test_enumeration_equals_integral",
         "tests/test_theory_properties.py::test_monte_carlo_agrees_within_five_standard_errors",
         "tests/test_sim_coefficients.py::test_coverage_is_nominal_where_the_clt_applies"),
        words((COVERAGE,), "Contradicted if a derivation is refuted. Otherwise the proof is one confirmed outcome and "
              "the Monte-Carlo cross-check (intervals around sampled c_j must cover the exact c_j at the nominal "
              "rate; standard error grouped by row) another."),
        _measure_theory("expected-output", "row-sum", samples=measures.coverage_samples),
        _theory_and_samples(("expected-output", "row-sum"), (COVERAGE,), not_run="Monte-Carlo cross-check not run"),
        (COVERAGE,),
    ),
    Claim(
        "eq4-smoothing",
        "Larger attention weights get smaller smoothing coefficients: p_s > p_t ⇒ c_s < c_t.",
        "Eq. 4", ("smoothing-gap",), ("theory", "coefficients"),
        ("tests/test_theory_properties.py::test_coefficients_strictly_decrease_in_p",
         "tests/test_derivations.py::test_smoothing_gap_and_order_at_n4"),
        "Exact (no statistics): confirmed if proved and no adjacent pair of keys on the study's rows violates "
        "c_s < c_t with exactly computed c; contradicted if refuted or any violation.",
        _measure_counts("smoothing-gap"), rule_eq4,
    ),
    Claim(
        "order-majorisation",
        "DropKey keeps the order of the weights, compresses their ratios, and E[w]/ΣE[w] is majorised by p.",
        "ours (beyond the paper)", ("order-preservation", "ratio-compression", "majorisation"),
        ("theory", "coefficients"),
        ("tests/test_theory_properties.py::test_order_is_preserved_and_ratios_are_compressed",
         "tests/test_theory_properties.py::test_normalised_expectation_is_majorised_by_p"),
        "Exact (no statistics): confirmed if all three are proved and no row of the study breaks order, "
        "max(q) ≤ max(p) or entropy(q) ≥ entropy(p); contradicted if refuted or any violation.",
        _measure_counts("order-preservation", "ratio-compression", "majorisation"), rule_order,
    ),
    Claim(
        "dropout-no-smoothing",
        "Attention dropout after the softmax has no first-moment smoothing: E[w_j] = p_j (c_j = 1).",
        "Sec. 3 (what to drop: contrast with post-softmax dropout)", ("dropout-moments",), ("theory",),
        ("tests/test_theory_api.py::test_post_softmax_dropout_has_no_first_moment_smoothing",
         "tests/test_functional.py::test_post_softmax_dropout_is_unbiased_and_plain_in_eval"),
        "Symbolic: confirmed if the derivation is proved; contradicted if refuted.",
        lambda evidence: {"derivations": measures.derivation_statuses(evidence, ("dropout-moments",))},
        rule_dropout,
    ),
    Claim(
        "dropkey-vs-dropout-optimisation",
        "Implied: in training, DropKey smooths attention more than post-softmax dropout (lower final peaks).",
        "Sec. 3 (what to drop), as implied by the contrast with dropout", ("dropout-moments",), ("toy_regimes",),
        ("tests/test_sim_toy_regimes.py::test_dropkey_per_mask_gradient_vanishes_at_the_free_values_optimum_dropout_does_not",
         "tests/test_sim_toy_regimes.py::test_training_objective_equals_enumeration_with_its_gradients",
         "tests/test_sim_toy_regimes.py::test_peak_differences_pair_problems_per_cell"),
        words((TOY_VERSUS,), "Decided per cell of the toy regime map (training length, logit/value step ratio, free "
              "or fixed values, sampled or exact expected loss, target inside or outside the values' hull); the "
              "reason names the regimes where each regulariser smooths more."),
        measures.toy_regime_samples, empirical_rule((TOY_VERSUS,), explain=_explain_regimes), (TOY_VERSUS,),
    ),
    Claim(
        "gradient-chain",
        "Eqs. 5-11: far from the optimum, p_s > p_t makes β_s outgrow β_t and then p_s outgrow p_t (rich get richer).",
        "Eqs. 5-11", ("lagrangian-gradients", "gradient-difference"), ("theory", "toy_optimisation"),
        ("tests/test_derivations.py::test_gradient_difference_reports_the_missing_multipliers",
         "tests/test_sim_toy_optimisation.py::test_rich_get_richer_links_far_from_the_optimum"),
        words((CHAIN,), "Contradicted if a derivation is refuted; otherwise each link of the chain is a cell, "
              "measured on the toy without regulariser. Eq. 11 as printed omits mu_t − mu_s (zero for softmax "
              "weights): a caveat, not a demotion."),
        _measure_theory("lagrangian-gradients", "gradient-difference", samples=measures.chain_samples),
        _theory_and_samples(("lagrangian-gradients", "gradient-difference"), (CHAIN,),
                            caveat="Eq. 11 as printed omits mu_t − mu_s (zero for softmax weights, p > 0)"),
        (CHAIN,),
    ),
    Claim(
        "gradient-damping",
        "Under DropKey the β-update ratio shrinks from p_s/p_t to c_s p_s/(c_t p_t): the loop is damped.",
        "Eqs. 5-11 (with Eq. 4)", ("dropkey-gradient", "ratio-compression"), ("theory", "gradient_damping"),
        ("tests/test_sim_gradient_damping.py::test_ratio_is_damped_below_p_ratio",
         "tests/test_sim_gradient_damping.py::test_first_order_prediction_is_close_far_from_the_optimum",
         "tests/test_sim_gradient_damping.py::test_monte_carlo_agrees_with_exact_enumeration"),
        words((DAMPING,), "Contradicted if a derivation is refuted; each drop ratio far from the optimum is a cell. "
              f"Caveat policy: confirmed becomes partly where the paper's first-order ratio misses the exact one "
              f"by more than {100 * FIRST_ORDER_TOLERANCE:.0f}% (median over rows; exact, no statistics)."),
        _measure_theory("dropkey-gradient", "ratio-compression", samples=measures.damping_samples, first_order=True),
        _theory_and_samples(("dropkey-gradient", "ratio-compression"), (DAMPING,)),
        (DAMPING,),
    ),
    Claim(
        "toy-peak-shrinkage",
        "DropKey shrinks attention peaks in optimisation (toy objective of Eq. 5).",
        "Sec. 3 (DropKey penalises high attention weights)", ("smoothing-gap",), ("toy_optimisation",),
        ("tests/test_sim_toy_optimisation.py::test_dropkey_smooths_the_toy_and_dropout_smooths_it_more",),
        words((TOY_SHRINK,), "Each drop ratio is a cell."),
        lambda evidence: measures.toy_peak_samples(evidence, "dropkey", "none", TOY_SHRINK.name),
        empirical_rule((TOY_SHRINK,)), (TOY_SHRINK,),
    ),
    Claim(
        "structured-masks-smoothing",
        "At the same drop ratio, correlated masks (DropKey-Block, DropKey-Cross) smooth attention like independent "
        "DropKey: their expected attention E[w] matches DropKey's (structure changes nothing in the first moment).",
        "ours (hypothesis): not a claim of the paper, whose structured-mask claim is about accuracy (vit-structured)",
        (), ("structured_masks",),
        ("tests/test_sim_structured_masks.py::test_drop_fraction_is_calibrated",
         "tests/test_sim_structured_masks.py::test_independent_dropkey_matches_theory_within_five_standard_errors",
         "tests/test_sim_structured_masks.py::test_relative_change_is_paired_by_row_against_dropkeys_own_noise"),
        words((STRUCTURED,), "Each (variant, grid, row shape, r) is a cell."),
        measures.structured_samples, empirical_rule((STRUCTURED,)), (STRUCTURED,),
    ),
    _vit_claim(
        "vit-attention-peaks",
        "Trained with DropKey, a real ViT's attention has lower peak weights and higher entropy than without "
        "a regulariser (DropKey penalises high attention weights).",
        "Sec. 3 (DropKey penalises high attention weights, Eq. 4, in training dynamics)", "attention_dynamics",
        (Quantity("peak_dropkey_minus_none", "final clean attention peak (eval mode, mean over blocks and heads), "
                  "DropKey run minus the same seed's run without regulariser", "down", 0.01, PEAK),
         Quantity("entropy_dropkey_minus_none", "final clean attention entropy, DropKey minus none, same seed", "up",
                  0.02, "a 2% change of the effective number of attended keys exp(H)", unit="nats")),
        "Final-epoch attention, paired by seed.",
        ("tests/test_experiments.py::test_quick_experiments_measure_every_claim",
         "tests/test_experiments.py::test_paired_difference_and_its_standard_error"),
    ),
    Claim(
        "vit-gradient-mechanism",
        "In a real ViT, DropKey's expected gradient lowers the clean attention peaks: one optimizer step along it "
        "moves each block's peak weight down (and its entropy up) relative to a step along the gradient without a "
        "regulariser, at the same parameters (the mechanism behind 'DropKey penalises high attention weights').",
        "Sec. 3 (Eq. 4 and the gradient argument, Eq. 11: attention otherwise feeds a rich-get-richer loop that "
        "DropKey damps)", (), (VIT_PREFIX + "gradient_mechanism",),
        ("tests/test_mechanism.py::test_none_change_is_the_first_order_change_of_the_peak_along_a_gradient_step",
         "tests/test_mechanism.py::test_adam_preconditioner_reproduces_a_real_adamw_step",
         "tests/test_mechanism.py::test_paired_differences_and_cells_by_hand"),
        words(MECHANISM, "Each (probed run, checkpoint epoch, drop ratio) is a cell; the replicates are mask "
              "passes over the run's training images (the probed runs: one seed each). Registered after a quick-scale "
              "pipeline run (not the decision scale), which showed per-batch replicates and the Adam step too "
              "noisy to decide; the decision scale's data were not seen."),
        measures.mechanism_samples, empirical_rule(MECHANISM, prefix=_batch_prefix), MECHANISM,
    ),
    _vit_claim(
        "vit-accuracy",
        "DropKey improves ViT top-1 accuracy over no attention dropout and over post-softmax dropout.",
        "Sec. 4 (experiments; small-data regime, Fig. 4)", "accuracy",
        (_top1("top1_dropkey_minus_none", "test top-1 of a DropKey run minus the same seed's run without regulariser"),
         _top1("top1_dropkey_minus_dropout",
               "test top-1 of DropKey minus post-softmax dropout at the same ratio, same seed")),
        "Paired by seed.",
        ("tests/test_models.py::test_every_named_config_runs_and_trains",
         "tests/test_experiments.py::test_quick_experiments_measure_every_claim"),
    ),
    _vit_claim(
        "vit-generalisation-gap",
        "DropKey narrows the generalisation gap: a ViT trained with it has a smaller difference between its accuracy "
        "on its own training images and on test images than one trained without a regulariser.",
        "Sec. 1 and 4 (the motivation: DropKey regularises attention against overfitting in the small-data regime)",
        "accuracy",
        (Quantity("gap_dropkey_minus_none", "clean (un-augmented, eval-mode) training accuracy minus test top-1 of a "
                  "DropKey run, minus the same of the same seed's run without regulariser", "down", 0.5, TOP1,
                  unit="pp"),),
        "Paired by seed; meaningful in an overfitting regime (docs/experiments.md).",
        ("tests/test_experiments.py::test_quick_experiments_measure_every_claim",
         "tests/test_experiments.py::test_train_evaluation_reads_the_runs_own_training_images"),
    ),
    _vit_claim(
        "vit-dropkey-vs-dropout-entropy",
        "Trained with DropKey, a ViT's learned attention is smoother (higher entropy) than trained with post-softmax "
        "dropout at the same ratio.",
        "Sec. 4, Fig. 5 (attention maps of DropKey against dropout)", "attention_dynamics",
        (Quantity("entropy_dropkey_minus_dropout", "final clean attention entropy (eval mode, mean over blocks and "
                  "heads, test images), DropKey run minus the same seed's post-softmax dropout run", "up", 0.02,
                  "a 2% change of the effective number of attended keys exp(H)", unit="nats"),),
        "Paired by seed.",
        ("tests/test_experiments.py::test_quick_experiments_measure_every_claim",),
    ),
    _vit_claim(
        "vit-compensation",
        "Compensation: a ViT trained with DropKey learns sharper attention p than one trained without a regulariser, "
        "while the expected attention E[w] its training steps see stays close to the plain model's p.",
        "ours (hypothesis): Eq. 4 is about E[w] at a fixed p; the network can undo the smoothing by sharpening p, "
        "which would explain higher learned peaks under DropKey", "attention_dynamics",
        (Quantity("train_peak_dropkey_minus_none", "final clean attention peak on the run's training images (mean over "
                  "blocks, heads and rows), DropKey run minus the same seed's run without regulariser", "up", 0.01,
                  PEAK),
         Quantity("train_expected_peak_dropkey_minus_learned_none", "peak of the DropKey model's exact E[w] minus the "
                  "plain model's learned peak, same seed, same training images", "equal", 0.01,
                  "within one percentage point of attention mass the expectation matches the plain model's "
                  "attention")),
        "Paired by seed; both quantities must hold.",
        ("tests/test_experiments.py::test_quick_experiments_measure_every_claim",
         "tests/test_experiments.py::test_train_evaluation_reads_the_runs_own_training_images"),
    ),
    _vit_claim(
        "vit-schedule",
        "A drop ratio decreasing with depth beats a constant one at the same mean ratio.",
        "Sec. 3 (how to schedule the drop ratio)", "schedules",
        (_top1("top1_decreasing_minus_constant", "test top-1 of the linearly decreasing schedule minus the constant "
               "one at the same mean ratio, same seed"),),
        "Paired by seed.",
        ("tests/test_schedules.py::test_linear_decreasing_is_the_papers_shape",
         "tests/test_schedules.py::test_named_schedules_share_the_mean",
         "tests/test_experiments.py::test_schedule_arms_share_the_mean_ratio"),
    ),
    _vit_claim(
        "vit-alignment",
        "Aligning training and inference — Monte-Carlo inference with DropKey masks, or training the last epochs "
        "without DropKey — improves top-1 over plain inference of a DropKey-trained ViT.",
        "the paper's alignment options for the train/test mismatch (docs/theory.md section 4)", "alignment",
        (_top1("top1_mc_minus_plain", "test top-1 of the mean of K DropKey passes (largest K) minus plain inference, "
               "same trained model"),
         _top1("top1_finetune_minus_plain", "test top-1 of the DropKey run after a drop-free fine-tune on a short "
               "schedule of its own (fresh AdamW, cosine from the scale's fine-tune lr to 0) minus its plain "
               "inference before it, same run")),
        "Paired by seed (each is the same trained model evaluated two ways).",
        ("tests/test_inference.py::test_average_of_probabilities_and_logits",
         "tests/test_experiments.py::test_finetune_starts_from_the_runs_weights_on_its_own_schedule"),
    ),
    _vit_claim(
        "vit-drop-ratio",
        "DropKey's gain over no attention regulariser holds across the paper's range of drop ratios, not only at one "
        "tuned ratio: constant DropKey at each r in {0.05, 0.1, 0.2, 0.3} beats no regulariser.",
        "Sec. 4 (the drop-ratio ablation; the paper's ratios lie in this range)", "drop_ratio",
        tuple(_top1(f"top1_dropkey_r{r:g}_minus_none", f"test top-1 of constant DropKey at r = {r:g} minus the same "
                    "seed's run without regulariser") for r in SENSITIVITY_RATIOS),
        "Paired by seed; every ratio must hold (one contradicted or inconclusive ratio makes it partly).",
        ("tests/test_experiments.py::test_quick_experiments_measure_every_claim",),
    ),
    _vit_claim(
        "vit-structured",
        "Structured DropKey (block, cross) brings no gain over plain DropKey.",
        "Sec. 3 (structured dropout is not essential for ViT)", "structured",
        (_top1("top1_block_minus_dropkey", "test top-1 of DropKey-Block minus DropKey at the same ratio, same seed",
               "no-gain"),
         _top1("top1_cross_minus_dropkey", "test top-1 of DropKey-Cross minus DropKey at the same ratio, same seed",
               "no-gain")),
        "Paired by seed.",
        ("tests/test_masks.py::test_structured_masks_drop_the_documented_footprints",
         "tests/test_modules.py::test_structured_drops_are_spatially_clustered"),
    ),
    _vit_claim(
        "deepvit-collapse",
        "Attention collapse: the deeper a plain ViT, the more alike its top blocks' attention maps become in "
        "training.",
        "DeepViT Sec. 3 (attention collapse, cross-layer similarity against depth)", "collapse",
        (Quantity("collapse_trend_plain", "per seed: the rise over initialisation of the plain ViT's top-block "
                  "centred similarity (Pearson correlation of attention-map columns), deepest net of the sweep minus "
                  "shallowest", "up", 0.05, SIMILARITY),),
        "A trend in depth after training, relative to the same networks at initialisation (an untrained network's "
        "near-uniform maps score ~1 on DeepViT's uncentred cosine, so a level says nothing).",
        ("tests/test_diagnostics.py::test_column_correlation_is_centred_and_scale_free",
         "tests/test_diagnostics.py::test_recorder_similarity_frame_over_blocks",
         "tests/test_experiments.py::test_top_blocks"),
    ),
    _vit_claim(
        "deepvit-reattention",
        "Re-attention lowers the cross-layer similarity of the top blocks' attention maps.",
        "DeepViT Sec. 4 (Re-attention)", "collapse",
        (_centred("centred_similarity_reattention_minus_plain", "top-block centred similarity of the maps that "
                  "multiply V (after Re-attention), Re-attention minus plain, deepest net, same seed"),),
        "The centred similarity is unmoved by Re-attention's BatchNorm (a per-map shift and scale).",
        ("tests/test_reattention.py::test_conv_bn_matches_einsum_then_batchnorm_in_training",
         "tests/test_diagnostics.py::test_column_correlation_is_centred_and_scale_free",
         "tests/test_experiments.py::test_quick_experiments_measure_every_claim"),
    ),
    _vit_claim(
        "dropkey-collapse",
        "DropKey also reduces attention collapse, beyond what its change of attention entropy explains: lower "
        "top-block similarity than a plain ViT, and than Re-attention alone when the two are combined.",
        "ours (no paper measures this)", "collapse",
        (_centred("centred_similarity_dropkey_minus_plain", "top-block centred similarity, DropKey minus plain, "
                  "deepest net, same seed", ENTROPY_COVARIATE),
         _centred("centred_similarity_both_minus_reattention", "top-block centred similarity, DropKey with "
                  "Re-attention minus Re-attention alone, deepest net, same seed", ENTROPY_COVARIATE)),
        "DropKey changes attention entropy, which alone moves similarity, so each difference is decided at a matched "
        "entropy difference (the intercept of a line through the seeds' differences).",
        ("tests/test_experiments.py::test_quick_experiments_measure_every_claim",
         "tests/test_statistics.py::test_covariate_decides_at_a_matched_covariate"),
    ),
)

CLAIMS += (
    _vit_claim(
        "deepvit-depth-saturation",
        "A plain ViT's accuracy saturates with depth: the deepest net of the sweep is no better than the next "
        "shallower one.",
        "DeepViT Sec. 1 and 3 (Fig. 1: plain ViT accuracy stops improving as blocks are added)", "collapse",
        (_top1("top1_plain_deepest_minus_next", "test top-1 of the plain ViT at the deepest depth of the sweep minus "
               "the same seed's plain ViT at the next depth", "no-gain"),),
        "Paired by seed.",
        ("tests/test_experiments.py::test_quick_experiments_measure_every_claim",),
    ),
    _vit_claim(
        "deepvit-reattention-accuracy",
        "Re-attention improves the accuracy of a deep ViT.",
        "DeepViT Sec. 4 and 5 (Re-attention lets deeper ViTs keep improving)", "collapse",
        (_top1("top1_reattention_minus_plain", "test top-1 of the ViT with Re-attention (second half of the blocks) "
               "minus the same seed's plain ViT, deepest net of the sweep"),),
        "Paired by seed.",
        ("tests/test_reattention.py::test_conv_bn_matches_einsum_then_batchnorm_in_training",
         "tests/test_experiments.py::test_quick_experiments_measure_every_claim"),
    ),
)

REQUIRED_CLAIM_IDS = tuple(c.id for c in CLAIMS)


def _mc_rate(evidence: Evidence) -> tuple[str, str]:
    numbers = measures.mc_rate(evidence)
    if numbers is None:
        return "not run", "—"
    slope, se = numbers["pooled_slope"], numbers["pooled_slope_se"]
    closed = numbers["cells"] - len(numbers["cells_not_closed"])
    key = (
        f"RMS slope {slope:.3f} ± {se:.3f} (−0.5 expected); "
        f"MC inference closer than plain in {closed}/{numbers['cells']} cells"
    )
    return ("passed" if abs(slope + 0.5) <= max(3 * se, 0.02) else "failed"), key


CHECKS: tuple[Check, ...] = (
    Check(
        "mc-inference-rate",
        "Monte-Carlo inference (the mean of K masked passes) converges to the training expectation at rate K^-1/2.",
        "train_test_mismatch",
        ("tests/test_sim_train_test_mismatch.py::test_mc_inference_error_falls_as_one_over_root_k",
         "tests/test_sim_train_test_mismatch.py::test_gap_grows_with_the_drop_ratio"),
        "A check of the inference code, not a claim: the mean of K iid bounded samples converges at K^-1/2 by the "
        "central limit theorem. Passed if the pooled log-RMS slope is within max(3 SE, 0.02) of −0.5.",
        _mc_rate,
    ),
)


def claim(claim_id: str) -> Claim:
    for candidate in CLAIMS:
        if candidate.id == claim_id:
            return candidate
    raise ValueError(f"unknown claim {claim_id!r}; known: {REQUIRED_CLAIM_IDS}")


def check(check_id: str) -> Check:
    for candidate in CHECKS:
        if candidate.id == check_id:
            return candidate
    raise ValueError(f"unknown check {check_id!r}; known: {tuple(c.id for c in CHECKS)}")


def empirical_findings(verdicts: Mapping[str, Verdict]) -> list[tuple[Claim, Finding]]:
    """Every decided finding of the empirical claims, in registry order (for the forest plot)."""
    return [(c, finding) for c in CLAIMS if c.id in verdicts for finding in verdicts[c.id].findings]
