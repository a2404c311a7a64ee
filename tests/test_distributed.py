"""DDP with two CPU processes on the gloo backend (127.0.0.1): ranks agree, only rank 0 writes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from dropkey.lab.train import TrainConfig, launch_local

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def test_two_gloo_processes_agree_and_only_rank_0_writes(tmp_path):
    out, report = tmp_path / "run", tmp_path / "report"
    config = TrainConfig(
        dataset="digits", model="vit_tiny_8", attn_variant="dropkey", drop_ratio=0.1, epochs=2,
        batch_size=32, lr=3e-3, warmup_epochs=0.5, train_subset=256, diagnostics_every=1,
        diagnostics_batch=16, seed=0, out_dir=str(out), progress=False, flip=True, crop_padding=1,
    )
    launch_local(config, 2, backend="gloo", report_dir=report)

    ranks = [torch.load(report / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert ranks[1]["written"] == []
    names = {p.rsplit("/", 1)[-1] for p in ranks[0]["written"]}
    assert names == {"config.json", "provenance.json", "metrics.csv", "diagnostics.csv", "checkpoint.pt"}
    assert {p.name for p in out.iterdir()} == names  # nothing else, no temporary leftovers
    timing = {"images_per_s", "epoch_time_s", "wall_time_s"}  # measured per rank
    for column, values in ranks[0]["metrics"].items():
        if column not in timing:
            assert values == ranks[1]["metrics"][column], column  # all-reduced: identical on both ranks
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["step"].tolist() == [8, 16]  # 256 images / (2 ranks x 16 images per rank) = 8 steps per epoch
    assert (metrics["train_loss"] > 0).all()


@pytest.mark.slow
def test_distributed_resume_is_bit_exact(tmp_path):
    common = dict(
        dataset="digits", model="vit_tiny_8", drop_ratio=0.1, epochs=2, batch_size=32, train_subset=128,
        diagnostics_every=0, seed=1, progress=False, flip=True, crop_padding=1,
    )
    launch_local(TrainConfig(out_dir=str(tmp_path / "a"), **common), 2, report_dir=tmp_path / "ra")
    split = TrainConfig(out_dir=str(tmp_path / "b"), **common)
    launch_local(split, 2, stop_after_epoch=1)
    assert len(pd.read_csv(tmp_path / "b" / "metrics.csv")) == 1
    launch_local(split, 2, resume=True, report_dir=tmp_path / "rb")
    for rank in range(2):
        a = torch.load(tmp_path / "ra" / f"rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "rb" / f"rank{rank}.pt", weights_only=True)
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
        assert a["metrics"]["train_loss"] == b["metrics"]["train_loss"]


@pytest.mark.slow
def test_torchrun_launch_of_the_cli(tmp_path):
    """The documented multi-process launch: torchrun (torch.distributed.run) on 127.0.0.1."""
    import subprocess
    import sys

    from dropkey.lab.distributed import free_port

    out = tmp_path / "torchrun"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "reports.cli", "train", "--dataset", "digits",
        "--epochs", "1", "--train-subset", "128", "--batch-size", "32", "--no-progress", "--out", str(out),
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run folder:") == 1  # only rank 0 reports
    config = __import__("json").loads((out / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2
    assert len(pd.read_csv(out / "metrics.csv")) == 1
