"""The ``dropkey-lab`` command line and the dataset loaders under hostile input (issue 15, items 10 and 12).

Every user error is one line on stderr and a non-zero exit status, never a traceback (unless ``--log-level
DEBUG``); every corrupt dataset file is a DataError naming it. The fuzz tests run a fixed number of examples each
(explicit ``max_examples``: 150 + 100 + 100 + 40 = 390 under the derandomised "ci" profile); the ``slow`` variants
run 2000 each. Outcomes are recorded with ``event`` (see ``--hypothesis-show-statistics``). The CLI runs in-process
(``main(argv)``) and only on tiny or fast-failing argument lists. Then a fault-injection test: a byte flipped in a
checkpoint and in each file of a study cache folder.
"""

from __future__ import annotations

import gzip
import pickle
import random
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dropkey import storage
from dropkey.lab import data
from dropkey.lab.train import CHECKPOINT
from reports.cli import main
from reports.studies import run_study
from simulations.coefficients import CoefficientsConfig

FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TINY_TRAIN = ["--epochs", "2", "--train-subset", "64", "--batch-size", "32", "--diagnostics-every", "0",
              "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread_and_own_digest_cache(tmp_path_factory, monkeypatch):
    """One intra-op thread (a shared 2-core machine); the data digest cache and $DROPKEY_DATA in temporary folders."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path_factory.mktemp("digest-cache")))
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path_factory.mktemp("no-data")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)`` in-process: its exit status (argparse's SystemExit included) and its stderr."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("dropkey-lab") and ": error: " in lines[0], lines[0]
    return lines[0]


# --- item 10: one line and a non-zero exit status for every user error ------------------------------------------


def test_an_unknown_log_level_is_a_one_line_usage_error(capsys):
    """issue 15, item 10: `--log-level LOUD` was a ValueError traceback from logging.basicConfig."""
    line = assert_one_line_error(*run_cli(["--log-level", "LOUD", "theory"], capsys))
    assert "--log-level" in line and "LOUD" in line


@pytest.mark.parametrize("seed", ["-1", str(2**64), "x"])
def test_a_bad_theory_seed_is_a_one_line_usage_error(capsys, seed):
    """issue 15, item 10: `theory --seed -1` was a traceback from inside the derivations."""
    line = assert_one_line_error(*run_cli(["theory", "--seed", seed], capsys))
    assert "--seed" in line and seed in line


def test_train_on_cuda_without_cuda_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    """issue 15, item 10: `train --device cuda` on a CPU-only torch was an AssertionError traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["train", *TINY_TRAIN[:-2], "--device", "cuda", "--out", str(tmp_path / "run")]
    line = assert_one_line_error(*run_cli(argv, capsys))
    assert "device" in line and "cuda" in line


@pytest.mark.parametrize("command", ["train", "report"])
def test_an_unwritable_out_is_a_one_line_error_naming_it(capsys, tmp_path, command):
    """issue 15, item 10: `--out` where no folder can be made (under a regular file: root ignores permissions) was a
    traceback for `train` and `report` (the report's only after every study had run)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    extra = TINY_TRAIN if command == "train" else ["--skip-experiments", "--cache", str(tmp_path / "cache")]
    line = assert_one_line_error(*run_cli([command, *extra, "--out", str(out)], capsys))
    assert str(blocker) in line


def test_debug_log_level_shows_the_traceback(tmp_path):
    """issue 15, item 10: the one-line error hides the traceback, unless --log-level DEBUG asks for it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        main(["--log-level", "DEBUG", "train", *TINY_TRAIN, "--out", str(blocker / "out")])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny two-epoch run trained through the CLI: its folder, to copy and damage."""
    out = tmp_path_factory.mktemp("cli-run") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(["train", *TINY_TRAIN, "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "one flipped byte"])
def test_resume_from_a_damaged_checkpoint_is_a_one_line_error_naming_it(capsys, tmp_path, finished_run, damage):
    """issue 15, item 10 (and 1): a truncated, empty or garbage checkpoint on `--resume` was a traceback (or ran)."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    path = out / CHECKPOINT
    raw = bytearray(path.read_bytes())
    if damage == "one flipped byte":
        raw[len(raw) * 2 // 3] ^= 0x01
    path.write_bytes({"truncated": bytes(raw[: len(raw) // 2]), "empty": b"",
                      "garbage": random.Random(0).randbytes(len(raw))}.get(damage, bytes(raw)))
    before = path.read_bytes()
    line = assert_one_line_error(*run_cli(["train", *TINY_TRAIN, "--out", str(out), "--resume"], capsys))
    assert str(path) in line
    assert path.read_bytes() == before


# --- CLI argument fuzz ------------------------------------------------------------------------------------------


LOG_LEVELS = st.sampled_from(["WARNING", "warning", "ERROR", "critical", "LOUD", "", "debugg", "-1"])
NUMBERS = st.sampled_from(["0", "-1", "1", "2", "x", "", "nan", "inf", "-inf", "1e400", "0.5", str(2**64), "1,2"])
RATIOS = st.sampled_from(["0.1", "0", "0.5,0.2", "1", "1.5", "-0.1", "nan", "inf", "x", "", "0.1,", "1e400"])
TRAIN_OPTIONS = (
    ("--lr", NUMBERS), ("--drop-ratio", RATIOS), ("--warmup-epochs", NUMBERS), ("--label-smoothing", NUMBERS),
    ("--grad-clip", NUMBERS), ("--seed", NUMBERS), ("--diagnostics-every", NUMBERS),
    ("--device", st.sampled_from(["cpu", "cuda", "cuda:7", "tpu", "cuda:x", "meta"])),
    ("--variant", st.sampled_from(["dropkey", "none", "dropout", "nope", ""])),
    ("--model", st.sampled_from(["vit_tiny_8", "vit_nope", ""])),
    ("--precision", st.sampled_from(["fp32", "auto", "fp64"])),
)


def _train_arguments(draw) -> list[str]:
    """A train command that is tiny when valid (digits, at most 64 images, one epoch, no diagnostics)."""
    args = ["--dataset", draw(st.sampled_from(["digits", "digits", "cifar10", "fashion_mnist", "nope", ""]))]
    args += ["--epochs", draw(st.sampled_from(["1", "1", "0", "-1", "x", "1.5"]))]
    args += ["--train-subset", draw(st.sampled_from(["32", "64", "0", "-5", "7", "x"]))]
    args += ["--batch-size", draw(st.sampled_from(["16", "32", "0", "-1", "1000", "x"]))]
    for flag, values in TRAIN_OPTIONS:
        if draw(st.booleans()):
            args += [flag, draw(values)]
    args += ["--no-progress", "--diagnostics-every", "0"] if draw(st.integers(0, 3)) else []
    return args + (["--resume"] if draw(st.booleans()) else [])


@st.composite
def cli_argv(draw, place: Path) -> list[str]:
    """An argument list for a tiny or a fast-failing command; ``place`` holds a file (``blocker``) and free room."""
    prefix = ["--log-level", draw(LOG_LEVELS)] if draw(st.booleans()) else []
    blocker = place / "blocker"
    out = draw(st.sampled_from([place / "out", blocker / "out", blocker, place / "deep" / "out"]))
    command = draw(st.sampled_from(["train", "train", "train", "theory", "report", "results-table", "experiment",
                                    "simulate", "nope", ""]))
    if command == "train":
        args = _train_arguments(draw)
    elif command == "theory":  # never a valid seed: the theory checks take too long to fuzz
        args = ["--seed", draw(st.sampled_from(["-1", "x", "", str(2**64), "1.5", "-0x1"]))]
    elif command == "report":  # never a writable --out: a report takes minutes
        out = blocker / "report"
        args = ["--seed", draw(NUMBERS), "--cache", str(place / "cache"), "--skip-experiments"]
        args += ["--only", draw(st.sampled_from(["nope", "", "coefficients"]))] if draw(st.booleans()) else []
    elif command == "results-table":
        args = ["--results-dir", str(draw(st.sampled_from([place / "none", blocker, place])))]
    elif command == "experiment":  # always a bad name or bad seeds: an experiment trains many runs
        name, seeds = draw(st.sampled_from([("nope", "0"), ("structured", "a,b"), ("all", ","), ("", "0")]))
        args = [name, "--seeds", seeds, "--runs-dir", str(place / "runs"), "--results-dir", str(place / "results")]
    elif command == "simulate":  # never a valid study name
        args = [draw(st.sampled_from(["nope", "", "-1"])), "--seed", draw(NUMBERS)]
    else:
        args = []
    return [*prefix, command, *args] + (["--out", str(out)] if command and command != "experiment" else [])


def _check_cli(drawn, capsys) -> None:
    with tempfile.TemporaryDirectory() as folder:
        place = Path(folder)
        (place / "blocker").write_text("a file where a folder is wanted")
        code, err = run_cli(drawn.draw(cli_argv(place)), capsys)
    if code == 0:
        event("exit 0")
        return
    assert_one_line_error(code, err)
    event(f"exit {code}, one-line error")


@settings(max_examples=150, **FUZZ)
@given(st.data())
def test_fuzz_cli_arguments(capsys, data):
    _check_cli(data, capsys)


@pytest.mark.slow
@settings(max_examples=2000, **FUZZ)
@given(st.data())
def test_fuzz_cli_arguments_slow(capsys, data):
    _check_cli(data, capsys)


# --- loaders on corrupted bytes (item 12) -----------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    return b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


_RNG = np.random.default_rng(0)
IDX_GZ = gzip.compress(_idx(_RNG.integers(0, 256, (6, 28, 28), dtype=np.uint8)), mtime=0)
LABELS_GZ = gzip.compress(_idx((np.arange(6) % 10).astype(np.uint8)), mtime=0)
CIFAR_PICKLE = pickle.dumps({b"batch_label": b"testing batch 1 of 1", b"labels": [i % 10 for i in range(4)],
                             b"data": _RNG.integers(0, 256, (4, 3072), dtype=np.uint8)}, protocol=2)
CIFAR_META = pickle.dumps({b"label_names": [c.encode() for c in data.CIFAR10_CLASSES]}, protocol=2)


@st.composite
def corrupted(draw, original: bytes) -> bytes:
    """``original`` with a few bytes flipped or set, cut short, extended, or spliced with random bytes."""
    raw = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and raw:
            raw[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, 0x0A]))
        elif kind == "truncate":
            del raw[at:]
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif raw:
            del raw[at: at + draw(st.integers(1, 64))]
    return bytes(raw)


def _expect_data(call, path: Path):
    """Run ``call``; its result, or None after checking the error is a one-line DataError naming ``path``."""
    try:
        result = call()
    except data.DataError as error:
        assert str(path) in str(error) and len(str(error).splitlines()) == 1, str(error)
        event("DataError naming the file")
        return None
    event("loaded")
    return result


def _check_idx(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t10k-images-idx3-ubyte.gz"
        path.write_bytes(raw)
        array = _expect_data(lambda: data.read_idx(path), path)
    assert array is None or (isinstance(array, np.ndarray) and array.ndim >= 1)


def _check_cifar_pickle(raw: bytes, name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(raw)
        if name == "batches.meta":
            names = _expect_data(lambda: data.read_cifar_pickle_meta(path), path)
            assert names is None or all(isinstance(n, str) for n in names)
            return
        loaded = _expect_data(lambda: data.read_cifar_pickle(path), path)
    if loaded is not None:
        images, labels = loaded
        assert images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32) and labels.shape == (len(images),)
        assert labels.size == 0 or 0 <= labels.min() <= labels.max() <= 9


def _check_loaders(fashion: tuple[bytes, bytes], cifar: bytes) -> None:
    """The public loaders with verify=False on a folder of corrupted files: loaded, or a DataError naming one."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "fashion-mnist").mkdir()
        names = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
        for name, raw in zip(names, fashion, strict=True):
            (root / "fashion-mnist" / name).write_bytes(raw)
        (root / "cifar-10-batches-py").mkdir()
        (root / "cifar-10-batches-py" / "test_batch").write_bytes(cifar)
        for call, folder_name in ((lambda: data.load_fashion_mnist("test", root, verify=False), "fashion-mnist"),
                                  (lambda: data.load_cifar10("test", root, layout="pickle", verify=False),
                                   "cifar-10-batches-py")):
            loaded = _expect_data(call, root / folder_name)
            assert loaded is None or (len(loaded) > 0 and int(loaded.labels.max()) <= 9)


PICKLE_CASES = st.sampled_from(["test_batch", "batches.meta"]).flatmap(
    lambda name: st.tuples(corrupted(CIFAR_PICKLE if name == "test_batch" else CIFAR_META), st.just(name)))


@settings(max_examples=100, **FUZZ)
@given(corrupted(IDX_GZ))
def test_fuzz_read_idx_on_corrupted_gzip(raw):
    _check_idx(raw)


@settings(max_examples=100, **FUZZ)
@given(PICKLE_CASES)
def test_fuzz_read_cifar_pickle_on_corrupted_bytes(case):
    _check_cifar_pickle(*case)


@settings(max_examples=40, **FUZZ)
@given(st.tuples(corrupted(IDX_GZ), corrupted(LABELS_GZ)), corrupted(CIFAR_PICKLE))
def test_fuzz_loaders_without_verification_on_corrupted_files(fashion, cifar):
    _check_loaders(fashion, cifar)


@pytest.mark.slow
@settings(max_examples=2000, **FUZZ)
@given(corrupted(IDX_GZ))
def test_fuzz_read_idx_on_corrupted_gzip_slow(raw):
    _check_idx(raw)


@pytest.mark.slow
@settings(max_examples=2000, **FUZZ)
@given(PICKLE_CASES)
def test_fuzz_read_cifar_pickle_on_corrupted_bytes_slow(case):
    _check_cifar_pickle(*case)


@pytest.mark.slow
@settings(max_examples=2000, **FUZZ)
@given(st.tuples(corrupted(IDX_GZ), corrupted(LABELS_GZ)), corrupted(CIFAR_PICKLE))
def test_fuzz_loaders_without_verification_on_corrupted_files_slow(fashion, cifar):
    _check_loaders(fashion, cifar)


# --- fault injection ------------------------------------------------------------------------------------------


COEFFICIENTS = CoefficientsConfig(ns=(4, 8), drop_ratios=(0.1, 0.5), num_samples=200, num_repeats=3)


def test_fault_injection_a_flipped_bit_anywhere_is_refused_or_recomputed(capsys, tmp_path, finished_run):
    """issue 15: one bit flipped (seeded position) in the checkpoint -> `--resume` refuses it in one line, writing
    nothing; one bit flipped in each file of a cached study folder in turn -> recomputed, the same frame."""
    flips = random.Random(15)
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    path = out / CHECKPOINT
    raw = bytearray(path.read_bytes())
    raw[flips.randrange(len(raw))] ^= 1 << flips.randrange(8)
    path.write_bytes(bytes(raw))
    code, err = run_cli(["train", *TINY_TRAIN, "--out", str(out), "--resume"], capsys)
    assert str(path) in assert_one_line_error(code, err) and path.read_bytes() == bytes(raw)

    root = tmp_path / "cache"
    fresh = run_study("coefficients", COEFFICIENTS, root)
    for name in sorted(storage.read_marker(fresh.folder)["files"]) + [storage.MARKER]:
        target = fresh.folder / name
        raw = bytearray(target.read_bytes())
        raw[flips.randrange(len(raw))] ^= 1 << flips.randrange(8)
        target.write_bytes(bytes(raw))
        again = run_study("coefficients", COEFFICIENTS, root)
        assert not again.from_cache, f"a flipped bit in {name} was not noticed"
        pd.testing.assert_frame_equal(again.frame, fresh.frame, check_exact=True)
