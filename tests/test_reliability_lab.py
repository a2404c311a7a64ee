"""Nothing silently wrong in the lab (issue 15): checkpoints and caches are integrity-checked, every corrupt
dataset file is a DataError naming it, and a run folder is not tied to where it lies.

The Why items of issue 15 each have a test here (named in its docstring); the loaders' fuzz tests and the
fault-injection test are at the end.
"""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dropkey import storage
from dropkey.lab import data
from dropkey.lab.train import CHECKPOINT, TrainConfig, train
from reports.studies import run_study
from simulations.coefficients import CoefficientsConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread_and_own_digest_cache(tmp_path_factory, monkeypatch):
    """One intra-op thread (a shared 2-core machine); the data digest cache in a temporary folder."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path_factory.mktemp("digest-cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(out_dir, **overrides) -> TrainConfig:
    fields = dict(dataset="digits", epochs=2, batch_size=32, train_subset=64, diagnostics_every=0, lr=3e-3,
                  warmup_epochs=0.5, seed=0, out_dir=str(out_dir), progress=False)
    return TrainConfig(**(fields | overrides))


def interrupted_run(out_dir, **overrides) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """A two-epoch run stopped after its first epoch: its config and the weights its epoch-1 checkpoint holds."""
    config = tiny(out_dir, **overrides)
    return config, train(config, stop_after_epoch=1).model.state_dict()


def flip_bytes(path: Path, offset: int, count: int = 4) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def weight_offset(path: Path, weights: dict[str, torch.Tensor]) -> int:
    """An offset inside the stored bytes of a weight tensor (the first block's MLP) in the checkpoint file."""
    needle = weights["blocks.0.mlp.fc1.weight"].numpy().tobytes()
    offset = path.read_bytes().find(needle)
    assert offset > 0
    return offset + len(needle) // 2


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1 and "Traceback" not in text


# --- item 1: checkpoints carry a digest, verified on resume ---------------------------------------------------


def test_a_checkpoint_with_four_flipped_weight_bytes_is_refused_not_trained_on(tmp_path):
    """issue 15, item 1: 4 bytes flipped inside a weight tensor -> a one-line error naming the file; no training."""
    out = tmp_path / "run"
    config, weights = interrupted_run(out)
    path = out / CHECKPOINT
    flip_bytes(path, weight_offset(path, weights))
    corrupted = path.read_bytes()
    with pytest.raises(ValueError, match=r"checkpoint\.pt") as error:
        train(config, resume=True)
    assert one_line(str(error.value)) and str(path) in str(error.value)
    assert path.read_bytes() == corrupted  # nothing trained, nothing written over it
    assert len(pd.read_csv(out / "metrics.csv")) == 1


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_truncated_empty_or_garbage_checkpoint_is_a_one_line_error_naming_it(tmp_path, damage):
    """issue 15, item 1 (and item 10's library side): truncated, empty or garbage -> ValueError naming the file."""
    out = tmp_path / "run"
    config, _ = interrupted_run(out)
    path = out / CHECKPOINT
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"",
                      "garbage": random.Random(0).randbytes(len(raw))}[damage])
    with pytest.raises(ValueError, match=r"checkpoint\.pt") as error:
        train(config, resume=True)
    assert one_line(str(error.value)) and str(path) in str(error.value)


# --- item 11: a run folder may move ----------------------------------------------------------------------------


def test_resume_accepts_the_same_folder_spelled_differently(tmp_path, monkeypatch):
    """issue 15, item 11: `--out $PWD/run` and `--out run` are the same run folder."""
    monkeypatch.chdir(tmp_path)
    interrupted_run("run")
    resumed = train(tiny(tmp_path / "run"), resume=True)
    assert resumed.metrics["epoch"].tolist() == [1, 2]


def test_a_moved_run_folder_resumes_bit_exactly(tmp_path):
    """issue 15, item 11: out_dir is not part of the run's identity: a moved (or copied) folder resumes."""
    full = train(tiny(tmp_path / "full"))
    interrupted_run(tmp_path / "before")
    shutil.move(tmp_path / "before", tmp_path / "moved")
    shutil.copytree(tmp_path / "moved", tmp_path / "copied")
    for name in ("moved", "copied"):
        resumed = train(tiny(tmp_path / name), resume=True)
        exact = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc"]
        pd.testing.assert_frame_equal(resumed.metrics[exact], full.metrics[exact], check_exact=True)
        full_state, state = full.model.state_dict(), resumed.model.state_dict()
        assert all(torch.equal(full_state[k], state[k]) for k in full_state)


def test_resume_still_refuses_a_different_run(tmp_path):
    """issue 15, item 11: what a run computes is still its identity (only where it lies may change)."""
    interrupted_run(tmp_path / "run")
    with pytest.raises(ValueError, match=r"config differs in \['lr'\]"):
        train(tiny(tmp_path / "run", lr=1e-3), resume=True)


# --- item 2: the study cache verifies the digests of its completion marker -----------------------------------


COEFFICIENTS = CoefficientsConfig(ns=(4, 8), drop_ratios=(0.1, 0.5), num_samples=200, num_repeats=3)


@pytest.fixture(scope="module")
def cached_study(tmp_path_factory):
    """One cached study (coefficients, tiny): its cache root, folder and frame, to copy and corrupt."""
    root = tmp_path_factory.mktemp("study-cache")
    result = run_study("coefficients", COEFFICIENTS, root)
    return {"root": root, "folder": result.folder, "frame": result.frame}


def _add_to_one_c_exact_cell(folder: Path) -> None:
    frame = pd.read_csv(folder / "results.csv")
    frame.loc[3, "c_exact"] += 1e-3
    storage.write_csv_atomic(folder / "results.csv", frame)


def _cut_in_half(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _make_unreadable(path: Path) -> None:
    path.unlink()
    path.mkdir()  # reading it raises IsADirectoryError (chmod 000 does not stop root)


CACHE_DAMAGE = {
    "one c_exact cell + 1e-3": _add_to_one_c_exact_cell,
    "results.csv cut in half": lambda folder: _cut_in_half(folder / "results.csv"),
    "garbage summary.json": lambda folder: (folder / "summary.json").write_bytes(b"\x89garbage\xff" * 20),
    "empty config.json": lambda folder: (folder / "config.json").write_bytes(b""),
    "missing results.csv": lambda folder: (folder / "results.csv").unlink(),
    "unreadable results.csv": lambda folder: _make_unreadable(folder / "results.csv"),
    "garbage marker": lambda folder: (folder / storage.MARKER).write_bytes(b"{not json"),
    "marker listing nothing": lambda folder: (folder / storage.MARKER).write_text('{"format": 1, "files": {}}'),
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_a_damaged_study_cache_is_recomputed_never_rendered(cached_study, tmp_path, caplog, damage):
    """issue 15, item 2: a cached folder whose files do not match its marker's digests is recomputed (logged)."""
    root = tmp_path / "cache"
    shutil.copytree(cached_study["root"], root)
    folder = root / cached_study["folder"].relative_to(cached_study["root"])
    CACHE_DAMAGE[damage](folder)
    with caplog.at_level(logging.WARNING, logger="reports.studies"):
        result = run_study("coefficients", COEFFICIENTS, root)
    assert not result.from_cache
    pd.testing.assert_frame_equal(result.frame, cached_study["frame"], check_exact=True)
    assert any("recomput" in record.getMessage() and str(folder) in record.getMessage() for record in caplog.records)
    assert run_study("coefficients", COEFFICIENTS, root).from_cache  # the folder is whole again


def test_an_intact_study_cache_is_read_not_recomputed(cached_study, monkeypatch):
    """issue 15, item 2 (the other side): a folder that matches its marker is read back, nothing recomputed."""
    from simulations.registry import Study

    monkeypatch.setattr(Study, "compute", lambda *args, **kwargs: pytest.fail("recomputed an intact cache"))
    result = run_study("coefficients", COEFFICIENTS, cached_study["root"])
    assert result.from_cache
    pd.testing.assert_frame_equal(result.frame, cached_study["frame"], check_exact=True)


def test_a_damaged_experiment_result_is_an_error_never_evidence(tmp_path):
    """issue 15, item 2: a committed result folder that does not match its marker is refused (the report
    reads it as evidence, it cannot recompute it): a ValueError naming the file."""
    from reports.evidence import experiment_evidence

    folder = tmp_path / "medium" / "accuracy"
    shutil.copytree(ROOT / "results" / "medium" / "accuracy", folder)
    experiment_evidence(folder, "accuracy", "medium")  # intact: read
    frame = pd.read_csv(folder / "per_seed.csv", dtype={"group": str}, keep_default_na=False)
    value = pd.to_numeric(frame["value"], errors="coerce")
    frame.loc[value.first_valid_index(), "value"] = value[value.first_valid_index()] + 1e-3
    frame.to_csv(folder / "per_seed.csv", index=False)
    with pytest.raises(ValueError, match=r"per_seed\.csv"):
        experiment_evidence(folder, "accuracy", "medium")


# --- item 7: a CIFAR-10 file one record short -----------------------------------------------------------------


RECORD = 3073  # one CIFAR-10 record: a label byte and 3 x 32 x 32 pixels


def _cifar_bin_folder(root: Path, records: int) -> Path:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    table = np.random.default_rng(0).integers(0, 256, (records, RECORD), dtype=np.uint8)
    table[:, 0] %= 10
    table.tofile(folder / "test_batch.bin")
    return folder


def _cifar_pickle_folder(root: Path, records: int) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (records, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [i % 10 for i in range(records)], b"data": images}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    return folder


@pytest.mark.parametrize("layout", ["bin", "pickle"])
def test_a_cifar_file_one_record_short_is_a_data_error_naming_it(tmp_path, layout):
    """issue 15, item 7: with verify=False a test batch of 9,999 records is a DataError naming the file."""
    make = _cifar_bin_folder if layout == "bin" else _cifar_pickle_folder
    full = make(tmp_path / "full", 10000)
    assert len(data.load_cifar10("test", full.parent, layout=layout, verify=False)) == 10000
    short = make(tmp_path / "short", 9999)
    name = "test_batch.bin" if layout == "bin" else "test_batch"
    with pytest.raises(data.DataError, match=rf"{short / name}.*9999.*10000"):
        data.load_cifar10("test", short.parent, layout=layout, verify=False)


# --- item 12: every malformed file is a DataError naming it ---------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    return b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _fashion_folder(root: Path, n: int = 6, gz: bool = True, seed: int = 0) -> Path:
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix in ("train", "t10k"):
        for kind, array in (("images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                            ("labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))):
            payload, name = _idx(array), f"{prefix}-{kind}"
            if gz:
                payload, name = gzip.compress(payload, mtime=0), name + ".gz"
            (folder / name).write_bytes(payload)
    return folder


def _zlib_error_gz(tmp_path: Path) -> Path:
    """A gzipped IDX file whose deflate stream is corrupt (gzip raises zlib.error, not OSError)."""
    folder = _fashion_folder(tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.compress(_idx(np.zeros((6, 28, 28), np.uint8)), compresslevel=0, mtime=0))
    raw[11] ^= 0x01  # the stored block's length: "invalid stored block lengths"
    path.write_bytes(bytes(raw))
    return path


def _pickle_file(tmp_path: Path, payload: bytes, name: str = "test_batch") -> Path:
    """``payload`` as ``name`` in a CIFAR-10 python folder (a whole test batch when the damaged file is the meta)."""
    folder = _cifar_pickle_folder(tmp_path, data.CIFAR10_BATCH_RECORDS if name == "batches.meta" else 4)
    (folder / name).write_bytes(payload)
    return folder / name


MALFORMED = {
    # (damage, the file that is named, the loader call)
    "zlib.error": (_zlib_error_gz, lambda root: data.load_fashion_mnist("test", root, verify=False)),
    "UnpicklingError in batches.meta": (
        lambda root: _pickle_file(root, b"\x80\x02}q\x00X\x01\x00\x00\x00ab.", "batches.meta"),
        lambda root: data.load_cifar10("test", root, layout="pickle", verify=False)),
    "EOFError in batches.meta": (
        lambda root: _pickle_file(root, b"", "batches.meta"),
        lambda root: data.load_cifar10("test", root, layout="pickle", verify=False)),
    "AttributeError": (  # APPENDS on a dict
        lambda root: _pickle_file(root, b"\x80\x02}q\x00(K\x01e."),
        lambda root: data.load_cifar10("test", root, layout="pickle", verify=False)),
    "MemoryError": (  # BINBYTES8 claiming 2**40 bytes
        lambda root: _pickle_file(root, b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"x."),
        lambda root: data.load_cifar10("test", root, layout="pickle", verify=False)),
    "OverflowError": (  # BINBYTES8 claiming 2**63 - 1 bytes
        lambda root: _pickle_file(root, b"\x80\x04\x8e" + struct.pack("<Q", 2**63 - 1) + b"x."),
        lambda root: data.load_cifar10("test", root, layout="pickle", verify=False)),
    "LookupError": (  # the admitted _codecs.encode called with an unknown encoding
        lambda root: _pickle_file(root, b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00xX\x06\x00\x00\x00"
                                        b"ladin1\x86R."),
        lambda root: data.load_cifar10("test", root, layout="pickle", verify=False)),
    "UnicodeDecodeError in batches.meta.txt": (
        lambda root: _write(_cifar_bin_folder(root, 10000) / "batches.meta.txt", b"airplane\n\xff\xfe\n"),
        lambda root: data.load_cifar10("test", root, layout="bin", verify=False)),
    "UnicodeDecodeError in SHA256SUMS": (
        lambda root: _write(_fashion_folder(root) / "SHA256SUMS", b"\xff\xfe  t10k-images-idx3-ubyte.gz\n"),
        lambda root: data.load_fashion_mnist("test", root, verify=True)),
}


def _write(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_dataset_file_is_a_data_error_naming_it(tmp_path, case):
    """issue 15, item 12: zlib.error, UnpicklingError, AttributeError, MemoryError, UnicodeDecodeError (...) from a
    malformed file are a DataError naming the file, never another exception."""
    damage, load = MALFORMED[case]
    path = damage(tmp_path)
    with pytest.raises(data.DataError) as error:
        load(tmp_path)
    assert str(path) in str(error.value) and one_line(str(error.value))


# --- item 2 for experiment run folders, item 1 for checkpoints of an earlier version ---------------------------


def _run_folder(folder: Path) -> Path:
    """A complete run folder as the runner leaves it (tiny stand-in files), its marker listing them."""
    from dropkey.lab.experiments import runner

    folder.mkdir(parents=True)
    for name in ("config.json", "metrics.csv", runner.EXPECTED_ATTENTION_FILE, runner.MONTE_CARLO_FILE):
        (folder / name).write_text(f"{name}: {np.random.default_rng(len(name)).random()}\n")
    storage.mark_complete(folder, record={"run_key": folder.name})
    return folder


@pytest.mark.parametrize("damaged", ["metrics.csv", "expected_attention.csv", storage.MARKER])
def test_a_damaged_experiment_run_folder_is_recomputed(tmp_path, caplog, damaged):
    """issue 15, item 2: a run folder whose files do not match its marker is no longer complete (so the runner trains
    or evaluates it again, logged); evaluations that no longer match are removed, intact ones kept."""
    from dropkey.lab.experiments import runner

    folder = _run_folder(tmp_path / "run")
    assert runner.intact(folder)
    kept = (folder / runner.MONTE_CARLO_FILE).read_bytes()
    flip_bytes(folder / damaged, 2, 1)
    with caplog.at_level(logging.WARNING, logger=runner.__name__):
        assert not runner.intact(folder)
    assert not storage.is_complete(folder) and any(str(folder) in r.getMessage() for r in caplog.records)
    assert (folder / runner.EXPECTED_ATTENTION_FILE).exists() == (damaged == "metrics.csv")
    if damaged != storage.MARKER:  # a damaged marker vouches for nothing: every evaluation is redone
        assert (folder / runner.MONTE_CARLO_FILE).read_bytes() == kept


def test_a_run_folder_of_an_earlier_version_is_trusted_then_digested(tmp_path):
    """issue 15, item 1: run folders written before markers listed files stay usable; their digests are recorded."""
    from dropkey.lab.experiments import runner

    folder = _run_folder(tmp_path / "run")
    (folder / storage.MARKER).write_text(json.dumps({"run_key": "run", "final": {}}))  # the earlier layout
    assert runner.intact(folder)
    assert set(storage.verify_result_folder(folder)["files"]) >= {"config.json", "metrics.csv"}


def test_a_bare_checkpoint_of_an_earlier_version_loads_only_as_its_marker_records_it(tmp_path):
    """issue 15, item 1: a checkpoint written by torch.save alone (earlier versions, in finished run folders) has no
    digest of its own: it is read when the run folder's marker vouches for it, refused otherwise or when changed."""
    from dropkey.lab.checkpoints import STATE_KEYS, read_checkpoint

    path = tmp_path / CHECKPOINT
    torch.save({key: torch.arange(3) if key == "model" else 0 for key in STATE_KEYS}, path)
    record = storage.file_record(path)
    assert torch.equal(read_checkpoint(path, record=record)["model"], torch.arange(3))
    with pytest.raises(storage.IntegrityError, match="no content digest"):
        read_checkpoint(path)
    flip_bytes(path, path.stat().st_size // 2, 1)
    with pytest.raises(storage.IntegrityError, match=str(path)):
        read_checkpoint(path, record=record)
