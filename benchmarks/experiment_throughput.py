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


def per_arm(runs: pd.DataFrame) -> pd.DataFrame:
    """Median images/s per arm (over runs of each run's median over epochs >= 2) and the ratio to none."""
    later = runs[runs["epoch"] >= 2]
    per_run = later.groupby(["arm", "seed"], as_index=False)["images_per_s"].median()
    table = per_run.groupby("arm", as_index=False)["images_per_s"].agg(median="median", runs="count",
                                                                       low="min", high="max")
    base = float(table.loc[table["arm"] == "none", "median"].iloc[0]) if "none" in set(table["arm"]) else float("nan")
    return table.assign(ratio_to_none=table["median"] / base)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="small_data")
    parser.add_argument("--experiment", default="accuracy")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    result = load_result(args.results_dir, args.scale, args.experiment)
    table = per_arm(result.runs)
    lines = [f"# Training throughput of the `{args.experiment}` runs at `{args.scale}` scale", "",
             f"{result.summary['runs']} runs, seeds {result.summary['seeds']}; the median over runs of each run's "
             "median images/s over epochs 2.. (epoch 1 includes warm-up); ratio against the `none` arm of the same "
             "experiment. Measured by the runs themselves, load from other processes included: the runner trains arm "
             "after arm, so an arm that trained while the machine was busier looks slower, and the ratios mix the "
             "regulariser's cost with the load of the time. The controlled, interleaved ratio of a training step is "
             "benchmarks/results/training_cpu.md.", "",
             "| arm | images/s (median) | min | max | runs | / none |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.arm} | {r.median:.0f} | {r.low:.0f} | {r.high:.0f} | {r.runs} | {r.ratio_to_none:.3f}x |"
              for r in table.itertuples()]
    record = {k: result.provenance.get(k) for k in ("git_commit", "command", "machine", "versions")}
    lines += ["", f"Provenance of the runs' result folder: {json.dumps(record, sort_keys=True, default=str)}", ""]
    out = ROOT / "benchmarks" / "results" / f"experiment_throughput_{args.scale}_{args.experiment}.md"
    write_text_atomic(out, "\n".join(lines))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
