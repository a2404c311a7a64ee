"""Train/test alignment by fine-tuning: a trained run continued without its attention regulariser.

The paper's second alignment option (docs/theory.md, section 4): after training with DropKey,
train a few epochs with nothing dropped, so the final model is tuned for plain inference. It
is done here as an evaluation of a finished run, with its *own* short schedule: a fresh AdamW
from the run's final weights, ``epochs`` epochs of cosine decay from ``lr`` to 0 without warmup,
every attention regulariser off (``attn_variant="none"``), the run's data, batch size, loss and
seed streams otherwise. (The tail of the main cosine would be no fine-tune at all: its learning
rate is a few percent of the peak there.)

The fine-tune trains in a sibling work folder ``<run>.finetune/`` (checkpointed every epoch, so
an interrupted fine-tune resumes); when done its per-epoch metrics are written to the run
folder's ``finetune.csv`` and the work folder is removed.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dropkey.lab.checkpoints import read_run_checkpoint
from dropkey.lab.config import TrainConfig
from dropkey.lab.trainer import Trainer
from dropkey.storage import write_csv_atomic
from theory.checks import check_int, check_real

log = logging.getLogger(__name__)

FINETUNE_FILE = "finetune.csv"
COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_acc", "finetune_epochs", "finetune_lr")


@dataclass(frozen=True)
class FineTune:
    """How a trained run is fine-tuned without its regulariser: epochs and the peak lr of its own cosine."""

    epochs: int
    lr: float

    def __post_init__(self) -> None:
        check_int(self.epochs, "finetune epochs", 1)
        check_real(self.lr, "finetune lr", 0.0, None, low_open=True)


def finetune_config(config: TrainConfig, finetune: FineTune, work_dir: Path) -> TrainConfig:
    """The run's config with the regulariser off and the fine-tune's own schedule (tested about 5 times)."""
    return dataclasses.replace(
        config, attn_variant="none", drop_ratio=0.0, final_epochs_without_drop=0, epochs=finetune.epochs,
        lr=finetune.lr, min_lr=0.0, warmup_epochs=0.0, eval_every=max(1, finetune.epochs // 5), diagnostics_every=0,
        out_dir=str(work_dir), progress=False,
    )


def has_finetune(folder: Path, finetune: FineTune) -> bool:
    """Whether ``folder`` holds a fine-tune of exactly these settings."""
    path = Path(folder) / FINETUNE_FILE
    if not path.is_file():
        return False
    table = pd.read_csv(path)
    return bool(len(table) == finetune.epochs and (table["finetune_epochs"] == finetune.epochs).all()
                and (table["finetune_lr"] == finetune.lr).all())


def finetune_run(folder: Path, config: TrainConfig, finetune: FineTune, command: list[str] | None = None
                 ) -> pd.DataFrame:
    """Fine-tune the finished run in ``folder`` (module doc); write and return its per-epoch metrics (``COLUMNS``)."""
    folder = Path(folder)
    work = folder.parent / f"{folder.name}.finetune"
    trainer = Trainer(finetune_config(config, finetune, work), resume=True, command=command)
    if not trainer.checkpoint_path.exists():  # a fresh fine-tune: start from the run's final weights
        trainer.model.load_state_dict(read_run_checkpoint(folder)["model"])
        log.info("fine-tuning %s without its regulariser: %d epochs, lr %g", folder, finetune.epochs, finetune.lr)
    metrics = trainer.run().metrics
    table = metrics.assign(finetune_epochs=finetune.epochs, finetune_lr=finetune.lr)[list(COLUMNS)]
    write_csv_atomic(folder / FINETUNE_FILE, table)
    shutil.rmtree(work, ignore_errors=True)  # its checkpoint is not needed once the table is written
    return table
