"""From finished runs to tidy tables: per-run quantities, per-seed paired differences, comparisons.

Every comparison is *paired by seed*: arms trained with the same seed share the model
initialisation, the data order and the augmentation stream, so for quantity X and arms A, B
the per-seed differences d_s = X(A, s) - X(B, s) are what the claims decide on
(:func:`reports.statistics.paired_decision`: a t interval over the seeds). ``per_seed.csv``
holds every difference seed by seed; ``comparisons.csv`` their mean, standard error
``std(d, ddof=1) / sqrt(n)`` (NaN for n = 1) and n, for reading.

Per-run quantities (final epoch; attention metrics are the trainer's diagnostics, computed in
eval mode on a fixed batch of test images, see :mod:`dropkey.diagnostics`):

- ``top1``: test accuracy in percent;
- ``peak`` / ``entropy``: attention peak weight and entropy, mean over blocks and heads;
- ``grad_ratio``: |dL/ds| on the most-attended logit over the mean |dL/ds| on the other kept
  logits, per block (mean over heads), then mean over blocks;
- ``top_similarity``: DeepViT's cross-layer (uncentred cosine) similarity of adjacent blocks (mean
  over heads and tokens), averaged over the adjacent pairs inside the top ``max(2, ceil(depth / 3))``
  blocks, of the maps that multiply V (after Re-attention: DeepViT's definition). Shown for
  reference only: it is close to 1 for any near-uniform attention (an untrained network scores ~1);
- ``top_similarity_softmax``: the same of the softmax weights before any Re-attention mixing;
- ``top_similarity_centred``: the same with the centred similarity (Pearson correlation of the
  columns, which BatchNorm's per-map shift and scale do not move), the collapse measure the claims
  read; ``top_similarity_centred_init`` the same of the network at initialisation (epoch 0);
- ``top_entropy``: attention entropy (nats) of the top blocks, mean over blocks and heads;
- ``expected_peak`` / ``expected_entropy``: the same of the final model's expected attention
  under its regulariser, E[w] over the masks (exact; what a training step sees on average;
  :func:`dropkey.lab.experiments.runner.expected_attention_rows`), on the rows of the first 8
  diagnostics images; NaN for structured masks; ``learned_peak`` / ``learned_entropy``: p on
  those same rows;
- ``train_clean_top1``, ``gap``: accuracy (percent) of the final model on its own training images,
  un-augmented, in eval mode, and that minus ``top1`` (the generalisation gap);
  ``train_learned_peak`` / ``..._entropy`` and ``train_expected_peak`` / ``..._entropy``: p and
  E[w] on the rows of its first 64 training images
  (:func:`dropkey.lab.experiments.runner.train_evaluation_rows`); NaN for runs recorded before
  that evaluation existed, whose per-seed tables then lack the quantities built on them;
- ``images_per_s``: median training throughput over epochs 2.. (epoch 1 includes warm-up).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dropkey.lab.experiments.finetune import FINETUNE_FILE
from dropkey.lab.experiments.runner import EXPECTED_ATTENTION_FILE, MONTE_CARLO_FILE, TRAIN_EVALUATION_FILE, RunSpec

ATTENTION_METRICS = ("peak", "entropy", "abs_grad_top", "abs_grad_rest", "similarity", "similarity_softmax",
                     "similarity_centred")


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
    mc_frame = (order(pd.concat(monte_carlo, ignore_index=True)) if monte_carlo
                else pd.DataFrame(columns=columns + ["k", "test_acc"]))
    return metrics_frame, attention_frame, mc_frame


def _top_similarity(block_rows: pd.DataFrame, depth: int, metric: str = "similarity") -> float:
    top = set(top_blocks(depth))
    inside = block_rows["layer"].isin(top) & block_rows["other_layer"].isin(top)
    pairs = block_rows[(block_rows["metric"] == metric) & inside]
    return float(pairs["value"].mean()) if len(pairs) else math.nan


def _train_quantities(folder: Path) -> dict[str, float]:
    """The final model on its training images (train_evaluation.csv; NaN for runs recorded before it existed)."""
    names = ("train_clean_top1", "train_learned_peak", "train_learned_entropy", "train_expected_peak",
             "train_expected_entropy")
    path = folder / TRAIN_EVALUATION_FILE
    if not path.is_file():
        return dict.fromkeys(names, math.nan)
    table = pd.read_csv(path)
    blocks = table[table["layer"] >= 0].groupby("metric")["value"].mean()
    accuracy = table.loc[(table["layer"] == -1) & (table["metric"] == "clean_accuracy"), "value"]
    return {"train_clean_top1": 100.0 * float(accuracy.iloc[0]),
            **{f"train_{metric}": float(blocks[metric]) for metric in
               ("learned_peak", "learned_entropy", "expected_peak", "expected_entropy")}}


def _finetune_top1(spec: RunSpec) -> float:
    """Test top-1 (percent) after the run's drop-free fine-tune (NaN if the spec asks for none)."""
    if spec.finetune is None:
        return math.nan
    path = spec.folder / FINETUNE_FILE
    if not path.is_file():
        raise IncompleteRun(f"run {spec.folder} has no {FINETUNE_FILE}: fine-tune it first")
    return 100.0 * float(pd.read_csv(path)["test_acc"].iloc[-1])


def final_quantities(specs: Sequence[RunSpec], metrics: pd.DataFrame, attention: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the per-run quantities of the module doc."""
    rows = []
    for spec in specs:
        key = spec.folder.name
        run_metrics = metrics[metrics["run_key"] == key].sort_values("epoch")
        run_attention = attention[attention["run_key"] == key]
        last = run_attention[run_attention["epoch"] == run_attention["epoch"].max()]
        initial = run_attention[run_attention["epoch"] == 0]
        per_block = last[last["other_layer"] < 0].pivot_table(index="layer", columns="metric", values="value",
                                                              dropna=False)
        depth = spec.config.model_config().depth
        top = list(top_blocks(depth))
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
            "top_similarity_centred": _top_similarity(last, depth, "similarity_centred"),
            "top_similarity_centred_init": _top_similarity(initial, depth, "similarity_centred"),
            "top_entropy": float(per_block.loc[top, "entropy"].mean()),
            "images_per_s": float(later.median() if len(later) else run_metrics["images_per_s"].median()),
            **_train_quantities(spec.folder),
            "finetune_top1": _finetune_top1(spec),
        }
        row["gap"] = row["train_clean_top1"] - row["top1"]  # clean training minus test accuracy (pp)
        needed = ("top1", "peak", "entropy", "grad_ratio", "top_entropy") + (
            ("top_similarity", "top_similarity_centred", "top_similarity_centred_init") if depth > 1 else ())
        bad = [name for name in needed if not math.isfinite(row[name])]
        if bad:
            raise IncompleteRun(f"run {spec.folder} ({spec.arm.name}, seed {spec.seed}) has non-finite {bad}")
        rows.append(row)
    return pd.DataFrame(rows)


# --- per-seed values and paired differences --------------------------------------------------------

#: Columns of the per-seed table (``per_seed.csv``): one row per (quantity, group, layer, seed).
PER_SEED_COLUMNS = ("quantity", "group", "layer", "seed", "value", "covariate", "description")


def mean_and_se(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Mean, standard error (``std(ddof=1) / sqrt(n)``, NaN for n = 1) and n of ``values``."""
    x = np.asarray(values, dtype=float)
    if not len(x):
        raise ValueError("values must hold at least one number")
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return {"value": float(x.mean()), "standard_error": se, "n": len(x)}


def _by_seed(values: pd.DataFrame, column: str, arm: str) -> pd.Series:
    chosen = values[values["arm"] == arm]
    if chosen["seed"].duplicated().any():
        raise ValueError(f"arm {arm!r} has several rows per seed; select one group first")
    return chosen.set_index("seed")[column]


def per_seed_difference(values: pd.DataFrame, column: str, arm_a: str, arm_b: str) -> pd.Series:
    """column(arm_a) - column(arm_b) per seed, over the seeds that have both arms (sorted)."""
    a, b = _by_seed(values, column, arm_a), _by_seed(values, column, arm_b)
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        raise ValueError(f"no seed has both arms {arm_a!r} and {arm_b!r}")
    return pd.Series([a[s] - b[s] for s in seeds], index=pd.Index(seeds, name="seed"), dtype=float)


def paired_difference(values: pd.DataFrame, column: str, arm_a: str, arm_b: str) -> dict[str, Any]:
    """Mean and SE over seeds of column(arm_a) - column(arm_b), paired by seed (see the module doc)."""
    return mean_and_se(per_seed_difference(values, column, arm_a, arm_b).to_numpy())


def _rows(quantity: str, per_seed: pd.Series, description: str, *, group: str = "", layer: int = -1,
          covariate: pd.Series | None = None) -> list[dict[str, Any]]:
    """Per-seed rows of one quantity (covariate: the same seeds' covariate, e.g. an entropy difference)."""
    return [{"quantity": quantity, "group": group, "layer": layer, "seed": int(seed), "value": float(value),
             "covariate": math.nan if covariate is None else float(covariate[seed]), "description": description}
            for seed, value in per_seed.items()]


def _paired(values: pd.DataFrame, column: str, pairs: Sequence[tuple[str, str, str]], unit: str = "", *,
            group: str = "", covariate: str | None = None) -> list[dict[str, Any]]:
    """Per-seed paired differences ``name: column(a) - column(b)``; with ``covariate``, that column's difference too."""
    rows = []
    for name, a, b in pairs:
        difference = per_seed_difference(values, column, a, b)
        extra = per_seed_difference(values, covariate, a, b) if covariate else None
        description = f"{column}({a}) - {column}({b}){unit}"
        description += f", covariate {covariate}({a}) - ({b})" if covariate else ""
        rows += _rows(name, difference, description, group=group, covariate=extra)
    return rows


def _means(finals: pd.DataFrame, column: str, group: str = "") -> list[dict[str, Any]]:
    rows = []
    for arm in dict.fromkeys(finals["arm"]):
        rows += _rows(f"{column}_{arm}", _by_seed(finals, column, arm), f"{column} of {arm}", group=group)
    return rows


def _per_layer(attention: pd.DataFrame, metric: str, arm_a: str, arm_b: str, quantity: str) -> list[dict[str, Any]]:
    """Per-block paired differences of an attention metric at the final epoch."""
    last = attention[(attention["epoch"] == attention.groupby("run_key")["epoch"].transform("max"))
                     & (attention["metric"] == metric) & (attention["other_layer"] < 0)]
    rows = []
    for layer, block in last.groupby("layer"):
        difference = per_seed_difference(block, "value", arm_a, arm_b)
        rows += _rows(quantity, difference, f"block {layer}: {metric}({arm_a}) - {metric}({arm_b})", layer=int(layer))
    return rows


# --- per experiment --------------------------------------------------------------------------------


def _attention_dynamics(finals, attention, mc) -> list[dict[str, Any]]:
    rows = _means(finals, "peak") + _means(finals, "entropy") + _means(finals, "grad_ratio")
    rows += _paired(finals, "peak", [("peak_dropkey_minus_none", "dropkey", "none"),
                                     ("peak_dropout_minus_none", "dropout", "none"),
                                     ("peak_dropkey_minus_dropout", "dropkey", "dropout")])
    rows += _paired(finals, "entropy", [("entropy_dropkey_minus_none", "dropkey", "none"),
                                        ("entropy_dropout_minus_none", "dropout", "none"),
                                        ("entropy_dropkey_minus_dropout", "dropkey", "dropout")], " (nats)")
    rows += _paired(finals, "grad_ratio", [("grad_ratio_dropkey_minus_none", "dropkey", "none"),
                                           ("grad_ratio_dropout_minus_none", "dropout", "none")])
    # expected attention under each regulariser (what a training step sees on average; = p for none, dropout)
    rows += _means(finals, "expected_peak") + _means(finals, "expected_entropy")
    rows += _paired(finals, "expected_peak", [("expected_peak_dropkey_minus_none", "dropkey", "none")])
    rows += _paired(finals, "expected_entropy", [("expected_entropy_dropkey_minus_none", "dropkey", "none")], " (nats)")
    # the masks' own smoothing of the DropKey model's rows
    dropkey = finals[finals["arm"] == "dropkey"].set_index("seed")
    rows += _rows("expected_minus_learned_peak_dropkey", dropkey["expected_peak"] - dropkey["learned_peak"],
                  "peak(E[w]) - peak(p) of the DropKey model on the same rows: the smoothing its masks apply")
    if _recorded(finals, "train_learned_peak"):  # the compensation question, on the training images
        rows += _paired(finals, "train_learned_peak", [("train_peak_dropkey_minus_none", "dropkey", "none"),
                                                       ("train_peak_dropout_minus_none", "dropout", "none")])
        none = finals[finals["arm"] == "none"].set_index("seed")
        rows += _rows("train_expected_peak_dropkey_minus_learned_none",
                      dropkey["train_expected_peak"] - none["train_learned_peak"],
                      "peak(E[w]) of the DropKey model minus peak(p) of the same seed's plain model, on training "
                      "images: what a DropKey training step sees against what the plain model has learned")
    for arm in ("dropkey", "dropout"):
        rows += _per_layer(attention, "peak", arm, "none", f"peak_{arm}_minus_none_by_block")
        rows += _per_layer(attention, "entropy", arm, "none", f"entropy_{arm}_minus_none_by_block")
    return rows


def _recorded(finals: pd.DataFrame, column: str) -> bool:
    """Whether every run recorded ``column`` (runs of an earlier version lack the training-image evaluation)."""
    return bool(np.isfinite(finals[column].to_numpy(dtype=float)).all())


def _accuracy(finals, attention, mc) -> list[dict[str, Any]]:
    rows = _means(finals, "top1") + _paired(finals, "top1", [
        ("top1_dropkey_minus_none", "dropkey", "none"),
        ("top1_dropkey_minus_dropout", "dropkey", "dropout"),
        ("top1_dropout_minus_none", "dropout", "none"),
    ], " (percentage points)")
    if _recorded(finals, "gap"):
        rows += _means(finals, "train_clean_top1") + _means(finals, "gap") + _paired(finals, "gap", [
            ("gap_dropkey_minus_none", "dropkey", "none"),
            ("gap_dropout_minus_none", "dropout", "none"),
        ], " (percentage points of clean training minus test accuracy)")
    return rows


def _schedules(finals, attention, mc) -> list[dict[str, Any]]:
    return _means(finals, "top1") + _paired(finals, "top1", [
        ("top1_decreasing_minus_constant", "decreasing", "constant"),
        ("top1_decreasing_minus_increasing", "decreasing", "increasing"),
        ("top1_increasing_minus_constant", "increasing", "constant"),
    ], " (percentage points)")


def _alignment(finals, attention, mc) -> list[dict[str, Any]]:
    rows = _means(finals, "top1")
    if "finetune" in set(finals["arm"]):  # results of an earlier version: an arm whose last epochs dropped nothing
        rows += _paired(finals, "top1", [("top1_finetune_minus_plain", "finetune", "dropkey")], " (percentage points)")
    else:  # the DropKey run fine-tuned on its own schedule, against its own plain inference
        tuned = finals[finals["arm"] == "dropkey"].set_index("seed")
        rows += _means(finals[finals["arm"] == "dropkey"], "finetune_top1")
        rows += _rows("top1_finetune_minus_plain", tuned["finetune_top1"] - tuned["top1"],
                      "top1 after the drop-free fine-tune (own short schedule) - top1 of plain inference, same run "
                      "(percentage points)")
    accuracy = 100.0 * mc.pivot_table(index="seed", columns="k", values="test_acc")  # k = 0: plain inference
    ks = sorted(k for k in accuracy.columns if k > 0)
    for k in ks:
        rows += _rows(f"top1_mc{k}_minus_plain", accuracy[k] - accuracy[0],
                      f"top1(mean of {k} DropKey passes) - top1(plain inference)")
    # the headline: the largest K evaluated
    rows += _rows("top1_mc_minus_plain", accuracy[ks[-1]] - accuracy[0],
                  f"top1(mean of {ks[-1]} DropKey passes) - top1(plain inference) (largest K)")
    return rows


def _drop_ratio(finals, attention, mc) -> list[dict[str, Any]]:
    """Per ratio of the sweep: DropKey's top-1, peak and gap against no regulariser, paired by seed."""
    rows = _means(finals, "top1") + _means(finals, "peak")
    for arm in (a for a in dict.fromkeys(finals["arm"]) if a != "none"):
        ratio = arm.removeprefix("r=")
        rows += _paired(finals, "top1", [(f"top1_dropkey_r{ratio}_minus_none", arm, "none")], " (percentage points)")
        rows += _paired(finals, "peak", [(f"peak_dropkey_r{ratio}_minus_none", arm, "none")])
        if _recorded(finals, "gap"):
            rows += _paired(finals, "gap", [(f"gap_dropkey_r{ratio}_minus_none", arm, "none")],
                            " (percentage points of clean training minus test accuracy)")
    return rows


def _structured(finals, attention, mc) -> list[dict[str, Any]]:
    rows = _means(finals, "top1") + _means(finals, "peak")
    rows += _paired(finals, "top1", [("top1_block_minus_dropkey", "block", "dropkey"),
                                     ("top1_cross_minus_dropkey", "cross", "dropkey")], " (percentage points)")
    rows += _paired(finals, "peak", [("peak_block_minus_dropkey", "block", "dropkey"),
                                     ("peak_cross_minus_dropkey", "cross", "dropkey")])
    return rows


def _collapse(finals, attention, mc) -> list[dict[str, Any]]:
    """Per depth: arm means and paired differences of the top blocks' centred similarity; then the headlines.

    Headlines (group ""): the plain ViT's collapse trend in depth (per seed, the rise of the centred
    similarity over its value at initialisation, deepest net minus shallowest net), and at the
    deepest net the centred similarity of Re-attention, DropKey and both against their baselines,
    DropKey's with the top blocks' entropy difference as covariate (DropKey also changes entropy,
    which alone moves similarity).
    """
    finals = finals.assign(similarity_rise=finals["top_similarity_centred"] - finals["top_similarity_centred_init"])
    rows = []
    centred = [("centred_similarity_reattention_minus_plain", "reattention", "plain"),
               ("centred_similarity_dropkey_minus_plain", "dropkey", "plain"),
               ("centred_similarity_both_minus_plain", "dropkey+reattention", "plain"),
               ("centred_similarity_both_minus_reattention", "dropkey+reattention", "reattention")]
    depths = sorted(set(finals["depth"]))
    for depth in depths:
        group = f"depth={depth}"
        at = finals[finals["depth"] == depth]
        for column in ("top1", "top_similarity", "top_similarity_centred", "top_similarity_centred_init",
                       "similarity_rise", "top_entropy"):
            rows += _means(at, column, group=group)
        rows += _paired(at, "top_similarity_centred", centred, group=group, covariate="top_entropy")
    headline = {
        "centred_similarity_reattention_minus_plain": False,  # quantity -> with the entropy covariate
        "centred_similarity_dropkey_minus_plain": True,
        "centred_similarity_both_minus_reattention": True,
    }
    deepest = finals[finals["depth"] == depths[-1]]
    for name, a, b in centred:
        if name in headline:
            rows += _paired(deepest, "top_similarity_centred", [(name, a, b)],
                            covariate="top_entropy" if headline[name] else None)
    if len(depths) >= 2:  # DeepViT's accuracy claims: plain accuracy saturates with depth; Re-attention helps deep
        rows += _depth_accuracy(finals, depths)
        plain = finals[finals["arm"] == "plain"]
        deep, shallow = (plain[plain["depth"] == d].set_index("seed")["similarity_rise"]
                         for d in (depths[-1], depths[0]))
        seeds = sorted(set(deep.index) & set(shallow.index))
        trend = pd.Series([deep[s] - shallow[s] for s in seeds], index=seeds, dtype=float)
        rows += _rows("collapse_trend_plain", trend,
                      f"plain ViT: rise of the top blocks' centred similarity over initialisation, depth {depths[-1]} "
                      f"minus depth {depths[0]}")
    return rows


def _depth_accuracy(finals: pd.DataFrame, depths: Sequence[int]) -> list[dict[str, Any]]:
    """Top-1 of the plain ViT, deepest minus next-deepest net, and of Re-attention minus plain at the deepest."""
    plain = finals[finals["arm"] == "plain"]
    deep, below = (plain[plain["depth"] == d].set_index("seed")["top1"] for d in (depths[-1], depths[-2]))
    seeds = sorted(set(deep.index) & set(below.index))
    rows = _rows("top1_plain_deepest_minus_next", pd.Series([deep[s] - below[s] for s in seeds], index=seeds,
                                                          dtype=float),
                 f"plain ViT test top-1, depth {depths[-1]} minus depth {depths[-2]} (percentage points)")
    deepest = finals[finals["depth"] == depths[-1]]
    return rows + _paired(deepest, "top1", [("top1_reattention_minus_plain", "reattention", "plain")],
                          f" at depth {depths[-1]} (percentage points)")


ANALYSES = {
    "attention_dynamics": _attention_dynamics,
    "accuracy": _accuracy,
    "schedules": _schedules,
    "alignment": _alignment,
    "drop_ratio": _drop_ratio,
    "structured": _structured,
    "collapse": _collapse,
}


def per_seed(name: str, finals: pd.DataFrame, attention: pd.DataFrame, mc: pd.DataFrame) -> pd.DataFrame:
    """The experiment's per-seed table (PER_SEED_COLUMNS): every arm mean and paired difference, seed by seed."""
    if name not in ANALYSES:
        raise ValueError(f"experiment must be one of {tuple(ANALYSES)}, got {name!r}")
    return pd.DataFrame(ANALYSES[name](finals, attention, mc), columns=list(PER_SEED_COLUMNS))


def comparisons(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, SE over seeds and n of every quantity of a per-seed table (quantity, group, layer order kept)."""
    rows = []
    for (quantity, group, layer, description), frame in table.groupby(
            ["quantity", "group", "layer", "description"], sort=False):
        rows.append({"quantity": quantity, "group": group, "layer": int(layer), **mean_and_se(frame["value"]),
                     "description": description})
    return pd.DataFrame(rows, columns=["quantity", "group", "layer", "value", "standard_error", "n", "description"])


def throughput(finals: pd.DataFrame) -> dict[str, Any]:
    """Median training images/s per arm (indicative only: runs may have shared the CPU)."""
    return {f"{group + ' ' if group else ''}{arm}": float(frame["images_per_s"].median())
            for (group, arm), frame in finals.groupby(["group", "arm"], sort=False)}
