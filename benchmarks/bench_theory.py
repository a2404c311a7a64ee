"""Benchmark: exact DropKey smoothing coefficients by the integral method.

For N in {16, 65, 197, 577} keys (ViT rows: 65 = 8x8 patches + class token,
197 = 14x14 + 1, 577 = 24x24 + 1) this prints

- the median time to compute all N coefficients with method="integral",
- its error: against enumeration (N = 16) and against an independent
  high-precision reference (mpmath quadrature at 30 digits of the integral,
  on a subset of keys spanning the smallest to the largest weight),
- the time a Monte-Carlo estimate needs to reach 1e-3 relative accuracy (one
  standard error, from the exact variance) on every coefficient, measured by
  sampling that many masks, and the ratio to the exact method.

Rows are ViT-like: softmax of Gaussian logits (std 2), drop ratio 0.1.
Results (with machine, versions and commit) go to benchmarks/results/theory_cpu.{md,json}.
Usage: python benchmarks/bench_theory.py [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mpmath
import numpy as np

from dropkey.provenance import provenance
from dropkey.storage import write_json_atomic, write_text_atomic
from theory import attention_variance, sampled_expected_attention, smoothing_coefficients

RESULTS = Path(__file__).resolve().parent / "results"
DROP_RATIO = 0.1
TARGET_SECONDS_N197 = 0.020
TARGET_RELATIVE_ERROR = 1e-10


def vit_like_row(n_keys: int, rng: np.random.Generator) -> np.ndarray:
    logits = rng.normal(0.0, 2.0, n_keys)
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mpmath_coefficient(p: np.ndarray, j: int, r: float, digits: int = 30) -> float:
    """c_j = (1-r) * int_0^inf e^(-t p_j) prod_{k != j} (r + (1-r) e^(-t p_k)) dt at `digits` digits."""
    with mpmath.workdps(digits):
        weights = [mpmath.mpf(float(x)) for x in p]
        keep = 1 - mpmath.mpf(r)
        drop = mpmath.mpf(r)
        others = weights[:j] + weights[j + 1 :]

        def integrand(t):
            return mpmath.exp(-t * weights[j]) * mpmath.fprod(drop + keep * mpmath.exp(-t * w) for w in others)

        # Break points at every decade the weights live on, so tanh-sinh sees smooth pieces.
        decades = sorted({mpmath.mpf(10) ** k for k in range(-1, int(np.ceil(-np.log10(p.min()))) + 3)})
        return float(keep * mpmath.quad(integrand, [0, *decades, mpmath.inf]))


def monte_carlo_samples_needed(p: np.ndarray, r: float, relative: float) -> int:
    """Samples for one standard error <= relative * E[w_j] on every key (exact variance)."""
    expected = smoothing_coefficients(p, r) * p
    variance = attention_variance(p, r)
    return int(np.ceil(np.max(variance / (relative * expected) ** 2)))


def run(quick: bool, seed: int) -> list[dict]:
    children = np.random.SeedSequence(seed).spawn(4)
    rows = []
    for child, n_keys in zip(children, (16, 65, 197, 577)):
        rng = np.random.default_rng(child)
        p = vit_like_row(n_keys, rng)
        exact = smoothing_coefficients(p, DROP_RATIO, method="integral")
        seconds = median_seconds(lambda: smoothing_coefficients(p, DROP_RATIO, method="integral"), 5 if quick else 21)

        if n_keys <= 16:
            reference = smoothing_coefficients(p, DROP_RATIO, method="enumerate")
            keys = np.arange(n_keys)
            reference_name = "enumeration"
        else:
            order = np.argsort(p)
            keys = order[np.linspace(0, n_keys - 1, 3 if quick else 6).round().astype(int)]
            reference = np.full(n_keys, np.nan)
            for j in keys:
                reference[j] = mpmath_coefficient(p, int(j), DROP_RATIO)
            reference_name = f"mpmath (30 digits, {keys.size} keys)"
        error = float(np.max(np.abs(exact[keys] - reference[keys]) / reference[keys]))

        samples = monte_carlo_samples_needed(p, DROP_RATIO, 1e-3)
        if quick:  # time a tenth of the samples and scale (sampling cost is linear)
            measured = max(2, samples // 10)
            start = time.perf_counter()
            sampled_expected_attention(p, DROP_RATIO, num_samples=measured, seed=rng.integers(2**63))
            mc_seconds = (time.perf_counter() - start) * samples / measured
        else:
            start = time.perf_counter()
            sampled_expected_attention(p, DROP_RATIO, num_samples=samples, seed=rng.integers(2**63))
            mc_seconds = time.perf_counter() - start
        rows.append(
            {
                "n_keys": n_keys,
                "integral_ms": seconds * 1e3,
                "max_relative_error": error,
                "reference": reference_name,
                "mc_samples_for_1e-3": samples,
                "mc_seconds": mc_seconds,
                "mc_over_integral": mc_seconds / seconds,
                "mc_timing": "extrapolated from 10%" if quick else "measured",
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        "| N | integral (ms, median) | max rel. error | reference | MC samples for 1e-3 | MC time (s) | MC / integral |\n"
        "|---:|---:|---:|---|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"| {row['n_keys']} | {row['integral_ms']:.2f} | {row['max_relative_error']:.1e} | {row['reference']} "
            f"| {row['mc_samples_for_1e-3']:,} | {row['mc_seconds']:.2f} ({row['mc_timing']}) | {row['mc_over_integral']:,.0f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and reference keys")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)

    rows = run(args.quick, args.seed)
    table = format_table(rows)
    n197 = next(row for row in rows if row["n_keys"] == 197)
    verdict = (
        f"Target (N=197: all coefficients to {TARGET_RELATIVE_ERROR:g} relative error in under "
        f"{TARGET_SECONDS_N197 * 1e3:.0f} ms): "
        + (
            "met"
            if n197["integral_ms"] < TARGET_SECONDS_N197 * 1e3 and n197["max_relative_error"] < TARGET_RELATIVE_ERROR
            else "NOT met"
        )
        + f" ({n197['integral_ms']:.2f} ms, error {n197['max_relative_error']:.1e}; "
        f"Monte-Carlo to 1e-3 takes {n197['mc_over_integral']:,.0f}x longer)."
    )
    print(table)
    print()
    print(verdict)
    if not args.no_save:
        record = {"drop_ratio": DROP_RATIO, "rows": rows, "verdict": verdict, "quick": args.quick,
                  "provenance": provenance(seed=args.seed)}
        write_json_atomic(RESULTS / "theory_cpu.json", record)
        meta = record["provenance"]
        write_text_atomic(
            RESULTS / "theory_cpu.md",
            f"# Exact smoothing coefficients: integral method (r = {DROP_RATIO})\n\n{table}\n\n{verdict}\n\n"
            f"Machine: {meta['machine']}; versions: {meta['versions']}; commit {meta['git_commit']}; "
            f"seed {args.seed}; command `{meta['command']}`; {meta['utc_time']}.\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
