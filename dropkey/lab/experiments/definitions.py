"""What the real-ViT experiments train: the three scales and, per experiment, its arms.

An *arm* is one training recipe (attention regulariser, drop ratio or schedule, model
overrides); an experiment trains every arm with every seed of the scale. Arms are
identified by their full :class:`~dropkey.lab.train.TrainConfig`, so two experiments that need
the same run (e.g. DropKey at the matched ratio, used by the dynamics, accuracy, schedule,
alignment and structured-mask experiments) share one training run.

Scales (choices are ours; the paper's exact recipes are not published for these sizes):

- ``quick``: scikit-learn's bundled digits (8x8, 1,437 training images), a 3-block tiny ViT,
  15 epochs, 3 seeds. Minutes on a 2-core CPU; runs in CI and in the README's main command.
  It shows the pipeline works and the direction of the effects, not their size.
- ``medium``: Fashion-MNIST, a class-balanced 1,000-image training subset (the small-data
  regime, where a regulariser can matter: 80 epochs overfit it), the full 10,000-image test set
  (every 10 epochs and at the end), a 4-block ViT with 50 tokens, 3 seeds; the collapse sweep
  uses 7x7 patches (17 tokens) to afford 12 blocks. About an hour and a half on a 2-core CPU.
- ``full``: CIFAR-10, a class-balanced 10,000-image training subset (the paper's small-data
  regime, Fig. 4 spirit), a 6-block ViT, 200 epochs, 5 seeds; collapse sweep up to 24 blocks.
  Needs a GPU.

The matched drop ratio is ``scale.drop_ratio`` for DropKey and for post-softmax dropout; the
schedules share its mean (linear from ``r + spread/2`` at the first block to ``r - spread/2``
at the last, constant, or the reverse).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dropkey import schedules

SCALE_NAMES = ("quick", "medium", "small_data", "full")  # in order of precedence (reports use the last measured)


@dataclass(frozen=True)
class Scale:
    """How big an experiment runs: data, model, optimisation, seeds (frozen)."""

    name: str
    description: str
    dataset: str
    model: str
    train_subset: int | None
    epochs: int
    batch_size: int
    lr: float
    warmup_epochs: float
    seeds: tuple[int, ...]
    drop_ratio: float  # the matched ratio of every comparison
    schedule_spread: float  # r_max - r_min of the linear schedules
    finetune_epochs: int  # alignment: epochs of the drop-free fine-tune after training
    mc_samples: tuple[int, ...]  # alignment: numbers of Monte-Carlo passes K evaluated
    collapse_model: str
    collapse_depths: tuple[int, ...]
    collapse_epochs: int
    eval_every: int = 1  # epochs between test evaluations (the last always)
    eval_batch_size: int = 500
    crop_padding: int | None = None  # random-crop padding (0: no augmentation); None: the dataset's default
    # the compute budget: experiments trained with only the first n of ``seeds`` ((name, n) pairs; others: all)
    seed_budget: tuple[tuple[str, int], ...] = ()
    sensitivity_ratios: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)  # drop_ratio sweep: constant DropKey ratios
    finetune_lr: float = 1e-4  # alignment: peak lr of the drop-free fine-tune's own cosine schedule (no warmup)

    def seeds_for(self, experiment_name: str) -> tuple[int, ...]:
        """The seeds experiment ``experiment_name`` trains at this scale (its budget's first n, or all)."""
        return self.seeds[: dict(self.seed_budget).get(experiment_name, len(self.seeds))]


SCALES: dict[str, Scale] = {
    "quick": Scale(
        name="quick",
        description="scikit-learn digits (8x8, all 1,437 training images), 3-block tiny ViT (17 tokens), "
        "15 epochs, 3 seeds; collapse sweep at depth 2 and 6 (10 epochs); a pipeline check on a 2-core CPU (minutes)",
        dataset="digits", model="vit_tiny_8", train_subset=None, epochs=15, batch_size=64, lr=2e-3,
        warmup_epochs=1.0, seeds=(0, 1, 2), drop_ratio=0.2, schedule_spread=0.2, finetune_epochs=3,
        mc_samples=(1, 2, 4, 8), collapse_model="vit_tiny_8", collapse_depths=(2, 6), collapse_epochs=10,
    ),
    "medium": Scale(
        name="medium",
        description="Fashion-MNIST, 1,000-image class-balanced training subset (the small-data regime: 100 images "
        "per class, trained long enough to overfit), full 10,000-image test set (every 10 epochs and at the end), "
        "4-block ViT (50 tokens), 80 epochs, 3 seeds; collapse sweep with 7x7 patches (17 tokens) at depth 4, 8, 12 "
        "(30 epochs); about an hour and a half on a 2-core CPU",
        dataset="fashion_mnist", model="vit_tiny_28", train_subset=1000, epochs=80, batch_size=64, lr=1e-3,
        warmup_epochs=5.0, seeds=(0, 1, 2), drop_ratio=0.2, schedule_spread=0.2, finetune_epochs=10,
        mc_samples=(1, 2, 4, 8, 16), collapse_model="vit_tiny_28_p7", collapse_depths=(4, 8, 12), collapse_epochs=30,
        eval_every=10,
    ),
    "small_data": Scale(
        name="small_data",
        description="Fashion-MNIST, 500-image class-balanced training subset without augmentation (the overfitting "
        "regime chosen by the calibration, results/small_data/calibration: clean training accuracy >= 99 %, test "
        "accuracy plateaued, a train-test gap >= 10 pp), full 10,000-image test set, 4-block ViT (50 tokens), "
        "100 epochs of batch 32, 12 seeds; the paper's base drop ratio 0.1",
        dataset="fashion_mnist", model="vit_tiny_28", train_subset=500, epochs=100, batch_size=32, lr=1e-3,
        warmup_epochs=5.0, seeds=tuple(range(12)), drop_ratio=0.1, schedule_spread=0.1, finetune_epochs=10,
        mc_samples=(1, 2, 4, 8, 16), collapse_model="vit_tiny_28_p7", collapse_depths=(4, 8, 12), collapse_epochs=100,
        eval_every=25, crop_padding=0,
        # 12 paired seeds where the pilot's SD asked for them (dynamics, accuracy, alignment); the rest as the
        # three-hour CPU budget allows (docs/experiments.md, "Compute"), so paired_decision may say how many more
        seed_budget=(("schedules", 6), ("structured", 6), ("drop_ratio", 6), ("collapse", 3)),
    ),
    "full": Scale(
        name="full",
        description="CIFAR-10, 10,000-image class-balanced training subset (small-data regime), full test set, "
        "6-block ViT (65 tokens), 200 epochs, 5 seeds; collapse sweep at depth 6, 12, 24 (a GPU)",
        dataset="cifar10", model="vit_small_32", train_subset=10000, epochs=200, batch_size=128, lr=1e-3,
        warmup_epochs=10.0, seeds=(0, 1, 2, 3, 4), drop_ratio=0.1, schedule_spread=0.2, finetune_epochs=20,
        mc_samples=(1, 2, 4, 8, 16, 32), collapse_model="vit_deep_32", collapse_depths=(6, 12, 24), collapse_epochs=100,
        eval_every=5,
    ),
}


def scale(name: str) -> Scale:
    """The named scale (ValueError naming the allowed names otherwise)."""
    if name not in SCALES:
        raise ValueError(f"scale must be one of {SCALE_NAMES}, got {name!r}")
    return SCALES[name]


@dataclass(frozen=True)
class Arm:
    """One training recipe of an experiment; ``group`` labels sweeps (e.g. ``depth=12``)."""

    name: str
    variant: str = "none"
    drop_ratio: float | tuple[float, ...] = 0.0
    model: str | None = None  # None: the scale's model
    model_overrides: tuple[tuple[str, object], ...] = ()
    final_epochs_without_drop: int = 0
    epochs: int | None = None  # None: the scale's epochs
    group: str = ""


def _depth(s: Scale) -> int:
    from dropkey.models import MODEL_CONFIGS  # torch: imported only when arms are built

    return MODEL_CONFIGS[s.model].depth


def _regulariser_arms(s: Scale) -> tuple[Arm, ...]:
    """No regulariser, post-softmax dropout and DropKey at the same ratio."""
    r = s.drop_ratio
    return (Arm("none"), Arm("dropout", "dropout", r), Arm("dropkey", "dropkey", r))


def _schedule_arms(s: Scale) -> tuple[Arm, ...]:
    depth, r = _depth(s), s.drop_ratio
    spread = s.schedule_spread
    return (
        Arm("constant", "dropkey", r),  # the same run as the other experiments' DropKey arm
        Arm("decreasing", "dropkey", schedules.schedule("linear_decreasing", depth, mean=r, spread=spread)),
        Arm("increasing", "dropkey", schedules.schedule("linear_increasing", depth, mean=r, spread=spread)),
    )


def _sensitivity_arms(s: Scale) -> tuple[Arm, ...]:
    """No regulariser and constant DropKey at every ratio of the sweep (the matched ratio's run is shared)."""
    return (Arm("none"), *(Arm(f"r={r:g}", "dropkey", r) for r in s.sensitivity_ratios))


def _alignment_arms(s: Scale) -> tuple[Arm, ...]:
    """The DropKey run, evaluated three ways: plain and Monte-Carlo inference, and after a drop-free fine-tune."""
    return (Arm("dropkey", "dropkey", s.drop_ratio),)


def _structured_arms(s: Scale) -> tuple[Arm, ...]:
    r = s.drop_ratio
    return (Arm("dropkey", "dropkey", r), Arm("block", "dropkey_block", r), Arm("cross", "dropkey_cross", r))


def _collapse_arms(s: Scale) -> tuple[Arm, ...]:
    """Plain, Re-attention (second half of the blocks), DropKey, both: at every depth of the sweep."""
    arms = []
    for depth in s.collapse_depths:
        base = (("depth", depth),)
        reattention = base + (("reattention_blocks", tuple(range(depth // 2, depth))),)
        common = dict(model=s.collapse_model, epochs=s.collapse_epochs, group=f"depth={depth}")
        arms += [
            Arm("plain", model_overrides=base, **common),
            Arm("reattention", model_overrides=reattention, **common),
            Arm("dropkey", "dropkey", s.drop_ratio, model_overrides=base, **common),
            Arm("dropkey+reattention", "dropkey", s.drop_ratio, model_overrides=reattention, **common),
        ]
    return tuple(arms)


@dataclass(frozen=True)
class Experiment:
    """One experiment: what it asks, the claims it measures, and its arms at a given scale."""

    name: str
    title: str
    question: str
    claims: tuple[str, ...]
    arms: Callable[[Scale], tuple[Arm, ...]]
    monte_carlo_arms: tuple[str, ...] = ()  # arms also evaluated with Monte-Carlo inference
    finetune_arms: tuple[str, ...] = ()  # arms also fine-tuned without their regulariser (finetune.py)
    # an experiment that is not "train every arm and seed, then compare by seed" runs itself:
    # run(scale_name, runs_dir=, results_dir=, data_dir=, device=, progress=, command=) writes the result folder
    run: Callable[..., Any] | None = None
    method: str = ""  # how it measures, for its page (default: arms x seeds, paired by seed)


def _probed_arms(s: Scale) -> tuple[Arm, ...]:
    """The runs the gradient-mechanism probe measures (the scale's first seed only)."""
    return (Arm("none"), Arm("dropkey", "dropkey", s.drop_ratio))


def _run_gradient_mechanism(scale_name: str, **options: Any) -> Any:
    from dropkey.lab.experiments.gradient_mechanism import run_gradient_mechanism  # torch: imported when run

    return run_gradient_mechanism(scale_name, **options)


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(
        "attention_dynamics",
        "Attention dynamics on a real ViT: peaks, entropy and the gradient on the peak",
        "Does DropKey's gradient dynamics shrink attention peaks in a trained ViT, compared with no regulariser "
        "and with post-softmax dropout at the same ratio?",
        ("vit-attention-peaks", "vit-dropkey-vs-dropout-entropy", "vit-compensation"),
        _regulariser_arms,
    ),
    Experiment(
        "accuracy",
        "Accuracy: no regulariser vs post-softmax dropout vs DropKey",
        "Does DropKey improve top-1 accuracy over no attention regulariser and over post-softmax dropout "
        "(the paper's small-data setting)?",
        ("vit-accuracy", "vit-generalisation-gap"),
        _regulariser_arms,
    ),
    Experiment(
        "schedules",
        "Drop-ratio schedules over depth at the same mean ratio",
        "Does a drop ratio that decreases with depth beat a constant (and an increasing) one at the same mean?",
        ("vit-schedule",),
        _schedule_arms,
    ),
    Experiment(
        "drop_ratio",
        "Drop-ratio sensitivity: constant DropKey at r in {0.05, 0.1, 0.2, 0.3}",
        "Does DropKey beat no regulariser across the range of drop ratios the paper uses, or only near one tuned "
        "ratio?",
        ("vit-drop-ratio",),
        _sensitivity_arms,
    ),
    Experiment(
        "alignment",
        "Train/test alignment: plain inference, Monte-Carlo inference, fine-tuning without DropKey",
        "Does aligning training and inference (averaging K DropKey passes, or fine-tuning a few epochs without "
        "DropKey on a short schedule of its own) beat plain inference of a DropKey-trained ViT?",
        ("vit-alignment",),
        _alignment_arms,
        monte_carlo_arms=("dropkey",),
        finetune_arms=("dropkey",),
        method="Each DropKey run (one per seed) is evaluated three ways on the test set: plain inference, the mean of "
        "K DropKey passes' probabilities (K in the scale's list), and plain inference after a fine-tune without "
        "DropKey from its final weights (a fresh AdamW, the scale's fine-tune epochs on a cosine from the fine-tune "
        "lr to 0, no warmup). Every comparison is paired by seed: the same trained model.",
    ),
    Experiment(
        "structured",
        "Structured masks: DropKey vs DropKey-Block vs DropKey-Cross",
        "Do structured (block, cross) DropKey masks at the same expected drop ratio bring any gain?",
        ("vit-structured",),
        _structured_arms,
    ),
    Experiment(
        "collapse",
        "Attention collapse across depth (DeepViT) with Re-attention and DropKey",
        "Do the attention maps of a deep plain ViT's top blocks collapse to near-identical ones, and do "
        "Re-attention and DropKey (alone or together) reduce that cross-layer similarity?",
        ("deepvit-collapse", "deepvit-reattention", "dropkey-collapse", "deepvit-depth-saturation",
         "deepvit-reattention-accuracy"),
        _collapse_arms,
    ),
    Experiment(
        "gradient_mechanism",
        "The gradient mechanism: does DropKey's expected gradient lower the clean attention peaks?",
        "At fixed parameters along training, does one optimizer step along DropKey's expected gradient lower each "
        "block's clean attention peak (and raise its entropy) compared with the gradient without a regulariser, "
        "and unlike post-softmax dropout at the same ratio?",
        ("vit-gradient-mechanism",),
        _probed_arms,
        run=_run_gradient_mechanism,
        method="A plain and a DropKey ViT (the scale's first seed) are trained, keeping checkpoints at 0, 10, 50 and "
        "100 % of training. At each, on the run's own training images, the first-order change of every block's clean "
        "attention peak and entropy along one step of the training-set gradient is computed without a regulariser "
        "(exactly) and under DropKey and post-softmax dropout at each probed ratio (one value per mask pass, fresh "
        "masks each: the replicates). Each cell is a paired difference per pass, decided by a 95% t interval "
        "against the smallest effect registered for it (docs/experiments.md)",
    ),
)
EXPERIMENT_NAMES = tuple(e.name for e in EXPERIMENTS)


def experiment(name: str) -> Experiment:
    """The named experiment (ValueError naming the allowed names otherwise)."""
    for candidate in EXPERIMENTS:
        if candidate.name == name:
            return candidate
    raise ValueError(f"experiment must be one of {EXPERIMENT_NAMES}, got {name!r}")


def arm_record(arm: Arm) -> dict[str, object]:
    """An arm as JSON-ready data."""
    record = dataclasses.asdict(arm)
    record["model_overrides"] = {k: v for k, v in arm.model_overrides}
    return record
