"""Train (or reuse) the runs of an experiment, then evaluate Monte-Carlo inference where asked.

Runs live in ``runs_dir/<key>/``, ``key`` a hash of the run's whole :class:`TrainConfig`
(except where its files go and whether bars are shown), so a run needed by several
experiments is trained once. A run folder is the trainer's (``config.json``,
``provenance.json``, ``metrics.csv``, ``diagnostics.csv``, ``checkpoint.pt``) plus
``expected_attention.csv`` (the final model's expected attention under its regulariser, see
:func:`expected_attention_rows`), ``train_evaluation.csv`` (the final model on its own training
images: clean accuracy, learned and expected attention, :func:`train_evaluation_rows`), for
Monte-Carlo arms ``monte_carlo.csv``, for fine-tuned arms ``finetune.csv``
(:mod:`dropkey.lab.experiments.finetune`), and finally
:mod:`dropkey.storage`'s completion marker ``complete.json`` (written last, atomically, listing
every file with its size and SHA-256, and the run's final metrics): a folder with it whose files
all match it is done and is never retrained; one that does not match is a damaged cache and is
recomputed (:func:`intact`). An interrupted run resumes
from its last epoch checkpoint, bit-exactly (:func:`dropkey.lab.train.train` with
``resume=True``), so a crashed experiment loses at most one epoch per run.

Runs are independent, so ``jobs > 1`` trains them in that many worker processes (spawned,
each with ``cpu_count // jobs`` torch threads): on a 2-core CPU two single-threaded tiny
ViTs train faster together than one after the other with two threads each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

import theory
from dropkey import storage
from dropkey.diagnostics import AttentionRecorder, attention_entropy, peak_weight
from dropkey.inference import monte_carlo_predict
from dropkey.lab import data as datasets
from dropkey.lab.augment import Normalize
from dropkey.lab.checkpoints import read_run_checkpoint
from dropkey.lab.experiments.definitions import Arm, Scale
from dropkey.lab.experiments.finetune import FINETUNE_FILE, FineTune, finetune_run, has_finetune
from dropkey.lab.randomness import stream_seeds
from dropkey.lab.train import CHECKPOINT, TrainConfig, resolve_device, train
from dropkey.lab.trainer import training_subset
from dropkey.models import VisionTransformer
from theory.checks import check_int
from theory.seeding import address_sequence, integer_seeds

log = logging.getLogger(__name__)

COMPLETE_MARKER = storage.MARKER
#: the Monte-Carlo passes' streams: address (seed, MONTE_CARLO_ADDRESS, batch) of theory.seeding
MONTE_CARLO_ADDRESS = 2
MONTE_CARLO_FILE = "monte_carlo.csv"
EXPECTED_ATTENTION_FILE = "expected_attention.csv"
EXPECTED_ATTENTION_IMAGES = 8  # diagnostics images whose rows get the exact expectation
TRAIN_EVALUATION_FILE = "train_evaluation.csv"
TRAIN_ATTENTION_IMAGES = 64  # training images whose rows get the learned and the exact expected attention
# TrainConfig fields that do not change what a run computes (where files go, bars, checks)
_NOT_IN_KEY = ("out_dir", "progress", "data_dir", "verify_data")
#: What a run folder records, versioned: runs recorded by an older version are trained again.
#: 2: diagnostics at initialisation (epoch 0) and the centred cross-layer similarity.
RUN_RECORD_VERSION = 2


@dataclass(frozen=True)
class RunSpec:
    """One training run of an experiment: the arm, the seed and the full config."""

    arm: Arm
    seed: int
    config: TrainConfig
    monte_carlo: tuple[int, ...] = ()  # K values to evaluate (empty: none)
    finetune: FineTune | None = None  # fine-tune without the regulariser afterwards (None: not)

    @property
    def folder(self) -> Path:
        return Path(self.config.out_dir)


def run_key(config: TrainConfig) -> str:
    """16 hex digits identifying what a run computes (its config without the output-only fields)."""
    record = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_KEY}
    record["run_record_version"] = RUN_RECORD_VERSION
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_config(
    s: Scale,
    arm: Arm,
    seed: int,
    *,
    runs_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
) -> TrainConfig:
    """The TrainConfig of ``arm`` at scale ``s`` with ``seed``; ``out_dir`` is its run folder."""

    config = TrainConfig(
        dataset=s.dataset, data_dir=None if data_dir is None else str(data_dir), train_subset=s.train_subset,
        model=arm.model or s.model, attn_variant=arm.variant, drop_ratio=arm.drop_ratio,
        model_overrides=arm.model_overrides, final_epochs_without_drop=arm.final_epochs_without_drop,
        epochs=arm.epochs or s.epochs, batch_size=s.batch_size, lr=s.lr, warmup_epochs=s.warmup_epochs,
        seed=seed, eval_batch_size=s.eval_batch_size, eval_every=s.eval_every, crop_padding=s.crop_padding,
        device=device, progress=False,
        out_dir="pending",
    )
    return dataclasses.replace(config, out_dir=str(Path(runs_dir) / run_key(config)))


def is_complete(folder: Path) -> bool:
    return storage.is_complete(folder)


def intact(folder: Path) -> bool:
    """Whether the run folder is complete and every file matches its marker's size and SHA-256.

    A complete folder that does not match (a file missing, unreadable or changed, or the marker
    unreadable) is a damaged cache: a warning names the file, and the marker and the evaluations
    that no longer match it are removed, so :func:`execute` recomputes them (the trainer rewrites
    its tables from the checkpoint; a damaged checkpoint means training again from the start, which
    gives the same numbers: runs are deterministic).
    """
    if not is_complete(folder):
        return False
    earlier = _earlier_record(folder)
    if earlier is not None:  # trusted as before; from now on its files' digests are checked
        log.info("run folder %s has a marker of an earlier version: recording its files' digests", folder)
        storage.mark_complete(folder, record=earlier)
        return True
    try:
        storage.verify_result_folder(folder)
        return True
    except storage.IntegrityError as error:
        log.warning("run folder %s is damaged, recomputing it: %s", folder, error)
    try:
        listed = storage.read_marker(folder)["files"]
    except storage.IntegrityError:
        listed = {}  # the marker itself is damaged: nothing it vouched for can be trusted
    (folder / storage.MARKER).unlink()
    for name in (EXPECTED_ATTENTION_FILE, TRAIN_EVALUATION_FILE, MONTE_CARLO_FILE, FINETUNE_FILE):
        try:
            storage.verify_file_record(folder / name, listed[name])
        except (KeyError, storage.IntegrityError):
            (folder / name).unlink(missing_ok=True)
    return False


def _earlier_record(folder: Path) -> dict[str, Any] | None:
    """The marker of a run folder written before markers listed files (it was the run's record), else None."""
    try:
        marker = json.loads((folder / storage.MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    earlier = isinstance(marker, dict) and "run_key" in marker and not {"format", "files"} & set(marker)
    return marker if earlier else None


def _completion_record(folder: Path) -> dict[str, Any]:
    return storage.read_marker(folder).get("record", {})


def _drop_unusable_checkpoint(folder: Path) -> None:
    """Remove a checkpoint that fails its digest (or has none: an earlier version's), so the run starts over."""
    path = folder / CHECKPOINT
    if path.exists():
        try:
            storage.read_sealed(path, "checkpoint")
        except storage.IntegrityError as error:
            log.warning("%s; training run %s again from the start", error, folder)
            path.unlink()


def _load_trained_model(
    folder: Path, config: TrainConfig, device: torch.device, **overrides: Any
) -> tuple[VisionTransformer, Normalize]:
    """The run's final model (weights from its checkpoint; ``overrides`` of ViTConfig) and its input normalisation."""

    state = read_run_checkpoint(folder)
    resolved = json.loads((folder / "config.json").read_text(encoding="utf-8"))["resolved"]
    model_config = dataclasses.replace(config.model_config(), mask_seed=0, **overrides)  # per-pass seeds override it
    model = VisionTransformer(model_config).to(device)
    model.load_state_dict(state["model"])
    return model, Normalize(resolved["normalize_mean"], resolved["normalize_std"])


def _test_split(config: TrainConfig) -> datasets.ImageData:
    """The run's test split, loaded (and checksum-verified) as the trainer loads it."""
    options = {"verify": config.verify_data} if config.dataset != "digits" else {}
    return datasets.load_dataset(config.dataset, "test", config.data_dir, **options)


def monte_carlo_accuracy(folder: Path, config: TrainConfig, ks: Sequence[int], device: torch.device) -> pd.DataFrame:
    """Test accuracy of plain inference (k = 0) and of the mean of k DropKey passes' probabilities.

    One pass of max(ks) samples per test batch; the running mean is scored at every k.
    Every pass gets its own seed (derived from the run's seed, the batch and k), which
    seeds the DropKey layers' generators and any other stochastic layer, so the numbers
    are reproducible.
    """

    model, normalize = _load_trained_model(folder, config, device)
    test = _test_split(config)
    ks = sorted(set(int(k) for k in ks))
    correct = dict.fromkeys([0, *ks], 0)
    model.eval()
    for batch, start in enumerate(range(0, len(test), config.eval_batch_size)):
        images = normalize(test.images[start : start + config.eval_batch_size]).to(device)
        labels = test.labels[start : start + config.eval_batch_size].to(device)
        with torch.no_grad():
            correct[0] += int((model(images).argmax(-1) == labels).sum())
        total = None
        seeds = integer_seeds(address_sequence(config.seed, MONTE_CARLO_ADDRESS, batch), ks[-1])
        for k in range(1, ks[-1] + 1):
            sample = monte_carlo_predict(model, images, 1, generator=seeds[k - 1])
            total = sample if total is None else total + sample
            if k in correct:
                correct[k] += int((total.argmax(-1) == labels).sum())
    return pd.DataFrame(
        {"k": list(correct), "test_acc": [c / len(test) for c in correct.values()]}
    )


def _attention_rows(model: VisionTransformer, batch: torch.Tensor) -> list[dict[str, Any]]:
    """Per block: the learned (clean) and the expected attention's mean peak and entropy on ``batch``."""
    model.eval()
    with AttentionRecorder(model, store_maps=True) as recorder, torch.no_grad():
        model(batch)
    model_config = model.config
    rows = []
    layers = zip(model_config.layer_variants, model_config.layer_drop_ratios, strict=True)
    for layer, (variant, ratio) in enumerate(layers):
        p = recorder.weights[layer][0].double().cpu()  # (B, H, N, N) softmax weights
        if variant == "dropkey" and ratio > 0.0:
            flat = p.reshape(-1, p.shape[-1]).numpy()
            flat = flat / flat.sum(axis=1, keepdims=True)  # exact unit rows for the theory's validation
            expected = torch.from_numpy(theory.expected_attention(flat, ratio, all_dropped=model_config.all_dropped))
        elif variant in ("none", "dropout") or ratio == 0.0:
            expected = p.reshape(-1, p.shape[-1])  # E[w] = p exactly
        else:
            expected = None  # structured masks: no exact expectation
        for name, function in (("peak", peak_weight), ("entropy", attention_entropy)):
            value = float(function(expected).mean()) if expected is not None else float("nan")
            rows.append({"layer": layer, "metric": f"expected_{name}", "value": value})
            rows.append({"layer": layer, "metric": f"learned_{name}", "value": float(function(p).mean())})
    return rows


def expected_attention_rows(folder: Path, config: TrainConfig, device: torch.device,
                            images: int = EXPECTED_ATTENTION_IMAGES) -> pd.DataFrame:
    """Peak and entropy of the final model's *expected* attention under its regulariser, on test images.

    The trainer's diagnostics observe the learned attention p (eval mode, no drop). What a
    training step sees on average is E[w] over the masks: for DropKey ``c * p`` with the
    smoothing coefficients, computed exactly per row by :func:`theory.expected_attention`
    (the block's drop ratio and ``all_dropped`` convention); for post-softmax dropout and no
    regulariser ``E[w] = p`` exactly. Structured masks have no exact form: NaN. Rows of the
    first ``images`` diagnostics images, all heads and queries. Rows: layer, metric
    (``expected_peak``, ``expected_entropy``, ``learned_peak``, ``learned_entropy``), value.
    """

    model, normalize = _load_trained_model(folder, config, device, fused_attn=False)
    test = _test_split(config)
    batch = normalize(test.images[: min(images, config.diagnostics_batch)]).to(device)  # the diagnostics batch's
    return pd.DataFrame(_attention_rows(model, batch), columns=["layer", "metric", "value"])


def _train_split(config: TrainConfig) -> datasets.ImageData:
    """The run's own training images (its class-balanced subset), loaded as the trainer loads them."""
    options = {"verify": config.verify_data} if config.dataset != "digits" else {}
    full = datasets.load_dataset(config.dataset, "train", config.data_dir, **options)
    return training_subset(full, config.train_subset, stream_seeds(config.seed)["subset"])


def clean_accuracy(model: torch.nn.Module, normalize: Normalize, data: datasets.ImageData, batch_size: int,
                   device: torch.device) -> float:
    """Eval-mode accuracy of ``model`` on ``data``, un-augmented (normalised only), in batches."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = normalize(data.images[start : start + batch_size]).to(device)
            correct += int((model(batch).argmax(-1).cpu() == data.labels[start : start + batch_size]).sum())
    return correct / len(data)


def train_evaluation_rows(folder: Path, config: TrainConfig, device: torch.device,
                          images: int = TRAIN_ATTENTION_IMAGES) -> pd.DataFrame:
    """The final model on its own training images, un-augmented: what the generalisation gap and the
    compensation question read.

    Rows: layer -1, ``clean_accuracy`` (eval mode, every training image); per block, the learned
    and expected attention's mean peak and entropy on the first ``images`` training images (as
    :func:`expected_attention_rows` on test images).
    """
    model, normalize = _load_trained_model(folder, config, device, fused_attn=False)
    train_set = _train_split(config)
    accuracy = clean_accuracy(model, normalize, train_set, config.eval_batch_size, device)
    rows = [{"layer": -1, "metric": "clean_accuracy", "value": accuracy}]
    rows += _attention_rows(model, normalize(train_set.images[:images]).to(device))
    return pd.DataFrame(rows, columns=["layer", "metric", "value"])


#: what every finished run is evaluated on, each written to its file once (kept when intact)
EVALUATIONS = {EXPECTED_ATTENTION_FILE: expected_attention_rows, TRAIN_EVALUATION_FILE: train_evaluation_rows}


def _final_row(folder: Path) -> dict[str, Any]:
    metrics = pd.read_csv(folder / "metrics.csv")
    return {key: (value.item() if hasattr(value, "item") else value) for key, value in metrics.iloc[-1].items()}


def _has_monte_carlo(folder: Path, ks: Sequence[int]) -> bool:
    path = Path(folder) / MONTE_CARLO_FILE
    return path.is_file() and set(ks) <= set(pd.read_csv(path)["k"])


def needs_work(spec: RunSpec) -> bool:
    """True unless the run is complete and has every evaluation it asks for."""
    folder = spec.folder
    return (not intact(folder) or any(not (folder / name).is_file() for name in EVALUATIONS)
            or bool(spec.monte_carlo and not _has_monte_carlo(folder, spec.monte_carlo))
            or bool(spec.finetune and not has_finetune(folder, spec.finetune)))


def execute(spec: RunSpec, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Train ``spec`` (resuming its checkpoint if any) and evaluate it; a no-op if already done."""

    folder = spec.folder
    command = list(command or ["dropkey-lab", "experiment"])
    written = False
    if not intact(folder):
        _drop_unusable_checkpoint(folder)
        train(spec.config, resume=True, command=command)
    device = resolve_device(spec.config, 0)
    for name, evaluate in EVALUATIONS.items():
        if not (folder / name).is_file():
            storage.write_csv_atomic(folder / name, evaluate(folder, spec.config, device))
            written = True
    if spec.monte_carlo and not _has_monte_carlo(folder, spec.monte_carlo):
        storage.write_csv_atomic(folder / MONTE_CARLO_FILE,
                                 monte_carlo_accuracy(folder, spec.config, spec.monte_carlo, device))
        written = True
    if spec.finetune and not has_finetune(folder, spec.finetune):
        finetune_run(folder, spec.config, spec.finetune, command)
        written = True
    if written or not is_complete(folder):  # the marker lists every file of the folder, so it follows them
        record = {"run_key": folder.name, "arm": spec.arm.name, "seed": spec.seed, "final": _final_row(folder)}
        storage.mark_complete(folder, record=record)
    return _completion_record(folder)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def execute_all(
    specs: Sequence[RunSpec], *, jobs: int = 1, progress: bool = False, command: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Run every spec not yet complete (in ``jobs`` processes); return their completion records in order."""

    check_int(jobs, "jobs", 1)
    unique: dict[Path, RunSpec] = {}
    for spec in specs:
        earlier = unique.get(spec.folder)
        if earlier is not None:  # the same run asked by several experiments: every evaluation any of them asks
            if earlier.finetune is not None and spec.finetune is not None and earlier.finetune != spec.finetune:
                raise ValueError(f"run {spec.folder} is asked for two fine-tunes: {earlier.finetune}, {spec.finetune}")
            both = tuple(sorted(set(spec.monte_carlo) | set(earlier.monte_carlo)))
            spec = dataclasses.replace(spec, monte_carlo=both, finetune=spec.finetune or earlier.finetune)
        unique[spec.folder] = spec
    pending = [spec for spec in unique.values() if needs_work(spec)]
    log.info("%d runs, %d already complete, %d to train", len(unique), len(unique) - len(pending), len(pending))
    bar = tqdm(total=len(pending), desc="training runs", unit="run", disable=not progress)
    try:
        if jobs == 1 or len(pending) <= 1:
            for spec in pending:
                bar.set_postfix_str(f"{spec.arm.group or ''} {spec.arm.name} seed {spec.seed}".strip())
                execute(spec, command)
                bar.update()
        else:
            import multiprocessing

            threads = max(1, (os.cpu_count() or 1) // jobs)
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:
                futures = [pool.submit(execute, spec, command) for spec in pending]
                for future in as_completed(futures):
                    future.result()  # re-raise a worker's error here
                    bar.update()
    finally:
        bar.close()
    return [_completion_record(spec.folder) for spec in specs]  # every run is now complete and intact
