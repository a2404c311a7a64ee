"""Benchmark: training throughput of a real-ViT experiment's runs, per arm, from the runs themselves.

Every training run records its images per second each epoch (``runs.csv`` of the result folder,
:mod:`dropkey.lab.experiments`). This summarises them per arm: the median over runs of each run's
median over epochs 2.. (epoch 1 includes warm-up), and its ratio to the ``none`` arm's, measured in
the same experiment (the runs of all arms trained in the same jobs on the same machine, interleaved
by the runner's order: arm-major, seed-minor, ``--jobs`` at a time). It is what the experiment
actually achieved, load from other processes included; ``benchmarks/bench_training.py`` is the
controlled, interleaved measurement of a training step.

Usage: python benchmarks/experiment_throughput.py [--scale small_data] [--experiment accuracy]
Writes benchmarks/results/experiment_throughput_<scale>_<experiment>.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from dropkey.lab.experiments import load_result
from dropkey.storage import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def baseline_arm(runs: pd.DataFrame) -> str:
    """The arm the ratios are taken against: ``none`` or ``plain`` where the experiment has it, else ``dropkey``."""
    arms = list(dict.fromkeys(runs["arm"]))
    return next((arm for arm in ("none", "plain", "dropkey") if arm in arms), arms[0])


def per_arm(runs: pd.DataFrame) -> pd.DataFrame:
    """Median images/s per (group, arm) (over runs of each run's median over epochs >= 2) and the ratio to the
    baseline arm of the same group (:func:`baseline_arm`)."""
    later = runs[runs["epoch"] >= 2]
    per_run = later.groupby(["group", "arm", "seed"], as_index=False, sort=False)["images_per_s"].median()
    table = per_run.groupby(["group", "arm"], as_index=False, sort=False)["images_per_s"].agg(
        median="median", runs="count", low="min", high="max")
    base_arm = baseline_arm(runs)
    base = table[table["arm"] == base_arm].set_index("group")["median"]
    return table.assign(ratio=table["median"] / table["group"].map(base))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="small_data")
    parser.add_argument("--experiment", default="accuracy")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    result = load_result(args.results_dir, args.scale, args.experiment)
    table = per_arm(result.runs.fillna({"group": ""}))
    base = baseline_arm(result.runs)
    lines = [f"# Training throughput of the `{args.experiment}` runs at `{args.scale}` scale", "",
             f"{result.summary['runs']} runs, seeds {result.summary['seeds']}; the median over runs of each run's "
             f"median images/s over epochs 2.. (epoch 1 includes warm-up); ratio against the `{base}` arm of the same "
             "experiment (and group). Measured by the runs themselves, load from other processes included: the runner "
             "trains arm after arm, so an arm that trained while the machine was busier looks slower, and the ratios "
             "mix the regulariser's cost with the load of the time. The controlled, interleaved ratio of a training "
             "step is benchmarks/results/training_cpu.md.", "",
             f"| arm | images/s (median) | min | max | runs | / {base} |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.group + ' ' if r.group else ''}{r.arm} "
              f"| {r.median:.0f} | {r.low:.0f} | {r.high:.0f} | {r.runs} | {r.ratio:.3f}x |"
              for r in table.itertuples()]
    record = {k: result.provenance.get(k) for k in ("git_commit", "command", "machine", "versions")}
    lines += ["", f"Provenance of the runs' result folder: {json.dumps(record, sort_keys=True, default=str)}", ""]
    out = ROOT / "benchmarks" / "results" / f"experiment_throughput_{args.scale}_{args.experiment}.md"
    write_text_atomic(out, "\n".join(lines))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
