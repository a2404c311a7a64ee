"""Training pipeline: one frozen :class:`TrainConfig` per run, bit-exact resume, DDP, tidy metrics.

>>> from dropkey.lab.train import TrainConfig, train           # doctest: +SKIP
>>> result = train(TrainConfig(dataset="digits", model="vit_tiny_8", epochs=5, out_dir="runs/x"))
>>> result.metrics[["epoch", "train_loss", "test_acc"]]

What a run does:

- data from :mod:`dropkey.lab.data` (optionally a seeded class-balanced ``train_subset``),
  augmented on the fly with :mod:`dropkey.lab.augment` (random crop with padding and/or
  horizontal flip; dataset defaults: CIFAR-10 pad 4 + flip, Fashion-MNIST pad 2,
  digits none), normalised with the training split's per-channel mean and std;
- AdamW (no weight decay on biases, norms, position embedding and class token), learning
  rate per step: linear warmup over ``warmup_epochs`` then cosine decay to ``min_lr``;
  label smoothing; gradient clipping by global norm; autocast (``precision``: "auto" is
  fp32 on CPU, bf16 on CUDA where supported, else fp16 with a GradScaler); optional
  ``torch.compile``;
- after every epoch (every ``eval_every`` epochs, and always the last): evaluation on the test
  split (epochs without it get NaN test metrics), the per-epoch metrics row, every
  ``diagnostics_every`` epochs the attention diagnostics of
  :class:`dropkey.diagnostics.AttentionRecorder` on a fixed batch of test images (the
  first ``diagnostics_batch``; the model copied into a ``fused_attn=False`` twin in eval
  mode, loss backpropagated for the gradient metrics; no random numbers are drawn, so
  diagnostics never change the training run), then a checkpoint, written atomically with its
  content digest (:mod:`dropkey.lab.checkpoints`: a changed, truncated or garbage checkpoint is
  refused on resume with an error naming it, never trained on).

Run folder (``out_dir``): ``config.json``, ``provenance.json``, ``metrics.csv`` (one row per
epoch), ``diagnostics.csv`` (tidy: epoch, layer, module, head, metric, value, count,
other_layer; ``metric == "similarity"`` rows are DeepViT's cross-layer similarity between
``layer`` and ``other_layer`` of the maps that multiply V, ``"similarity_softmax"`` the same of the
softmax weights before any Re-attention mixing, ``"similarity_centred"`` the centred (Pearson)
similarity of the maps that multiply V; epoch 0 rows describe the network at initialisation),
``checkpoint.pt``.

Randomness: every stream is a named child of ``seed`` (:mod:`theory.seeding`,
:data:`SEED_STREAMS`: model init, subset, data order, augmentation, DropKey masks, and the
global torch RNG that dropout / drop path draw from; ranks > 0 take their own augmentation,
mask and torch streams). The checkpoint stores all of them (torch CPU and CUDA, numpy,
python ``random``, the data-order and augmentation generators, every attention module's
mask generator), for every rank, so ``resume=True`` continues bit-exactly. The global RNGs
are the run's own only while it runs: the caller's states (torch, numpy, ``random``) are
restored when :func:`train` returns or raises. The LR schedule depends on the total
``epochs``, so a resumed run must have the same config (only ``progress`` and ``out_dir`` may
differ: a run folder may be moved or copied, and data folders compare by their resolved paths);
anything else is a ValueError.

Distributed: launched with ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) or inside
an initialised process group, the model is wrapped in DDP; each epoch's permutation (same on
every rank) is sharded by hand (rank r takes positions r, r + W, ...; the remainder is
dropped so every rank runs the same number of steps); ``batch_size`` is the global batch
(must be divisible by the world size); metrics are all-reduced; only rank 0 writes files
and shows progress. :func:`launch_local` runs W processes on this machine without torchrun.

Where it lives: :mod:`dropkey.lab.config` (:class:`TrainConfig`), :mod:`dropkey.lab.trainer`
(:class:`Trainer`, :func:`train`), :mod:`dropkey.lab.checkpoints` (the checkpoint file,
:func:`read_checkpoint`), :mod:`dropkey.lab.randomness` (seed streams, global RNG
states), :mod:`dropkey.lab.distributed` (process group helpers); this module is the public
entry point and re-exports them. Library code logs (``logging``) and never prints; the CLI
configures logging.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import torch
import torch.distributed as dist

from dropkey.lab import trainer
from dropkey.lab.checkpoints import CHECKPOINT, RESUME_MUTABLE, read_checkpoint
from dropkey.lab.config import DEVICES, PRECISIONS, TrainConfig
from dropkey.lab.distributed import free_port
from dropkey.lab.randomness import RANK_STREAMS, SEED_STREAMS, stream_seeds
from dropkey.lab.trainer import (
    DIAGNOSTIC_COLUMNS,
    METRIC_COLUMNS,
    SIMILARITY_METRICS,
    Trainer,
    TrainingDiverged,
    TrainResult,
    lr_factor,
    mask_modules,
    resolve_device,
    train,
)
from dropkey.storage import write_bytes_atomic
from theory.checks import check_int

__all__ = ["CHECKPOINT", "DEVICES", "DIAGNOSTIC_COLUMNS", "METRIC_COLUMNS", "PRECISIONS", "RANK_STREAMS",
           "RESUME_MUTABLE", "SEED_STREAMS", "SIMILARITY_METRICS", "TrainConfig", "TrainResult", "Trainer",
           "TrainingDiverged", "launch_local", "lr_factor", "mask_modules", "read_checkpoint", "resolve_device",
           "stream_seeds", "train"]


# --- local multi-process launch (no torchrun) ------------------------------------------------


def _local_worker(rank: int, world_size: int, port: int, backend: str, config: TrainConfig,
                  resume: bool, report_dir: str | None, stop_after_epoch: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    written: list[str] = []
    original = trainer._write_file

    def recording_write(path: Path, payload: bytes) -> None:
        written.append(str(path))
        original(path, payload)

    trainer._write_file = recording_write  # every file a run writes goes through it
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    try:
        result = train(config, resume=resume, command=["launch_local", str(world_size)],
                       stop_after_epoch=stop_after_epoch)
        if report_dir is not None:
            report = Path(report_dir)
            report.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            torch.save({"state": result.model.state_dict(), "written": written,
                        "metrics": result.metrics.to_dict("list")}, buffer)
            write_bytes_atomic(report / f"rank{rank}.pt", buffer.getvalue())
    finally:
        trainer._write_file = original
        dist.destroy_process_group()


def launch_local(config: TrainConfig, world_size: int = 2, *, backend: str = "gloo", resume: bool = False,
                 report_dir: str | os.PathLike[str] | None = None, stop_after_epoch: int | None = None) -> None:
    """Run ``config`` on ``world_size`` local processes (DDP on 127.0.0.1), without torchrun.

    With ``report_dir`` each rank saves ``rank{r}.pt`` there: its final weights, the files it
    wrote and its metrics (used by the tests to check that ranks agree and only rank 0 writes).
    """
    import torch.multiprocessing as mp

    check_int(world_size, "world_size", 1)
    mp.spawn(
        _local_worker, args=(world_size, free_port(), backend, copy.deepcopy(config), resume,
                             None if report_dir is None else str(report_dir), stop_after_epoch),
        nprocs=world_size, join=True,
    )
