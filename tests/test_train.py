"""Training pipeline on digits: it learns, resumes bit-exactly, stops on NaN, writes tidy CSVs."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from dropkey.lab import train as training
from dropkey.lab.train import (
    TrainConfig,
    Trainer,
    TrainingDiverged,
    lr_factor,
    stream_seeds,
    train,
)
from dropkey.storage import csv_text
from reports.cli import main
from theory.seeding import named_streams


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: steadier timings on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(tmp_path, name: str = "run", **overrides) -> TrainConfig:
    fields = dict(
        dataset="digits", model="vit_tiny_8", attn_variant="dropkey", drop_ratio=0.1, epochs=3,
        batch_size=32, lr=3e-3, warmup_epochs=0.5, train_subset=320, diagnostics_every=1,
        diagnostics_batch=16, seed=0, out_dir=str(tmp_path / name), progress=False,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


# Chance is 0.1 (10 balanced classes). Six epochs at lr 3e-3 reach about 0.7 test accuracy on
# the fixed split (seed 0); 0.5 leaves a wide margin and is still far above chance.
def test_digits_learns_and_writes_tidy_files(tmp_path):
    config = tiny(tmp_path, epochs=6, train_subset=None, diagnostics_every=3)
    result = train(config)
    m = result.metrics
    assert list(m.columns) == list(training.METRIC_COLUMNS) and m["epoch"].tolist() == list(range(1, 7))
    assert m["test_acc"].iloc[-1] > 0.5
    assert m["train_loss"].iloc[-1] < m["train_loss"].iloc[0]
    assert (m["images_per_s"] > 0).all() and m["lr"].iloc[-1] == pytest.approx(0.0, abs=1e-12)
    assert m["step"].iloc[-1] == 6 * (1438 // 32)

    out = tmp_path / "run"
    files = {"config.json", "provenance.json", "metrics.csv", "diagnostics.csv", "checkpoint.pt"}
    assert {p.name for p in out.iterdir()} == files
    assert (out / "metrics.csv").read_text() == csv_text(m)  # the suite's one CSV format
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["epochs"] == 6 and saved["resolved"]["precision"] == "fp32"
    assert json.loads((out / "provenance.json").read_text())["seed"] == 0

    d = pd.read_csv(out / "diagnostics.csv")
    assert list(d.columns) == list(training.DIAGNOSTIC_COLUMNS)
    assert sorted(d["epoch"].unique()) == [0, 3, 6]  # 0: the network at initialisation
    metrics = set(d["metric"])
    assert {"entropy", "peak", "grad_top", "grad_rest", "abs_grad_top", "abs_grad_rest", "similarity"} <= metrics
    one = d[d["epoch"] == 6]
    # 3 layers x 4 heads per attention metric; similarity: 2 adjacent pairs x 4 heads
    similarities = ["similarity", "similarity_softmax", "similarity_centred"]
    assert (one[~one["metric"].isin(similarities)].groupby("metric").size() == 12).all()
    centred = one[one["metric"] == "similarity_centred"]
    assert len(centred) == 8 and centred["value"].between(-1, 1).all()
    initial = d[d["epoch"] == 0]  # the same diagnostics (a backward pass included) before any training step
    assert set(initial["metric"]) == set(one["metric"])
    sim = one[one["metric"] == "similarity"]
    assert len(sim) == 8 and (sim["other_layer"] == sim["layer"] + 1).all()
    # without Re-attention the maps that multiply V are the softmax weights: both similarities agree
    softmax = one[one["metric"] == "similarity_softmax"]
    assert softmax["value"].to_numpy() == pytest.approx(sim["value"].to_numpy(), abs=1e-12)
    entropy = one[one["metric"] == "entropy"]["value"]
    assert ((entropy > 0) & (entropy <= math.log(17) + 1e-9)).all()  # 17 tokens
    assert not d.duplicated(["epoch", "layer", "head", "metric", "other_layer"]).any()


def test_resume_is_bit_exact(tmp_path):
    # dropout-style randomness everywhere: masks, drop path, augmentation, data order
    extra = dict(crop_padding=1, flip=True, model_overrides={"drop_path": 0.1, "proj_drop": 0.1})
    full = train(tiny(tmp_path, "full", **extra))

    def stop_after_first(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt("simulated interruption")

    config = tiny(tmp_path, "interrupted", **extra)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[stop_after_first])
    assert len(pd.read_csv(tmp_path / "interrupted" / "metrics.csv")) == 1
    resumed = train(config, resume=True)

    exact = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc"]
    pd.testing.assert_frame_equal(resumed.metrics[exact], full.metrics[exact], check_exact=True)
    pd.testing.assert_frame_equal(resumed.diagnostics, full.diagnostics, check_exact=True)
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)
    # resuming a finished run does nothing and returns the same metrics
    again = train(config, resume=True)
    pd.testing.assert_frame_equal(again.metrics[exact], full.metrics[exact], check_exact=True)


def _global_states():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _same_states(a, b) -> bool:
    return torch.equal(a[0], b[0]) and a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) \
        and a[1][2:] == b[1][2:] and a[2] == b[2]


def test_training_leaves_the_callers_global_rngs_alone_and_does_not_depend_on_them(tmp_path):
    # dropout and drop path draw from the global torch RNG: the run's own stream, never the caller's
    extra = dict(epochs=2, diagnostics_every=0, model_overrides={"drop_path": 0.1, "proj_drop": 0.1})
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    before = _global_states()
    first = train(tiny(tmp_path, "a", **extra), stop_after_epoch=1)
    assert _same_states(before, _global_states())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)  # other caller states: the same run
    torch.rand(5), np.random.rand(3), random.random()
    second = train(tiny(tmp_path, "b", **extra), stop_after_epoch=1)
    losses = ["train_loss", "test_loss"]
    pd.testing.assert_frame_equal(first.metrics[losses], second.metrics[losses], check_exact=True)

    def interrupt(epoch, row):
        raise KeyboardInterrupt("simulated interruption")

    before = _global_states()
    with pytest.raises(KeyboardInterrupt):  # an interrupted run hands the caller's states back too
        train(tiny(tmp_path, "a", **extra), resume=True, callbacks=[interrupt])
    assert _same_states(before, _global_states())


def test_stream_seeds_are_named_children_of_the_seed_and_ranks_differ_where_they_must():
    children = named_streams(11, training.SEED_STREAMS)
    expected = {name: int(child.generate_state(1, np.uint32)[0]) for name, child in children.items()}
    assert stream_seeds(11) == expected
    rank1 = stream_seeds(11, 1)
    assert {name for name in expected if rank1[name] != expected[name]} == set(training.RANK_STREAMS)
    assert stream_seeds(11, 2) != rank1
    assert all(0 <= value < 2**32 for value in rank1.values())


def test_resume_refuses_a_different_config_and_fresh_runs_refuse_to_overwrite(tmp_path):
    config = tiny(tmp_path, epochs=1, diagnostics_every=0)
    train(config)
    with pytest.raises(FileExistsError, match="resume=True"):
        train(config)
    with pytest.raises(ValueError, match=r"config differs in \['epochs'\]"):
        train(tiny(tmp_path, epochs=3, diagnostics_every=0), resume=True)


def test_nan_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    original = Trainer._forward_loss

    def poisoned(self, images, labels):
        loss, logits = original(self, images, labels)
        return (loss * float("nan") if self.step == 2 else loss), logits

    monkeypatch.setattr(Trainer, "_forward_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss nan at epoch 1, step 3 \(global step 3\)"):
        train(tiny(tmp_path, epochs=1, diagnostics_every=0))


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, total_steps=10, warmup_steps=4, min_ratio=0.1) for s in range(10)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[3:], f[4:], strict=False))
    assert lr_factor(10, total_steps=10, warmup_steps=4, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(0, total_steps=10, warmup_steps=0, min_ratio=0.0) == 1.0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epochs", 0, r"epochs must be an integer in \[1, inf\), got 0"),
        ("batch_size", 2.5, "batch_size must be an integer"),
        ("lr", 0.0, r"lr must be a real number in \(0, inf\), got 0.0"),
        ("lr", float("nan"), "lr must be"),
        ("label_smoothing", 1.0, r"label_smoothing must be a real number in \[0, 1\)"),
        ("warmup_epochs", 5.0, r"warmup_epochs must be a real number in \[0, 3\]"),
        ("grad_clip", -1.0, "grad_clip"),
        ("precision", "fp8", "precision must be one of"),
        ("dataset", "imagenet", "dataset must be one of"),
        ("model", "vit_huge", "model must be one of"),
        ("attn_variant", "dropall", "attn_variant must be one of"),
        ("drop_ratio", 1.0, r"drop_ratio must be a real number in \[0, 1\)"),
        ("drop_ratio", (0.1, -0.1, 0.0), r"drop_ratio\[1\] must be"),
        ("device", "tpu", "device must be one of"),
        ("model_overrides", {"depthh": 2}, "unknown ViTConfig fields"),
        ("diagnostics_every", -1, r"diagnostics_every must be an integer in \[0, inf\)"),
        ("seed", -1, r"seed must be an integer in \[0, 9223372036854775807\]"),
        ("seed", True, "seed must be an integer"),
        ("flip", "yes", "flip must be True or False"),
        ("progress", 1, "progress must be True or False"),
        ("device", None, "device must be one of"),
        ("min_lr", 0.1, r"min_lr must be a real number in \[0, 0.003\]"),
    ],
)
def test_config_validation_names_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny(tmp_path, **{field: value})


def test_the_trainer_takes_a_train_config_only():
    with pytest.raises(TypeError, match="config must be a TrainConfig, got dict"):
        Trainer({"epochs": 1})


def test_model_must_fit_the_dataset(tmp_path):
    with pytest.raises(ValueError, match="vit_tiny_32.*digits"):
        tiny(tmp_path, model="vit_tiny_32")


def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--dataset", "digits", "--model", "vit_tiny_8", "--variant", "dropkey", "--drop-ratio", "0.1",
            "--epochs", "1", "--train-subset", "100", "--batch-size", "20", "--out", str(out), "--no-progress",
            "--diagnostics-every", "0", "--seed", "3"]
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert (out / "metrics.csv").is_file() and json.loads((out / "config.json").read_text())["train"]["seed"] == 3
    assert main(args) == 1  # exists: needs --resume
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert main(["train", "--epochs", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "epochs must be" in capsys.readouterr().err


def test_bf16_autocast_on_cpu_and_fp16_needs_cuda(tmp_path):
    result = train(tiny(tmp_path, epochs=1, train_subset=64, diagnostics_every=1, precision="bf16"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["precision"] == "bf16"
    assert math.isfinite(result.metrics["train_loss"].iloc[0])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16"):
            train(tiny(tmp_path, "fp16", epochs=1, train_subset=64, precision="fp16"))


@pytest.mark.slow
# torch's compile stack raises internal DeprecationWarnings/UserWarnings (not ours) while tracing
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_model_trains(tmp_path):
    result = train(tiny(tmp_path, epochs=1, train_subset=64, diagnostics_every=1, compile=True))
    assert math.isfinite(result.metrics["train_loss"].iloc[0])


def test_final_epochs_without_drop_switch_the_regulariser_off(tmp_path):
    """Fine-tuning alignment: DropKey in epochs 1-2, drop ratio 0 in the final epoch (and back on resume)."""
    seen: list[list[float]] = []
    config = tiny(tmp_path, drop_ratio=(0.3, 0.2, 0.1), final_epochs_without_drop=1, diagnostics_every=0)
    trainer = Trainer(config)
    original = trainer._set_drop_phase

    def spy(epoch):
        original(epoch)
        seen.append([m.drop_ratio for m in training.mask_modules(trainer.model)])

    trainer._set_drop_phase = spy
    trainer.run()
    assert seen == [[0.3, 0.2, 0.1], [0.3, 0.2, 0.1], [0.0, 0.0, 0.0]]
    # the schedule is a function of the epoch: a run resumed in the off phase is the same run
    resumed = train(tiny(tmp_path, "again", drop_ratio=(0.3, 0.2, 0.1), final_epochs_without_drop=1,
                         diagnostics_every=0), stop_after_epoch=2)
    assert len(resumed.metrics) == 2
    final = train(tiny(tmp_path, "again", drop_ratio=(0.3, 0.2, 0.1), final_epochs_without_drop=1,
                       diagnostics_every=0), resume=True)
    pd.testing.assert_frame_equal(
        final.metrics.drop(columns=["images_per_s", "epoch_time_s", "wall_time_s"]),
        pd.read_csv(tmp_path / "run" / "metrics.csv").drop(columns=["images_per_s", "epoch_time_s", "wall_time_s"]),
    )
    with pytest.raises(ValueError, match=r"final_epochs_without_drop must be an integer in \[0, 2\], got 3"):
        tiny(tmp_path, final_epochs_without_drop=3)


def test_eval_every_skips_test_evaluations_but_never_the_last(tmp_path, monkeypatch):
    calls = []
    original = Trainer.evaluate

    def counting(self):
        calls.append(self.step)
        return original(self)

    monkeypatch.setattr(Trainer, "evaluate", counting)
    result = train(tiny(tmp_path, epochs=5, eval_every=2, diagnostics_every=0))
    m = result.metrics
    assert len(calls) == 3  # epochs 2, 4 and the last, 5
    assert m["test_acc"].isna().tolist() == [True, False, True, False, False]
    assert m["test_loss"].isna().tolist() == [True, False, True, False, False]
    with pytest.raises(ValueError, match=r"eval_every must be an integer in \[1, inf\)"):
        tiny(tmp_path, eval_every=0)


@pytest.mark.gpu
def test_cuda_runs_keep_the_callers_cuda_rng_and_resume_bit_exactly(tmp_path):
    extra = dict(device="cuda", precision="fp32", epochs=2, diagnostics_every=0,
                 model_overrides={"drop_path": 0.1, "proj_drop": 0.1})
    torch.cuda.manual_seed_all(99)
    before = torch.cuda.get_rng_state_all()
    full = train(tiny(tmp_path, "full", **extra))
    assert all(torch.equal(a, b) for a, b in zip(before, torch.cuda.get_rng_state_all(), strict=True))
    train(tiny(tmp_path, "split", **extra), stop_after_epoch=1)
    torch.cuda.manual_seed_all(5)  # another caller state between the two calls: the same run
    resumed = train(tiny(tmp_path, "split", **extra), resume=True)
    exact = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc"]
    pd.testing.assert_frame_equal(resumed.metrics[exact], full.metrics[exact], check_exact=True)
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)
