"""Experiment ``gradient_mechanism``: train the probed runs with snapshots, probe them, write the result folder.

What is measured is :mod:`dropkey.lab.experiments.mechanism`'s probe; this module runs it at a
scale. Each probed run (no regulariser, and DropKey at the scale's ratio; the scale's first seed)
trains in ``runs_dir/mechanism/<key>/`` and keeps a copy of its checkpoint at each probed epoch
(``snapshot_epoch_NNNN.pt``, sealed like every checkpoint). The probe of one (run, epoch) is
written to ``probe-<settings key>/epoch_NNNN.csv`` there as soon as it is done, so an interrupted
experiment resumes where it stopped. The result folder ``results_dir/<scale>/gradient_mechanism/``
has the experiments' layout (``runs.csv``: the probed runs' training metrics; ``attention.csv``:
their clean attention per checkpoint and block; ``finals.csv``; ``per_seed.csv`` and
``comparisons.csv``, the replicate being the mask pass) and:

- ``probes.csv``: every probe row (trained arm, epoch, block, regulariser, drop ratio, metric,
  step, mask pass, batch, value);
- ``differences.csv``: the paired differences regulariser - none per mask pass (block -1: the
  mean over blocks), the replicates of every comparison;
- ``cells.csv``: per cell, the mean difference, its standard error over mask passes, n and the
  95 % t interval;
- ``summary.json``, ``config.json``, ``provenance.json`` and the completion marker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from dropkey import storage
from dropkey.lab.checkpoints import read_checkpoint
from dropkey.lab.experiments.analysis import comparisons
from dropkey.lab.experiments.definitions import Arm, scale
from dropkey.lab.experiments.mechanism import ATTENTION_METRICS, MechanismSettings, checkpoint_epochs, probe_checkpoint
from dropkey.lab.experiments.runner import train_config
from dropkey.lab.train import CHECKPOINT, TrainConfig, Trainer, train
from dropkey.provenance import provenance
from theory.seeding import address_sequence, integer_seed

log = logging.getLogger(__name__)

NAME = "gradient_mechanism"
#: the probe batches' order: a permutation of the run's training subset at (seed, BATCH_ADDRESS)
BATCH_ADDRESS = 4
SETTINGS: dict[str, MechanismSettings] = {
    "quick": MechanismSettings(checkpoints=(0.0, 0.5, 1.0), drop_ratios=(0.1, 0.2), masks=4, batches=4,
                               batch_size=16),
    "medium": MechanismSettings(batches=20, batch_size=50),  # the whole 1,000-image training subset
    "small_data": MechanismSettings(batches=10, batch_size=50),  # the whole 500-image training subset
    "full": MechanismSettings(batches=100, batch_size=100),  # the whole 10,000-image training subset
}
CELL_KEYS = ["trained_arm", "epoch", "regulariser", "drop_ratio", "metric", "step", "block"]


def snapshot_path(folder: Path, epoch: int) -> Path:
    return folder / f"snapshot_epoch_{epoch:04d}.pt"


def train_with_snapshots(config: TrainConfig, epochs: Sequence[int], command: Sequence[str] | None = None) -> Path:
    """Train (or resume) the run of ``config``, keeping a copy of its checkpoint after each epoch in ``epochs``."""
    folder = Path(config.out_dir)
    wanted = sorted(e for e in epochs if e > 0)
    if storage.is_complete(folder) and all(snapshot_path(folder, e).is_file() for e in wanted):
        return folder

    def keep(epoch: int, row: dict[str, Any]) -> None:  # after the epoch's checkpoint is written
        if epoch in wanted:
            storage.write_bytes_atomic(snapshot_path(folder, epoch), (folder / CHECKPOINT).read_bytes())

    train(config, resume=True, callbacks=[keep], command=command)
    missing = [e for e in wanted if not snapshot_path(folder, e).is_file()]
    if missing:
        raise RuntimeError(f"{folder}: no snapshot of epochs {missing} (the run was trained before without them); "
                           "remove the folder and run the experiment again")
    storage.mark_complete(folder)
    return folder


def _settings_key(settings: MechanismSettings) -> str:
    """What a run's probe depends on (not which other runs are probed: each run's probes are its own)."""
    record = {k: v for k, v in dataclasses.asdict(settings).items() if k != "trained_arms"}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def _probe_images(trainer: Trainer, settings: MechanismSettings, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe batches: (batches, batch_size, C, H, W) un-augmented, normalised training images and labels."""
    count = settings.batches * settings.batch_size
    train_set = trainer.train_set
    if count > len(train_set):
        raise ValueError(f"batches * batch_size must be at most the {len(train_set)} training images, got {count}")
    order = torch.Generator().manual_seed(integer_seed(address_sequence(seed, BATCH_ADDRESS)))
    index = torch.randperm(len(train_set), generator=order)[:count]
    images = trainer.normalize(train_set.images[index]).to(trainer.device)
    shape = (settings.batches, settings.batch_size)
    return images.reshape(*shape, *images.shape[1:]), train_set.labels[index].reshape(shape).to(trainer.device)


def _optimizer_order(trainer: Trainer) -> list[str]:
    """Parameter names in the optimizer's order (its param groups: decay, then no decay)."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return [names[id(p)] for group in trainer.optimizer.param_groups for p in group["params"]]


def probe_run(config: TrainConfig, arm: str, settings: MechanismSettings, epochs: Sequence[int],
              progress: bool = False) -> pd.DataFrame:
    """Probe every epoch of a trained run (each (run, epoch) cached as it finishes); the rows, labelled."""
    folder = Path(config.out_dir)
    parts = folder / f"probe-{_settings_key(settings)}"
    trainer = Trainer(dataclasses.replace(config, progress=False))  # data, normalisation, init weights, optimizer
    model = trainer.diag_model  # the reference-path twin: its probes see every block's logits and weights
    named = dict(model.named_parameters())
    params = [named[name] for name in _optimizer_order(trainer)]
    images, labels = _probe_images(trainer, settings, config.seed)
    frames = []
    for epoch in tqdm(epochs, desc=f"probing the {arm} run", unit="checkpoint", disable=not progress):
        part = parts / f"epoch_{epoch:04d}.csv"
        if part.is_file():
            frames.append(pd.read_csv(part))
            continue
        started = time.perf_counter()
        if epoch == 0:
            weights, optimizer_state = trainer.model.state_dict(), None
        else:
            state = read_checkpoint(snapshot_path(folder, epoch))
            weights, optimizer_state = state["model"], state["optimizer"]
        model.load_state_dict(weights)
        log.info("%s epoch %d: probing %d images, %d mask passes per regulariser and ratio", arm, epoch,
                 images.shape[0] * images.shape[1], settings.masks)
        rows = [{"trained_arm": arm, "epoch": epoch, **row} for row in probe_checkpoint(
            model, params, optimizer_state, images, labels, settings, lr=config.lr,
            label_smoothing=config.label_smoothing, mask_seed=config.seed, epoch=epoch)]
        frame = pd.DataFrame(rows)
        frame["probe_time_s"] = time.perf_counter() - started
        storage.write_csv_atomic(part, frame)
        log.info("%s epoch %d probed in %.0f s", arm, epoch, frame["probe_time_s"].iloc[0])
        frames.append(pd.read_csv(part))  # what is analysed is what was written
    return pd.concat(frames, ignore_index=True)


def paired_differences(probes: pd.DataFrame) -> pd.DataFrame:
    """Per mask pass, each probed regulariser's change minus the (exact) "none" change; block -1 = the block mean."""
    keys = ["trained_arm", "epoch", "metric", "step", "block"]
    changes = probes[probes["metric"].isin(ATTENTION_METRICS) & ~probes["regulariser"].isin(["clean", "none"])].copy()
    none = probes[(probes["regulariser"] == "none") & probes["metric"].isin(ATTENTION_METRICS)].set_index(keys)
    changes["difference"] = changes["value"].to_numpy() - none["value"].reindex(
        pd.MultiIndex.from_frame(changes[keys])).to_numpy()
    cell = ["trained_arm", "epoch", "regulariser", "drop_ratio", "metric", "step"]
    mean = changes.groupby([*cell, "pass"], as_index=False)["difference"].mean().assign(block=-1)
    columns = [*cell, "block", "pass", "difference"]
    return pd.concat([changes[columns], mean[columns]], ignore_index=True)


def cell_table(differences: pd.DataFrame) -> pd.DataFrame:
    """Per cell: mean difference over mask passes, its SE, n and the 95 % t interval."""
    rows = []
    for key, cell in differences.groupby(CELL_KEYS, sort=True):
        values = cell["difference"].to_numpy(np.float64)
        n = int(np.isfinite(values).sum())
        mean = float(np.nanmean(values)) if n else float("nan")
        se = float(np.nanstd(values, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        half = float(stats.t.ppf(0.975, n - 1) * se) if n > 1 else float("nan")
        rows.append(dict(zip(CELL_KEYS, key, strict=True)) | dict(
            mean=mean, standard_error=se, n=n, ci_low=mean - half, ci_high=mean + half))
    return pd.DataFrame(rows)


def cell_label(trained_arm: str, epoch: int, drop_ratio: float) -> str:
    """The group label of one cell of the claims: which run, which checkpoint, which ratio."""
    return f"{trained_arm} run, epoch {int(epoch)}, r={float(drop_ratio):g}"


def per_seed_table(differences: pd.DataFrame) -> pd.DataFrame:
    """The claims' table (the experiments' per_seed.csv layout): plain-step differences, the replicate a mask pass.

    quantity ``<metric>_step_<regulariser>_minus_none``; group :func:`cell_label`; layer the block
    (-1: the mean over blocks); seed the mask pass (the replicate of this experiment); value.
    The plain gradient step is the claims' (docs/experiments.md, "The gradient mechanism"); the
    Adam-preconditioned one stays in ``differences.csv`` and the figures.
    """
    plain = differences[differences["step"] == "sgd"]
    return pd.DataFrame({
        "quantity": plain["metric"] + "_step_" + plain["regulariser"] + "_minus_none",
        "group": [cell_label(a, e, r) for a, e, r in zip(plain["trained_arm"], plain["epoch"], plain["drop_ratio"],
                                                         strict=True)],
        "layer": plain["block"].astype(int), "seed": plain["pass"].astype(int), "value": plain["difference"],
        "covariate": np.nan,
        "description": "first-order change of the clean attention " + plain["metric"] + " along one plain gradient "
        "step at the peak learning rate: the expected gradient under " + plain["regulariser"] + " minus without a "
        "regulariser, over the probe set, one mask pass",
    }).reset_index(drop=True)


def run_gradient_mechanism(
    scale_name: str,
    *,
    runs_dir: str | os.PathLike[str],
    results_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    settings: MechanismSettings | None = None,
    progress: bool = False,
    command: Sequence[str] | None = None,
) -> Path:
    """Train, probe and write ``results_dir/<scale>/gradient_mechanism/``; return that folder."""
    s = scale(scale_name)
    settings = SETTINGS.get(scale_name, MechanismSettings()) if settings is None else settings
    started = time.perf_counter()
    frames, metrics, timings, configs = [], [], {}, {}
    for arm_name in settings.trained_arms:
        arm = Arm("none") if arm_name == "none" else Arm("dropkey", "dropkey", s.drop_ratio)
        config = train_config(s, arm, s.seeds[0], runs_dir=Path(runs_dir) / "mechanism", data_dir=data_dir,
                              device=device)
        epochs = checkpoint_epochs(settings, config.epochs)
        t0 = time.perf_counter()
        train_with_snapshots(config, epochs, command)
        t1 = time.perf_counter()
        probes = probe_run(config, arm_name, settings, epochs, progress)
        metrics.append(pd.read_csv(Path(config.out_dir) / "metrics.csv").assign(arm=arm_name, seed=config.seed))
        frames.append(probes)
        timings[arm_name] = {"training_s_this_call": t1 - t0, "probe_s": float(
            probes.groupby("epoch")["probe_time_s"].first().sum())}
        configs[arm_name] = {k: v for k, v in config.to_dict().items() if k not in ("out_dir", "data_dir")}
    probes = pd.concat(frames, ignore_index=True).drop(columns="probe_time_s")
    differences = paired_differences(probes)
    cells = cell_table(differences)
    per_seed = per_seed_table(differences)
    runs = pd.concat(metrics, ignore_index=True)
    epochs_of = {arm: sorted(probes.loc[probes["trained_arm"] == arm, "epoch"].unique().tolist())
                 for arm in settings.trained_arms}
    summary = {"experiment": NAME, "scale": scale_name, "claims": ["vit-gradient-mechanism"],
               "runs": len(settings.trained_arms), "seeds": [s.seeds[0]], "replicate": "mask pass",
               "training_wall_time_s_sum": float(runs.groupby("arm")["wall_time_s"].max().sum()),
               "metrics": list(ATTENTION_METRICS), "epochs": epochs_of, "timings_s": timings, "lr": s.lr,
               "masks": settings.masks, "batches": settings.batches, "batch_size": settings.batch_size}
    config_doc = {"experiment": NAME, "scale": vars(s) | {"seeds": list(s.seeds)},
                  "settings": dataclasses.asdict(settings), "train_configs": configs}
    record = provenance(s.seeds[0], list(command) if command is not None else None)
    record.update(scale=scale_name, experiment=NAME, wall_time_s=time.perf_counter() - started, device=device)
    folder = Path(results_dir) / scale_name / NAME
    clean = probes[probes["regulariser"] == "clean"].groupby(["trained_arm", "epoch", "block", "metric"],
                                                             as_index=False)["value"].mean()
    finals = runs.sort_values("epoch").groupby("arm", as_index=False).last()
    tables = {"runs.csv": runs, "attention.csv": clean.rename(columns={"trained_arm": "arm", "block": "layer"}),
              "finals.csv": finals, "per_seed.csv": per_seed, "comparisons.csv": comparisons(per_seed),
              "probes.csv": probes, "differences.csv": differences, "cells.csv": cells}
    storage.write_result_folder(folder, tables=tables,
                                documents={"summary.json": summary, "config.json": config_doc}, provenance=record)
    log.info("%s at %s scale: results in %s", NAME, scale_name, folder)
    return folder
