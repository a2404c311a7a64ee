"""Benchmark: exact DropKey smoothing coefficients by the integral method.

For N in {16, 65, 197, 577} keys (ViT rows: 65 = 8x8 patches + class token,
197 = 14x14 + 1, 577 = 24x24 + 1) this prints

- the median time to compute all N coefficients with method="integral",
- its error on every one of the N coefficients: against enumeration (N = 16)
  and against an independent high-precision reference (N >= 65:
  :func:`theory.reference.mpmath_coefficients`, mpmath tanh-sinh quadrature at
  30 digits of the original integral
  c_j = (1-r) int_0^oo e^(-t p_j) prod_{k!=j} (r + (1-r) e^(-t p_k)) dt,
  not the integral method's substitution, grid and log-space form),
- the time a Monte-Carlo estimate needs to reach 1e-3 relative accuracy (one
  standard error, from the exact variance) on every coefficient, measured by
  sampling that many masks (median of 3 runs), and the ratio to the exact method,
- the error at N = 197, all keys, across drop ratios from 0.001 to 0.99.

Rows are ViT-like (:func:`theory.rows.softmax_gaussian_rows`: softmax of Gaussian
logits, std 2), drop ratio 0.1 unless stated. ``--quick`` checks 3 keys per row
(smallest, median, largest weight), times fewer repeats, extrapolates the
Monte-Carlo time from a tenth of the samples and skips the drop-ratio sweep.
Timings are medians; the machine may be shared with other processes, and the
results file records the load average before and after the run.
Results (with machine, versions and commit) go to benchmarks/results/theory_cpu.{md,json}.
Usage: python benchmarks/bench_theory.py [--quick] [--seed 0] [--no-save]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dropkey.provenance import provenance
from dropkey.storage import write_json_atomic, write_text_atomic
from theory import attention_variance, sampled_expected_attention, smoothing_coefficients
from theory.integral import STEP
from theory.reference import REFERENCE_DIGITS, mpmath_coefficients
from theory.rows import softmax_gaussian_rows

RESULTS = Path(__file__).resolve().parent / "results"
DROP_RATIO = 0.1
SIZES = (16, 65, 197, 577)
SWEEP_KEYS = 197
SWEEP_DROP_RATIOS = (0.001, 0.3, 0.7, 0.99)
TARGET_SECONDS_N197 = 0.020
TARGET_RELATIVE_ERROR = 1e-10
MC_REPEATS = 3


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_keys(p: np.ndarray, quick: bool) -> np.ndarray:
    """Every key, or (quick, mpmath rows) the smallest-, median- and largest-weight keys."""
    if not quick or p.size <= 16:  # enumeration checks every key at no extra cost
        return np.arange(p.size)
    order = np.argsort(p)
    return order[np.linspace(0, p.size - 1, 3).round().astype(int)]


def integral_error(p: np.ndarray, r: float, keys: np.ndarray) -> tuple[float, float, str]:
    """(max relative error of the integral method on ``keys``, reference's own error estimate, reference name)."""
    exact = smoothing_coefficients(p, r, all_dropped="zero", method="integral")
    if p.size <= 16:
        reference = smoothing_coefficients(p, r, all_dropped="zero", method="enumerate")
        return float(np.max(np.abs(exact[keys] - reference[keys]) / reference[keys])), 0.0, "enumeration"
    values, estimate = mpmath_coefficients(p, keys, r)
    reference = np.array([values[int(j)] for j in keys])
    return float(np.max(np.abs(exact[keys] - reference) / reference)), estimate, f"mpmath ({REFERENCE_DIGITS} digits)"


def monte_carlo_samples_needed(p: np.ndarray, r: float, relative: float) -> int:
    """Samples for one standard error <= relative * E[w_j] on every key (exact variance)."""
    expected = smoothing_coefficients(p, r, all_dropped="zero") * p
    variance = attention_variance(p, r, all_dropped="zero")
    return int(np.ceil(np.max(variance / (relative * expected) ** 2)))


def monte_carlo_seconds(p: np.ndarray, samples: int, rng: np.random.Generator, quick: bool) -> float:
    """Median time to sample ``samples`` masks (quick: one run of a tenth, scaled; sampling cost is linear)."""
    if quick:
        measured = max(2, samples // 10)
        start = time.perf_counter()
        sampled_expected_attention(p, DROP_RATIO, num_samples=measured, seed=int(rng.integers(2**63)))
        return (time.perf_counter() - start) * samples / measured
    seed = int(rng.integers(2**63))
    times = []
    for _ in range(MC_REPEATS):
        start = time.perf_counter()
        sampled_expected_attention(p, DROP_RATIO, num_samples=samples, seed=seed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool, seed: int) -> list[dict]:
    """One result row per N at r = DROP_RATIO."""
    children = np.random.SeedSequence(seed).spawn(len(SIZES))
    rows = []
    repeats = 5 if quick else 21
    for child, n_keys in zip(children, SIZES, strict=True):
        rng = np.random.default_rng(child)
        p = softmax_gaussian_rows(rng, 1, n_keys)[0]
        seconds = median_seconds(lambda p=p: smoothing_coefficients(p, DROP_RATIO, method="integral"), repeats)
        keys = reference_keys(p, quick)
        started = time.perf_counter()
        error, reference_estimate, reference_name = integral_error(p, DROP_RATIO, keys)
        reference_seconds = time.perf_counter() - started
        samples = monte_carlo_samples_needed(p, DROP_RATIO, 1e-3)
        mc_seconds = monte_carlo_seconds(p, samples, rng, quick)
        rows.append(
            {
                "n_keys": n_keys,
                "integral_ms": seconds * 1e3,
                "integral_repeats": repeats,
                "max_relative_error": error,
                "reference": reference_name,
                "keys_checked": int(keys.size),
                "reference_error_estimate": reference_estimate,
                "reference_seconds": reference_seconds,
                "mc_samples_for_1e-3": samples,
                "mc_seconds": mc_seconds,
                "mc_over_integral": mc_seconds / seconds,
                "mc_timing": "extrapolated from 10%" if quick else f"median of {MC_REPEATS}",
            }
        )
    return rows


def drop_ratio_sweep(seed: int) -> list[dict]:
    """The integral method's error on all keys of one N = 197 row, for each drop ratio in SWEEP_DROP_RATIOS."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(len(SIZES) + 1)[-1])
    p = softmax_gaussian_rows(rng, 1, SWEEP_KEYS)[0]
    sweep = []
    for r in SWEEP_DROP_RATIOS:
        error, estimate, _ = integral_error(p, r, np.arange(p.size))
        sweep.append({"drop_ratio": r, "n_keys": SWEEP_KEYS, "max_relative_error": error,
                      "reference_error_estimate": estimate})
    return sweep


def keys_label(row: dict) -> str:
    return (
        f"all {row['n_keys']}" if row["keys_checked"] == row["n_keys"] else f"{row['keys_checked']} of {row['n_keys']}"
    )


def format_table(rows: list[dict]) -> str:
    header = (
        "| N | integral (ms, median) | max rel. error | reference | keys checked "
        "| MC samples for 1e-3 | MC time (s) | MC / integral |\n"
        "|---:|---:|---:|---|---|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"| {row['n_keys']} | {row['integral_ms']:.2f} | {row['max_relative_error']:.1e} | {row['reference']} "
            f"| {keys_label(row)} | {row['mc_samples_for_1e-3']:,} | {row['mc_seconds']:.2f} ({row['mc_timing']}) "
            f"| {row['mc_over_integral']:,.0f}x |"
        )
    return "\n".join(lines)


def format_sweep(sweep: list[dict]) -> str:
    lines = [
        f"| r | max rel. error (N = {SWEEP_KEYS}, all keys, vs mpmath) |",
        "|---:|---:|",
    ]
    lines += [f"| {item['drop_ratio']:g} | {item['max_relative_error']:.1e} |" for item in sweep]
    return "\n".join(lines)


def verdict_line(rows: list[dict]) -> str:
    n197 = next(row for row in rows if row["n_keys"] == 197)
    met = n197["integral_ms"] < TARGET_SECONDS_N197 * 1e3 and n197["max_relative_error"] < TARGET_RELATIVE_ERROR
    return (
        f"Target (N=197: all coefficients to {TARGET_RELATIVE_ERROR:g} relative error in under "
        f"{TARGET_SECONDS_N197 * 1e3:.0f} ms): {'met' if met else 'NOT met'} ({n197['integral_ms']:.2f} ms, "
        f"max error {n197['max_relative_error']:.1e} over {keys_label(n197)} keys; "
        f"Monte-Carlo to 1e-3 takes {n197['mc_over_integral']:,.0f}x longer)."
        + ("" if n197["keys_checked"] == n197["n_keys"] else " Quick run: not every key was checked.")
    )


def machine_note(
    load_before: tuple[float, ...], load_after: tuple[float, ...], reference_estimate: float, quick: bool
) -> str:
    monte_carlo = "extrapolated from one run of 10% of the samples" if quick else f"median of {MC_REPEATS} runs"
    return (
        f"Timings are medians (integral: of {5 if quick else 21} repeats; Monte-Carlo: {monte_carlo}). "
        f"The machine's {os.cpu_count()} CPU cores were shared with other "
        "processes (other engineers' builds and tests) during the run, so absolute times are noisy "
        f"and on the slow side; 1-minute load average {load_before[0]:.2f} before, {load_after[0]:.2f} after. "
        f"The integral method is a trapezoid in u = log t with the fixed step {STEP:g} (checked against "
        "the step twice as large); the errors above are measured against the reference, "
        f"whose own relative quadrature error mpmath estimates at most {reference_estimate:.0e}."
    )


def benchmark_parser(description: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every theory benchmark takes: --quick, --seed, --no-save."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="print only")
    return parser


def save_results(stem: str, title: str, body: str, record: dict, seed: int) -> None:
    """Write RESULTS/<stem>.json (the record plus its provenance) and RESULTS/<stem>.md."""
    record = {**record, "provenance": provenance(seed=seed)}
    write_json_atomic(RESULTS / f"{stem}.json", record)
    meta = record["provenance"]
    write_text_atomic(
        RESULTS / f"{stem}.md",
        f"# {title}\n\n{body}\n\n"
        f"Machine: {meta['machine']}; versions: {meta['versions']}; commit {meta['git_commit']}; "
        f"seed {seed}; command `{meta['command']}`; {meta['utc_time']}.\n",
    )


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.splitlines()[0], "3 reference keys per row, fewer repeats, no sweep")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    rows = run(args.quick, args.seed)
    sweep = [] if args.quick else drop_ratio_sweep(args.seed)
    load_after = os.getloadavg()
    table = format_table(rows)
    verdict = verdict_line(rows)
    reference_estimate = max(item["reference_error_estimate"] for item in rows + sweep)
    note = machine_note(load_before, load_after, reference_estimate, args.quick)
    sections = [table, verdict] + ([f"Accuracy across drop ratios:\n\n{format_sweep(sweep)}"] if sweep else []) + [note]
    body = "\n\n".join(sections)
    print(body)
    if not args.no_save:
        record = {
            "drop_ratio": DROP_RATIO, "rows": rows, "drop_ratio_sweep": sweep, "verdict": verdict,
            "quick": args.quick, "integral_step": STEP, "reference_digits": REFERENCE_DIGITS,
            "load_average_before": list(load_before), "load_average_after": list(load_after),
        }
        save_results("theory_cpu", f"Exact smoothing coefficients: integral method (r = {DROP_RATIO})", body,
                     record, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
