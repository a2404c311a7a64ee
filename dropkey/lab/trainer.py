"""The trainer: one run of :class:`~dropkey.lab.config.TrainConfig` (see :mod:`dropkey.lab.train`).

:class:`Trainer` sets up the data, model, optimiser and random streams, trains epoch by epoch,
evaluates, records the attention diagnostics, checkpoints (bit-exact resume) and writes the run
folder; :func:`train` is the usual entry point.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dropkey.diagnostics import AttentionRecorder
from dropkey.lab import augment as aug
from dropkey.lab import data as datasets
from dropkey.lab.checkpoints import CHECKPOINT, check_resumable, read_checkpoint
from dropkey.lab.config import TrainConfig
from dropkey.lab.distributed import all_reduce, dist_info
from dropkey.lab.randomness import (
    RunRngs,
    caller_rngs_kept,
    run_rng_state,
    set_run_rng_state,
    stream_seeds,
)
from dropkey.models import VisionTransformer
from dropkey.modules import DropKeyAttention
from dropkey.provenance import provenance
from dropkey.storage import csv_text, json_text, sealed_bytes, write_bytes_atomic
from theory.checks import check_int

log = logging.getLogger(__name__)

METRIC_COLUMNS = (
    "epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
    "images_per_s", "epoch_time_s", "wall_time_s",
)
DIAGNOSTIC_COLUMNS = ("epoch", "layer", "module", "head", "metric", "value", "count", "other_layer")
#: cross-layer similarity rows of diagnostics.csv: (metric, maps compared, measure) -- see dropkey.diagnostics
SIMILARITY_METRICS = (("similarity", "maps", "cosine"), ("similarity_softmax", "weights", "cosine"),
                      ("similarity_centred", "maps", "correlation"))
_DATASET_AUGMENT = {"cifar10": (4, True), "fashion_mnist": (2, False), "digits": (0, False)}


class TrainingDiverged(FloatingPointError):
    """The loss (or the gradient norm) became NaN or infinite."""


@dataclass
class TrainResult:
    """What :func:`train` returns: the per-epoch metrics, the diagnostics rows and the trained model."""

    metrics: pd.DataFrame
    diagnostics: pd.DataFrame
    model: VisionTransformer
    out_dir: Path
    rank: int = 0  # this process's rank (0 when not distributed)


def _write_file(path: Path, payload: bytes) -> None:
    """Every file a run writes goes through here (rank 0 only)."""
    write_bytes_atomic(path, payload)


def _frame_bytes(frame: pd.DataFrame) -> bytes:
    return csv_text(frame).encode("utf-8")


def training_subset(train_set: datasets.ImageData, size: int | None, seed: int) -> datasets.ImageData:
    """The run's training images: the seeded class-balanced subset of ``size`` (None: all of them)."""
    if size is None:
        return train_set
    if size > len(train_set):
        raise ValueError(f"train_subset must be in [1, {len(train_set)}], got {size}")
    index = datasets.balanced_subset_indices(train_set.labels, size, seed=seed,
                                             num_classes=train_set.info.num_classes)
    return train_set.subset(index)


def resolve_device(config: TrainConfig, local_rank: int) -> torch.device:
    """The run's device; a CUDA device torch cannot see is a ValueError naming ``device``."""
    if config.device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device("cuda", local_rank) if config.device == "cuda" else torch.device(config.device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count:
            seen = f"{count} CUDA device(s)" if count else "no CUDA device (a CPU-only torch, or no GPU)"
            raise ValueError(f"device must be one torch can use, got {config.device!r}: torch sees {seen}; "
                             "use device 'cpu' or 'auto'")
    return device


def _resolve_precision(config: TrainConfig, device: torch.device) -> str:
    if config.precision != "auto":
        if device.type == "cpu" and config.precision == "fp16":
            raise ValueError("precision 'fp16' needs CUDA; on CPU use 'bf16' or 'fp32'")
        return config.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"  # bf16 autocast rarely pays off on CPU; opt in with precision='bf16'


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name in ("pos_embed", "cls_token") or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier at optimiser step ``step`` (0-based): linear warmup, then cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mask_modules(model: nn.Module) -> list[DropKeyAttention]:
    """The model's attention modules (their drop ratios and mask generators), in order."""
    return [m for m in model.modules() if isinstance(m, DropKeyAttention)]


# --- the trainer ----------------------------------------------------------------------------


class Trainer:
    """One training run (see the module doc); :func:`train` is the usual entry point."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
        command: Sequence[str] | None = None,
        stop_after_epoch: int | None = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.resume = bool(resume)
        self.callbacks = list(callbacks)
        if stop_after_epoch is not None:
            check_int(stop_after_epoch, "stop_after_epoch", 1)
        self.stop_after_epoch = stop_after_epoch
        self.command = list(command) if command is not None else list(sys.argv)
        self.out_dir = Path(config.out_dir)
        self.distributed, self.rank, self.world_size, local_rank = dist_info()
        self.is_main = self.rank == 0
        self.device = resolve_device(config, local_rank)
        self.precision = _resolve_precision(config, self.device)
        if config.batch_size % self.world_size:
            raise ValueError(
                f"batch_size must be divisible by the world size {self.world_size}, got {config.batch_size}"
            )
        self.local_batch = config.batch_size // self.world_size
        self.seeds = stream_seeds(config.seed, self.rank)
        self._setup()

    # setup

    def _setup(self) -> None:
        c = self.config
        options = {"verify": c.verify_data} if c.dataset != "digits" else {}
        full_train = datasets.load_dataset(c.dataset, "train", c.data_dir, **options)
        test_set = datasets.load_dataset(c.dataset, "test", c.data_dir, **options)
        self.mean, self.std = datasets.channel_stats(full_train.images)
        train_set = training_subset(full_train, c.train_subset, self.seeds["subset"])
        self.train_set, self.test_set = train_set, test_set
        self.steps_per_epoch = len(train_set) // self.world_size // self.local_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size {c.batch_size} exceeds the {len(train_set)} training images "
                "(at least one full step needed)"
            )
        self.total_steps = self.steps_per_epoch * c.epochs
        self.warmup_steps = int(round(c.warmup_epochs * self.steps_per_epoch))

        padding, flip = _DATASET_AUGMENT[c.dataset]
        padding = padding if c.crop_padding is None else c.crop_padding
        flip = flip if c.flip is None else c.flip
        self.augmentation = aug.standard_augmentation(train_set.info.shape[-1], crop_padding=padding, flip=flip)
        self.normalize = aug.Normalize(self.mean, self.std)

        self.model_config = dataclasses.replace(c.model_config(), mask_seed=self.seeds["masks"]) \
            if dict(c.model_overrides).get("mask_seed") is None else c.model_config()
        with caller_rngs_kept():
            torch.manual_seed(self.seeds["init"])
            self.model = VisionTransformer(self.model_config).to(self.device)
            # diagnostics twin: reference path, weights copied in before each use
            twin = dataclasses.replace(self.model_config, fused_attn=False)
            self.diag_model = VisionTransformer(twin).to(self.device)
        # the global RNGs dropout and drop path draw from: the run's own, never left in the caller's process
        self.rngs = RunRngs(self.seeds["torch"])
        self.order_gen = torch.Generator().manual_seed(self.seeds["order"])
        self.augment_gen = torch.Generator().manual_seed(self.seeds["augment"])

        self.optimizer = torch.optim.AdamW(_param_groups(self.model, c.weight_decay), lr=c.lr, betas=(0.9, 0.999))
        min_ratio = c.min_lr / c.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                                   min_ratio=min_ratio),
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.net: nn.Module = self.model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids, gradient_as_bucket_view=True)
        if c.compile:
            self.net = torch.compile(self.net)
        self.start_epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.diagnostics: list[dict[str, Any]] = []
        self.elapsed = 0.0
        images = self.test_set.images[: c.diagnostics_batch]
        self.diag_images = self.normalize(images).to(self.device)
        self.diag_labels = self.test_set.labels[: c.diagnostics_batch].to(self.device)

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def _gather(self, obj: object) -> list[object]:
        if not self.distributed:
            return [obj]
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def save_checkpoint(self, epochs_done: int) -> None:
        with self.rngs.active():
            rng = self._gather(run_rng_state(self.order_gen, self.augment_gen, mask_modules(self.model)))
        if not self.is_main:
            return
        state = {
            "format": 1,
            "config": self.config.to_dict(),
            "epochs_done": epochs_done,
            "step": self.step,
            "elapsed": self.elapsed,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "history": self.history,
            "diagnostics": self.diagnostics,
            "world_size": self.world_size,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write_file(self.checkpoint_path, sealed_bytes(buffer.getvalue()))  # the content digest, in the same file

    def load_checkpoint(self) -> bool:
        """Restore the run from ``out_dir/checkpoint.pt`` (its digest checked first); False if there is none."""
        if not self.checkpoint_path.is_file():
            return False
        state = read_checkpoint(self.checkpoint_path)
        check_resumable(self.checkpoint_path, state, self.config)
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"cannot resume {self.checkpoint_path}: saved with world size {state['world_size']}, "
                f"now {self.world_size}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        with self.rngs.active():
            set_run_rng_state(state["rng"][self.rank], self.order_gen, self.augment_gen, mask_modules(self.model),
                              self.device)
        self.start_epoch = int(state["epochs_done"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.history = list(state["history"])
        self.diagnostics = list(state["diagnostics"])
        log.info("resumed %s after epoch %d (step %d)", self.checkpoint_path, self.start_epoch, self.step)
        return True

    # one epoch

    def _epoch_indices(self) -> Tensor:
        perm = torch.randperm(len(self.train_set), generator=self.order_gen)
        usable = self.steps_per_epoch * self.local_batch * self.world_size
        return perm[:usable][self.rank :: self.world_size]  # hand-made DistributedSampler

    def _forward_loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast():
            logits = self.net(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)
        return loss, logits

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        with warnings.catch_warnings():
            # DDP warns once when a gradient's strides differ from its bucket's only in a size-1
            # dimension (the 1-channel patch convolution's weight): same memory layout, harmless.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            return self._train_epoch_inner(epoch)

    def _train_epoch_inner(self, epoch: int) -> dict[str, float]:
        from tqdm.auto import tqdm

        c = self.config
        self._set_drop_phase(epoch)
        self.net.train()
        indices = self._epoch_indices()
        sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
        started = time.perf_counter()
        bar = tqdm(
            range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{c.epochs}", leave=False,
            disable=not (c.progress and self.is_main), unit="step",
        )
        for i in bar:
            batch = indices[i * self.local_batch : (i + 1) * self.local_batch]
            images = self.augmentation(self.train_set.images[batch], self.augment_gen)
            images = self.normalize(images).to(self.device, non_blocking=True)
            labels = self.train_set.labels[batch].to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss, logits = self._forward_loss(images, labels)
            finite = torch.isfinite(loss.detach()).item()  # the loss is float32 even under autocast
            if self.distributed:  # every rank must stop together (a lone raise would hang the others)
                finite = all_reduce([float(not finite)], self.device, True)[0] == 0.0
            if not finite:
                self._diverged(epoch, i, f"loss {loss.item()}")
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            max_norm = c.grad_clip if c.grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            if not self.scaler.is_enabled() and not torch.isfinite(grad_norm).item():
                self._diverged(epoch, i, f"gradient norm {grad_norm.item()}")  # synced: same on all ranks
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            with torch.no_grad():
                n = labels.numel()
                sums += torch.tensor([loss.detach().double().item() * n, (logits.argmax(-1) == labels).sum().item(), n],
                                     dtype=torch.float64)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        seconds = time.perf_counter() - started
        loss_sum, correct, count = all_reduce(sums.tolist(), self.device, self.distributed)
        return {
            "train_loss": loss_sum / count, "train_acc": correct / count,
            "images_per_s": count / seconds, "train_time_s": seconds,
        }

    def _set_drop_phase(self, epoch: int) -> None:
        """Each block's configured drop ratio, or 0 in the final ``final_epochs_without_drop`` epochs."""
        off = epoch >= self.config.epochs - self.config.final_epochs_without_drop
        modules = mask_modules(self.model)
        for module, ratio in zip(modules, self.model_config.layer_drop_ratios, strict=True):
            module.set_drop_ratio(0.0 if off else ratio)

    def _diverged(self, epoch: int, step_in_epoch: int, what: str) -> None:
        raise TrainingDiverged(
            f"training diverged: {what} at epoch {epoch + 1}, step {step_in_epoch + 1} (global step {self.step + 1}), "
            f"lr {self.scheduler.get_last_lr()[0]:.3g}; lower lr, enable grad_clip or check the data. "
            f"The last good checkpoint is {self.checkpoint_path}"
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test loss (no label smoothing) and accuracy, all-reduced over ranks."""
        self.model.eval()
        n = len(self.test_set)
        shard = range(self.rank, n, self.world_size)
        index = torch.tensor(list(shard), dtype=torch.int64)
        sums = [0.0, 0.0, 0.0]
        for start in range(0, index.numel(), self.config.eval_batch_size):
            batch = index[start : start + self.config.eval_batch_size]
            images = self.normalize(self.test_set.images[batch]).to(self.device)
            labels = self.test_set.labels[batch].to(self.device)
            with self._autocast():
                logits = self.model(images).float()
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").item()
            sums[1] += (logits.argmax(-1) == labels).sum().item()
            sums[2] += labels.numel()
        loss_sum, correct, count = all_reduce(sums, self.device, self.distributed)
        return {"test_loss": loss_sum / count, "test_acc": correct / count}

    def collect_diagnostics(self, epoch: int) -> list[dict[str, Any]]:
        """Attention diagnostics on the fixed batch (eval mode, reference path, no RNG drawn)."""
        model = self.diag_model
        model.load_state_dict(self.model.state_dict())
        model.eval()
        with AttentionRecorder(model, store_maps=True) as recorder, torch.enable_grad():
            logits = model(self.diag_images)
            F.cross_entropy(logits.float(), self.diag_labels).backward()
        model.zero_grad(set_to_none=True)
        rows = [dict(row, epoch=epoch, other_layer=None) for row in recorder.to_frame().to_dict("records")]
        modules = [name for name, _ in recorder.layers]
        for metric, source, measure in SIMILARITY_METRICS:
            for row in recorder.similarity_frame(pairs="adjacent", source=source, measure=measure).to_dict("records"):
                rows.append({
                    "epoch": epoch, "layer": int(row["block_a"]), "module": modules[int(row["block_a"])],
                    "head": int(row["head"]), "metric": metric, "value": float(row["value"]),
                    "count": int(self.diag_images.shape[0]), "other_layer": int(row["block_b"]),
                })
        return rows

    # outputs

    def metrics_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history, columns=list(METRIC_COLUMNS))

    def diagnostics_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.diagnostics, columns=list(DIAGNOSTIC_COLUMNS))
        frame["other_layer"] = frame["other_layer"].astype("Int64")
        return frame

    def _write_run_files(self) -> None:
        if not self.is_main:
            return
        payload = {
            "train": self.config.to_dict(),
            "model": dataclasses.asdict(self.model_config),
            "resolved": {
                "device": str(self.device), "precision": self.precision, "world_size": self.world_size,
                "steps_per_epoch": self.steps_per_epoch, "warmup_steps": self.warmup_steps,
                "train_images": len(self.train_set), "test_images": len(self.test_set),
                "normalize_mean": self.mean, "normalize_std": self.std,
                "augmentation": repr(self.augmentation), "seeds": self.seeds,
            },
        }
        _write_file(self.out_dir / "config.json", json_text(payload).encode())
        record = provenance(self.config.seed, self.command)
        record["resumed_from_epoch"] = self.start_epoch  # 0: a fresh run
        _write_file(self.out_dir / "provenance.json", json_text(record).encode())

    def _write_tables(self) -> None:
        if self.is_main:
            _write_file(self.out_dir / "metrics.csv", _frame_bytes(self.metrics_frame()))
            _write_file(self.out_dir / "diagnostics.csv", _frame_bytes(self.diagnostics_frame()))

    # the loop

    def run(self) -> TrainResult:
        """Train (resuming if asked) to ``config.epochs`` or ``stop_after_epoch``; the caller's global RNGs are kept."""
        with self.rngs.active():
            return self._run()

    def _run(self) -> TrainResult:
        c = self.config
        if self.resume:
            if not self.load_checkpoint():
                log.info("no checkpoint in %s; starting from scratch", self.out_dir)
        elif self.checkpoint_path.exists():
            raise FileExistsError(
                f"{self.checkpoint_path} exists; pass resume=True (--resume) to continue it, or choose another out_dir"
            )
        self._write_run_files()
        if c.diagnostics_every and self.start_epoch == 0 and self.is_main and not self.diagnostics:
            self.diagnostics.extend(self.collect_diagnostics(0))  # the network at initialisation
        for epoch in range(self.start_epoch, c.epochs):
            started = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch + 1}
            row.update(self._train_epoch(epoch))
            if (epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs:
                row.update(self.evaluate())
            else:  # not evaluated this epoch (eval_every): explicit missing values, never stale ones
                row.update(test_loss=math.nan, test_acc=math.nan)
            if c.diagnostics_every and ((epoch + 1) % c.diagnostics_every == 0 or epoch + 1 == c.epochs):
                if self.is_main:
                    self.diagnostics.extend(self.collect_diagnostics(epoch + 1))
            epoch_time = time.perf_counter() - started
            self.elapsed += epoch_time
            row.update(step=self.step, lr=self.scheduler.get_last_lr()[0], epoch_time_s=epoch_time,
                       wall_time_s=self.elapsed)
            row.pop("train_time_s")
            self.history.append({k: row[k] for k in METRIC_COLUMNS})
            self.save_checkpoint(epoch + 1)
            self._write_tables()
            log.info(
                "epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.0f img/s | lr %.3g",
                epoch + 1, c.epochs, row["train_loss"], row["train_acc"], row["test_loss"], row["test_acc"],
                row["images_per_s"], row["lr"],
            )
            for callback in self.callbacks:
                callback(epoch + 1, dict(row))
            if self.stop_after_epoch is not None and epoch + 1 >= self.stop_after_epoch and epoch + 1 < c.epochs:
                log.info("stopping after epoch %d as asked; continue with resume=True", epoch + 1)
                break
        if self.start_epoch >= c.epochs:
            self._write_tables()
        return TrainResult(self.metrics_frame(), self.diagnostics_frame(), self.model, self.out_dir, self.rank)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
    command: Sequence[str] | None = None,
    stop_after_epoch: int | None = None,
) -> TrainResult:
    """Train per ``config``; ``resume=True`` continues ``out_dir/checkpoint.pt`` bit-exactly.

    ``callbacks`` are called after each epoch's checkpoint as ``callback(epoch, metrics_row)``;
    an exception there stops the run (the checkpoint of that epoch is kept).
    ``stop_after_epoch=k`` ends this call after epoch k (checkpointed; the schedule is still the
    one of ``config.epochs``), e.g. to split a run into time-limited jobs.
    """
    return Trainer(
        config, resume=resume, callbacks=callbacks, command=command, stop_after_epoch=stop_after_epoch
    ).run()
