"""The configuration of one training run: :class:`TrainConfig`, frozen and validated on construction.

Every field is checked when the config is made (:mod:`theory.checks`: a ValueError naming the
field and its range); :meth:`TrainConfig.model_config` gives the ViT it trains. See
:mod:`dropkey.lab.train` for what a run does with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dropkey import regularisers
from dropkey.lab import data as datasets
from dropkey.models import MODEL_CONFIGS, ViTConfig
from theory.checks import (
    check_bool,
    check_choice,
    check_drop_ratio,
    check_int,
    check_real,
    check_seed,
)

__all__ = ["DEVICES", "PRECISIONS", "TrainConfig"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


def freeze(value: object) -> object:
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    return value


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; validated on construction (ValueError names the field)."""

    dataset: str = "digits"
    data_dir: str | None = None
    train_subset: int | None = None  # seeded class-balanced subset of the training split
    model: str = "vit_tiny_8"
    attn_variant: str | tuple[str, ...] = "dropkey"
    drop_ratio: float | tuple[float, ...] = 0.1  # one ratio or one per block (a schedule)
    # train/test alignment by fine-tuning: the last N epochs train with every attention
    # regulariser switched off (drop ratio 0), so the final model is tuned for plain inference
    final_epochs_without_drop: int = 0
    model_overrides: tuple[tuple[str, object], ...] = ()  # further ViTConfig fields, (name, value) pairs
    epochs: int = 10
    batch_size: int = 64  # global batch (all ranks together)
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping
    crop_padding: int | None = None  # None: the dataset's default
    flip: bool | None = None  # None: the dataset's default
    precision: str = "auto"
    compile: bool = False
    seed: int = 0
    out_dir: str = "runs/train"
    diagnostics_every: int = 1  # epochs between diagnostics (0 = never); the last epoch always
    diagnostics_batch: int = 64
    eval_batch_size: int = 500
    eval_every: int = 1  # epochs between test evaluations; the last epoch always (others: NaN test metrics)
    device: str = "auto"
    progress: bool = True
    verify_data: bool = True

    def __post_init__(self) -> None:
        for name in ("attn_variant", "drop_ratio"):
            object.__setattr__(self, name, freeze(getattr(self, name)))
        object.__setattr__(self, "model_overrides", freeze(dict(self.model_overrides)))
        object.__setattr__(self, "out_dir", str(self.out_dir))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(self.data_dir))
        check_choice(self.dataset, "dataset", datasets.DATASET_NAMES)
        check_choice(self.model, "model", sorted(MODEL_CONFIGS))
        variants = (self.attn_variant,) if isinstance(self.attn_variant, str) else self.attn_variant
        for variant in variants:
            check_choice(variant, "attn_variant", regularisers.names())
        ratios = (self.drop_ratio,) if not isinstance(self.drop_ratio, tuple) else self.drop_ratio
        for i, ratio in enumerate(ratios):
            check_drop_ratio(ratio, "drop_ratio" if not isinstance(self.drop_ratio, tuple) else f"drop_ratio[{i}]")
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("diagnostics_batch", 1), ("eval_batch_size", 1),
                              ("diagnostics_every", 0), ("final_epochs_without_drop", 0),
                              ("eval_every", 1)):
            check_int(getattr(self, name), name, minimum)
        check_int(self.final_epochs_without_drop, "final_epochs_without_drop", 0, self.epochs - 1)
        check_seed(self.seed)
        if self.train_subset is not None:
            check_int(self.train_subset, "train_subset", 1)
        if self.crop_padding is not None:
            check_int(self.crop_padding, "crop_padding", 0)
        if self.flip is not None:
            check_bool(self.flip, "flip")
        check_real(self.lr, "lr", 0.0, None, low_open=True)
        check_real(self.min_lr, "min_lr", 0.0, self.lr)
        check_real(self.weight_decay, "weight_decay", 0.0, None)
        check_real(self.warmup_epochs, "warmup_epochs", 0.0, float(self.epochs))
        check_real(self.label_smoothing, "label_smoothing", 0.0, 1.0, high_open=True)
        if self.grad_clip is not None:
            check_real(self.grad_clip, "grad_clip", 0.0, None, low_open=True)
        check_choice(self.precision, "precision", PRECISIONS)
        if not (isinstance(self.device, str) and self.device.startswith("cuda:")):
            check_choice(self.device, "device", (*DEVICES, "cuda:N"))
        for name in ("compile", "progress", "verify_data"):
            check_bool(getattr(self, name), name)
        self.model_config()  # model overrides validated by ViTConfig

    def model_config(self) -> ViTConfig:
        """The ViTConfig this run trains (named config + variant, drop ratio and overrides)."""
        overrides = dict(self.model_overrides)
        fields = {f.name for f in dataclasses.fields(ViTConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"model_overrides has unknown ViTConfig fields {unknown}; allowed: {sorted(fields)}")
        overrides.setdefault("attn_variant", self.attn_variant)
        overrides.setdefault("drop_ratio", self.drop_ratio)
        info = datasets.DATASETS[self.dataset]
        config = dataclasses.replace(MODEL_CONFIGS[self.model], **overrides)
        shape = (config.in_chans, config.image_size, config.image_size)
        if shape != info.shape or config.num_classes != info.num_classes:
            raise ValueError(
                f"model {self.model!r} takes {config.in_chans}x{config.image_size}x{config.image_size} images and "
                f"{config.num_classes} classes; dataset {self.dataset!r} has {info.shape} and {info.num_classes}"
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model_overrides"] = {k: v for k, v in self.model_overrides}
        return out

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in fields})
