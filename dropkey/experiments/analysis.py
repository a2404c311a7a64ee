"""From finished runs to tidy tables, paired comparisons and the measurements the claims read.

Every comparison is *paired by seed*: arms trained with the same seed share the model
initialisation, the data order and the augmentation stream, so for quantity X and arms A, B
the per-seed differences d_s = X(A, s) - X(B, s) are averaged and their standard error is
``std(d, ddof=1) / sqrt(n)`` over the n seeds (NaN for n = 1). Verdict rules in
:mod:`reports.claims` compare a difference with 2 SE. With 3 seeds that SE is itself
uncertain; the report prints n next to every number.

Per-run quantities (final epoch; attention metrics are the trainer's diagnostics, computed in
eval mode on a fixed batch of test images, see :mod:`dropkey.diagnostics`):

- ``top1``: test accuracy in percent;
- ``peak`` / ``entropy``: attention peak weight and entropy, mean over blocks and heads;
- ``grad_ratio``: |dL/ds| on the most-attended logit over the mean |dL/ds| on the other kept
  logits, per block (mean over heads), then mean over blocks;
- ``top_similarity``: DeepViT's cross-layer similarity of adjacent blocks (mean over heads and
  tokens), averaged over the adjacent pairs inside the top ``max(2, ceil(depth / 3))`` blocks, of
  the maps that multiply V (after Re-attention: DeepViT's definition);
- ``top_similarity_softmax``: the same of the softmax weights before any Re-attention mixing
  (the like-for-like comparison: Re-attention's BatchNorm makes its maps signed and roughly
  zero-mean, which alone drives their cosine toward 0); equal to ``top_similarity`` without
  Re-attention;
- ``expected_peak`` / ``expected_entropy``: the same of the final model's expected attention
  under its regulariser, E[w] over the masks (exact; what a training step sees on average;
  :func:`dropkey.experiments.runner.expected_attention_rows`), on the rows of the first 8
  diagnostics images; NaN for structured masks; ``learned_peak`` / ``learned_entropy``: p on
  those same rows;
- ``images_per_s``: median training throughput over epochs 2.. (epoch 1 includes warm-up).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dropkey.experiments.runner import EXPECTED_ATTENTION_FILE, MONTE_CARLO_FILE, RunSpec

ATTENTION_METRICS = ("peak", "entropy", "abs_grad_top", "abs_grad_rest", "similarity", "similarity_softmax")


class IncompleteRun(RuntimeError):
    """A run folder lacks a file or holds a NaN where a number is needed."""


def top_blocks(depth: int) -> range:
    """The blocks called 'top' in the collapse measure: the last max(2, ceil(depth / 3)) (all, if fewer)."""
    count = min(depth, max(2, math.ceil(depth / 3)))
    return range(depth - count, depth)


# --- reading runs -------------------------------------------------------------------------------


def _labels(spec: RunSpec) -> dict[str, Any]:
    return {"arm": spec.arm.name, "group": spec.arm.group, "seed": spec.seed, "run_key": spec.folder.name}


def run_tables(specs: Sequence[RunSpec]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(metrics per epoch, attention diagnostics per epoch and block (mean over heads), Monte-Carlo accuracy)."""
    metrics, attention, monte_carlo = [], [], []
    for spec in specs:
        folder, labels = spec.folder, _labels(spec)
        try:
            frame = pd.read_csv(folder / "metrics.csv")
            diagnostics = pd.read_csv(folder / "diagnostics.csv")
        except FileNotFoundError as error:
            raise IncompleteRun(f"run {folder} has no {Path(error.filename).name}: train it first") from error
        metrics.append(frame.assign(**labels))
        diagnostics = diagnostics[diagnostics["metric"].isin(ATTENTION_METRICS)]
        diagnostics = diagnostics.assign(other_layer=diagnostics["other_layer"].fillna(-1).astype(int))
        per_block = diagnostics.groupby(["epoch", "layer", "other_layer", "metric"], as_index=False)["value"].mean()
        attention.append(per_block.assign(**labels))
        expected_path = folder / EXPECTED_ATTENTION_FILE
        if not expected_path.is_file():
            raise IncompleteRun(f"run {folder} has no {EXPECTED_ATTENTION_FILE}: evaluate it first")
        expected = pd.read_csv(expected_path)  # of the final model: recorded at the last epoch
        attention.append(expected.assign(epoch=int(frame["epoch"].max()), other_layer=-1, **labels))
        if spec.monte_carlo:
            path = folder / MONTE_CARLO_FILE
            if not path.is_file():
                raise IncompleteRun(f"run {folder} has no {MONTE_CARLO_FILE}: evaluate it first")
            monte_carlo.append(pd.read_csv(path).assign(**labels))
    columns = ["arm", "group", "seed", "run_key"]
    order = lambda frame: frame[columns + [c for c in frame.columns if c not in columns]]  # noqa: E731
    metrics_frame = order(pd.concat(metrics, ignore_index=True))
    attention_frame = order(pd.concat(attention, ignore_index=True))
    mc_frame = order(pd.concat(monte_carlo, ignore_index=True)) if monte_carlo else pd.DataFrame(columns=columns + ["k", "test_acc"])
    return metrics_frame, attention_frame, mc_frame


def _top_similarity(block_rows: pd.DataFrame, depth: int, metric: str = "similarity") -> float:
    top = set(top_blocks(depth))
    pairs = block_rows[(block_rows["metric"] == metric) & block_rows["layer"].isin(top) & block_rows["other_layer"].isin(top)]
    return float(pairs["value"].mean()) if len(pairs) else math.nan


def final_quantities(specs: Sequence[RunSpec], metrics: pd.DataFrame, attention: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the per-run quantities of the module doc."""
    rows = []
    for spec in specs:
        key = spec.folder.name
        run_metrics = metrics[metrics["run_key"] == key].sort_values("epoch")
        run_attention = attention[attention["run_key"] == key]
        last = run_attention[run_attention["epoch"] == run_attention["epoch"].max()]
        per_block = last[last["other_layer"] < 0].pivot_table(index="layer", columns="metric", values="value", dropna=False)
        depth = spec.config.model_config().depth
        later = run_metrics[run_metrics["epoch"] >= 2]["images_per_s"]
        row = {
            **_labels(spec),
            "depth": depth,
            "epochs": int(run_metrics["epoch"].max()),
            "top1": 100.0 * float(run_metrics["test_acc"].iloc[-1]),
            "peak": float(per_block["peak"].mean()),
            "entropy": float(per_block["entropy"].mean()),
            "expected_peak": float(per_block["expected_peak"].mean()),
            "expected_entropy": float(per_block["expected_entropy"].mean()),
            "learned_peak": float(per_block["learned_peak"].mean()),
            "learned_entropy": float(per_block["learned_entropy"].mean()),
            "grad_ratio": float((per_block["abs_grad_top"] / per_block["abs_grad_rest"]).mean()),
            "top_similarity": _top_similarity(last, depth),
            "top_similarity_softmax": _top_similarity(last, depth, "similarity_softmax"),
            "images_per_s": float(later.median() if len(later) else run_metrics["images_per_s"].median()),
        }
        needed = ("top1", "peak", "entropy", "grad_ratio") + (("top_similarity",) if depth > 1 else ())
        bad = [name for name in needed if not math.isfinite(row[name])]
        if bad:
            raise IncompleteRun(f"run {spec.folder} ({spec.arm.name}, seed {spec.seed}) has non-finite {bad}")
        rows.append(row)
    return pd.DataFrame(rows)


# --- paired comparisons -------------------------------------------------------------------------


def mean_and_se(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Mean, standard error (``std(ddof=1) / sqrt(n)``, NaN for n = 1) and n of ``values``."""
    x = np.asarray(values, dtype=float)
    if not len(x):
        raise ValueError("values must hold at least one number")
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return {"value": float(x.mean()), "standard_error": se, "n": len(x)}


def paired_difference(values: pd.DataFrame, column: str, arm_a: str, arm_b: str) -> dict[str, Any]:
    """Mean and SE over seeds of column(arm_a) - column(arm_b), paired by seed (see the module doc)."""
    a = values[values["arm"] == arm_a].set_index("seed")[column]
    b = values[values["arm"] == arm_b].set_index("seed")[column]
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        raise ValueError(f"no seed has both arms {arm_a!r} and {arm_b!r}")
    return mean_and_se([a[s] - b[s] for s in seeds])


def arm_mean(values: pd.DataFrame, column: str, arm: str) -> dict[str, Any]:
    """Mean and SE over seeds of one arm's column."""
    if not (values["arm"] == arm).any():
        raise ValueError(f"no run of arm {arm!r}")
    return mean_and_se(values[values["arm"] == arm][column])


def _row(quantity: str, stats: dict[str, Any], description: str, group: str = "", layer: int = -1) -> dict[str, Any]:
    return {"quantity": quantity, "group": group, "layer": layer, **stats, "description": description}


def _per_layer(attention: pd.DataFrame, metric: str, arm_a: str, arm_b: str, quantity: str) -> list[dict[str, Any]]:
    """Per-block paired differences of an attention metric at the final epoch."""
    last = attention[(attention["epoch"] == attention.groupby("run_key")["epoch"].transform("max"))
                     & (attention["metric"] == metric) & (attention["other_layer"] < 0)]
    rows = []
    for layer, block in last.groupby("layer"):
        stats = paired_difference(block, "value", arm_a, arm_b)
        rows.append(_row(quantity, stats, f"block {layer}: {metric}({arm_a}) - {metric}({arm_b})", layer=int(layer)))
    return rows


# --- per experiment --------------------------------------------------------------------------------


def _pairs(finals: pd.DataFrame, column: str, pairs: Sequence[tuple[str, str, str]], unit: str = "") -> list[dict[str, Any]]:
    return [
        _row(name, paired_difference(finals, column, a, b), f"{column}({a}) - {column}({b}){unit}")
        for name, a, b in pairs
    ]


def _means(finals: pd.DataFrame, column: str, group: str = "") -> list[dict[str, Any]]:
    return [_row(f"{column}_{arm}", arm_mean(finals, column, arm), f"mean {column} of {arm}", group=group)
            for arm in dict.fromkeys(finals["arm"])]


def _attention_dynamics(finals, attention, mc) -> list[dict[str, Any]]:
    rows = _means(finals, "peak") + _means(finals, "entropy") + _means(finals, "grad_ratio")
    rows += _pairs(finals, "peak", [("peak_dropkey_minus_none", "dropkey", "none"),
                                    ("peak_dropout_minus_none", "dropout", "none"),
                                    ("peak_dropkey_minus_dropout", "dropkey", "dropout")])
    rows += _pairs(finals, "entropy", [("entropy_dropkey_minus_none", "dropkey", "none"),
                                       ("entropy_dropout_minus_none", "dropout", "none"),
                                       ("entropy_dropkey_minus_dropout", "dropkey", "dropout")], " (nats)")
    rows += _pairs(finals, "grad_ratio", [("grad_ratio_dropkey_minus_none", "dropkey", "none"),
                                          ("grad_ratio_dropout_minus_none", "dropout", "none")])
    # expected attention under each regulariser (what a training step sees on average; = p for none, dropout)
    rows += _means(finals, "expected_peak") + _means(finals, "expected_entropy")
    rows += _pairs(finals, "expected_peak", [("expected_peak_dropkey_minus_none", "dropkey", "none")])
    rows += _pairs(finals, "expected_entropy", [("expected_entropy_dropkey_minus_none", "dropkey", "none")], " (nats)")
    dropkey = finals[finals["arm"] == "dropkey"]  # the masks' own smoothing of the DropKey model's rows (theory: < 0)
    rows.append(_row("expected_minus_learned_peak_dropkey",
                     mean_and_se(dropkey["expected_peak"] - dropkey["learned_peak"]),
                     "peak(E[w]) - peak(p) of the DropKey model on the same rows: the smoothing its masks apply"))
    for arm in ("dropkey", "dropout"):
        rows += _per_layer(attention, "peak", arm, "none", f"peak_{arm}_minus_none_by_block")
        rows += _per_layer(attention, "entropy", arm, "none", f"entropy_{arm}_minus_none_by_block")
    return rows


def _accuracy(finals, attention, mc) -> list[dict[str, Any]]:
    return _means(finals, "top1") + _pairs(finals, "top1", [
        ("top1_dropkey_minus_none", "dropkey", "none"),
        ("top1_dropkey_minus_dropout", "dropkey", "dropout"),
        ("top1_dropout_minus_none", "dropout", "none"),
    ], " (percentage points)")


def _schedules(finals, attention, mc) -> list[dict[str, Any]]:
    return _means(finals, "top1") + _pairs(finals, "top1", [
        ("top1_decreasing_minus_constant", "decreasing", "constant"),
        ("top1_decreasing_minus_increasing", "decreasing", "increasing"),
        ("top1_increasing_minus_constant", "increasing", "constant"),
    ], " (percentage points)")


def _alignment(finals, attention, mc) -> list[dict[str, Any]]:
    rows = _means(finals, "top1") + _pairs(
        finals, "top1", [("top1_finetune_minus_plain", "finetune", "dropkey")], " (percentage points)"
    )
    accuracy = 100.0 * mc.pivot_table(index="seed", columns="k", values="test_acc")  # k = 0: plain inference
    ks = sorted(k for k in accuracy.columns if k > 0)
    for k in ks:
        stats = mean_and_se(accuracy[k] - accuracy[0])
        rows.append(_row(f"top1_mc{k}_minus_plain", stats, f"top1(mean of {k} DropKey passes) - top1(plain inference)"))
    # the headline: the largest K evaluated
    rows.append(_row("top1_mc_minus_plain", mean_and_se(accuracy[ks[-1]] - accuracy[0]),
                     f"top1(mean of {ks[-1]} DropKey passes) - top1(plain inference) (largest K)"))
    return rows


def _structured(finals, attention, mc) -> list[dict[str, Any]]:
    rows = _means(finals, "top1") + _means(finals, "peak")
    rows += _pairs(finals, "top1", [("top1_block_minus_dropkey", "block", "dropkey"),
                                    ("top1_cross_minus_dropkey", "cross", "dropkey")], " (percentage points)")
    rows += _pairs(finals, "peak", [("peak_block_minus_dropkey", "block", "dropkey"),
                                    ("peak_cross_minus_dropkey", "cross", "dropkey")])
    return rows


def _collapse(finals, attention, mc) -> list[dict[str, Any]]:
    rows = []
    comparisons = (("reattention", "reattention", "plain"), ("dropkey", "dropkey", "plain"),
                   ("both", "dropkey+reattention", "plain"), ("both", "dropkey+reattention", "reattention"))
    for depth in sorted(set(finals["depth"])):
        group = f"depth={depth}"
        at = finals[finals["depth"] == depth]
        rows += _means(at, "top1", group=group)
        for column, label in (("top_similarity", "similarity"), ("top_similarity_softmax", "similarity_softmax")):
            rows += _means(at, column, group=group)
            for name, a, b in comparisons:
                rows.append(_row(f"{label}_{name}_minus_{b}", paired_difference(at, column, a, b),
                                 f"top-block {label}({a}) - ({b}) at depth {depth}", group=group))
    deepest = f"depth={max(finals['depth'])}"
    headline = {
        "top_blocks_similarity_plain": "top_similarity_plain",
        "similarity_reattention_minus_plain": "similarity_reattention_minus_plain",
        "similarity_softmax_reattention_minus_plain": "similarity_softmax_reattention_minus_plain",
        "similarity_dropkey_minus_plain": "similarity_dropkey_minus_plain",
        "similarity_softmax_both_minus_reattention": "similarity_softmax_both_minus_reattention",
    }
    for quantity, source in headline.items():
        match = next(r for r in rows if r["quantity"] == source and r["group"] == deepest)
        rows.append({**match, "quantity": quantity, "group": "", "description": f"{match['description']} (deepest)"})
    return rows


ANALYSES = {
    "attention_dynamics": _attention_dynamics,
    "accuracy": _accuracy,
    "schedules": _schedules,
    "alignment": _alignment,
    "structured": _structured,
    "collapse": _collapse,
}

#: claim id -> the quantities (of the experiment's comparisons) that its verdict rule reads
CLAIM_QUANTITIES = {
    "vit-attention-peaks": ("peak_dropkey_minus_none", "entropy_dropkey_minus_none"),
    "vit-accuracy": ("top1_dropkey_minus_none", "top1_dropkey_minus_dropout"),
    "vit-schedule": ("top1_decreasing_minus_constant",),
    "vit-alignment": ("top1_mc_minus_plain", "top1_finetune_minus_plain"),
    "vit-structured": ("top1_block_minus_dropkey", "top1_cross_minus_dropkey"),
    "deepvit-collapse": ("top_blocks_similarity_plain",),
    "deepvit-reattention": ("similarity_reattention_minus_plain", "similarity_softmax_reattention_minus_plain"),
    "dropkey-collapse": ("similarity_dropkey_minus_plain", "similarity_softmax_both_minus_reattention"),
}


def comparisons(name: str, finals: pd.DataFrame, attention: pd.DataFrame, mc: pd.DataFrame) -> pd.DataFrame:
    """The experiment's tidy table of comparisons (quantity, group, layer, value, standard_error, n, description)."""
    return pd.DataFrame(ANALYSES[name](finals, attention, mc))


def measurements(claim_ids: Sequence[str], table: pd.DataFrame, *, scale: str, experiment: str) -> pd.DataFrame:
    """The rows of ``table`` that the claims' verdict rules read, labelled with the scale."""
    rows = []
    for claim_id in claim_ids:
        for quantity in CLAIM_QUANTITIES[claim_id]:
            match = table[(table["quantity"] == quantity) & (table["group"] == "") & (table["layer"] == -1)]
            if len(match) != 1:
                raise ValueError(f"experiment {experiment!r} did not measure {quantity!r} for claim {claim_id!r}")
            row = match.iloc[0]
            rows.append({"claim_id": claim_id, "quantity": quantity, "value": float(row["value"]),
                         "standard_error": float(row["standard_error"]), "n": int(row["n"]),
                         "scale": scale, "experiment": experiment})
    return pd.DataFrame(rows)


def throughput(finals: pd.DataFrame) -> dict[str, Any]:
    """Median training images/s per arm (indicative only: runs may have shared the CPU)."""
    return {f"{group + ' ' if group else ''}{arm}": float(frame["images_per_s"].median())
            for (group, arm), frame in finals.groupby(["group", "arm"], sort=False)}


def json_ready(value: Any) -> Any:
    """Non-finite floats -> None, numpy scalars -> Python, tuples -> lists, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
