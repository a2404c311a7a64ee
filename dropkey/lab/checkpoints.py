"""A training run's checkpoint file: written with its content digest, read back only if it matches.

``checkpoint.pt`` is the ``torch.save`` of the run's state behind :mod:`dropkey.storage`'s seal (a
one-line header with the payload's length and SHA-256, in the same file, written atomically), so
a checkpoint that is empty, truncated, garbage or changed by a single bit is refused with an
:class:`~dropkey.storage.IntegrityError` (a ValueError) naming the file, never trained on.
:func:`read_checkpoint` reads one; :func:`check_resumable` says whether a config may resume it:
what a run computes is its identity, not where its folder lies (:data:`RESUME_MUTABLE`), so a
moved or copied run folder resumes, and data folders compare by their resolved paths.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from dropkey.lab.config import TrainConfig, freeze
from dropkey.storage import IntegrityError, is_complete, read_marker, read_sealed, verify_file_record

__all__ = ["CHECKPOINT", "RESUME_MUTABLE", "read_checkpoint", "check_resumable"]

CHECKPOINT = "checkpoint.pt"
#: config fields that may differ between a run and its resumption (where the folder lies is not what the run is)
RESUME_MUTABLE = ("progress", "out_dir")
#: what a checkpoint's state holds (Trainer.save_checkpoint)
STATE_KEYS = ("config", "epochs_done", "step", "elapsed", "model", "optimizer", "scheduler", "scaler", "rng",
              "history", "diagnostics", "world_size")


def read_checkpoint(path: str | os.PathLike[str], *, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint's state, after checking the digest written with it (:func:`dropkey.storage.read_sealed`).

    ``record`` (a completion marker's entry for the file, ``{"bytes", "sha256"}``) also admits a
    checkpoint of an earlier version, written without its own digest, when the file matches it.
    Raises :class:`~dropkey.storage.IntegrityError` (a ValueError) naming the file when it is
    empty, truncated, garbage or modified, or holds no training state.
    """
    path = Path(path)
    try:
        payload = read_sealed(path, "checkpoint")
    except IntegrityError:
        if record is None:
            raise
        verify_file_record(path, record)  # an earlier version's bare torch.save, as its run folder recorded it
        payload = path.read_bytes()
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # a verified payload torch cannot read (e.g. an unknown torch format)
        lines = str(error).strip().splitlines()
        raise IntegrityError(
            f"checkpoint {path} cannot be loaded ({type(error).__name__}: {lines[0] if lines else ''})"
        ) from error
    missing = [key for key in STATE_KEYS if key not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise IntegrityError(f"checkpoint {path} holds no training state (it lacks {missing})")
    return state


def read_run_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The final checkpoint of the run in ``folder``; where the folder is marked complete, its marker's entry for
    the checkpoint also admits one of an earlier version (:func:`read_checkpoint`)."""
    folder = Path(folder)
    record = read_marker(folder)["files"].get(CHECKPOINT) if is_complete(folder) else None
    return read_checkpoint(folder / CHECKPOINT, record=record)


def _identity(name: str, value: object) -> object:
    """A config value as a run's identity sees it: data folders by their resolved paths."""
    if name == "data_dir" and value is not None:
        return str(Path(str(value)).expanduser().resolve())
    return freeze(value)


def check_resumable(path: Path, state: dict[str, Any], config: TrainConfig) -> None:
    """ValueError naming the fields unless ``config`` is the run the checkpoint at ``path`` (its ``state``) saved."""
    saved = TrainConfig.from_dict(state["config"]).to_dict()
    mine = config.to_dict()
    differ = sorted(k for k in mine if k not in RESUME_MUTABLE and _identity(k, saved.get(k)) != _identity(k, mine[k]))
    if differ:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {mine[k]!r}" for k in differ)
        raise ValueError(
            f"cannot resume {path}: config differs in {differ} ({details}). The LR "
            "schedule and data streams depend on the whole config; start a new out_dir instead."
        )
