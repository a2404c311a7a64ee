"""Dataset loaders: real files (skipped unless $DROPKEY_DATA holds them), synthetic layouts, checksums, download."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import pickle
import struct
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from dropkey.lab import data, datafiles

# the real datasets, where this machine has them (tests/conftest.py points $DROPKEY_DATA at the project's copy)
SHARED = Path(os.environ.get(data.DATA_ENV) or "no-data-directory").expanduser()


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """Digest cache in a temporary folder; no DROPKEY_DATA from the environment."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path_factory.mktemp("digest-cache")))
    monkeypatch.delenv(data.DATA_ENV, raising=False)


def needs(folder: str):
    return pytest.mark.skipif(
        not (SHARED / folder).is_dir(), reason=f"real data absent: no {folder} in ${data.DATA_ENV} ({SHARED})"
    )


# --- helpers that write small files in the official formats ----------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08}
    header = b"\x00\x00" + bytes([codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_fashion(folder: Path, *, n_train: int = 20, n_test: int = 10, gz: bool = True,
                  seed: int = 0) -> dict[str, str]:
    """Synthetic Fashion-MNIST IDX files; returns {file name: sha256}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (
            ("images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
            ("labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8)),
        ):
            payload = idx_bytes(array)
            name = f"{prefix}-{kind}"
            if gz:
                payload, name = gzip.compress(payload, mtime=0), name + ".gz"
            (folder / name).write_bytes(payload)
            sums[name] = hashlib.sha256(payload).hexdigest()
    return sums


def write_sums(folder: Path, sums: dict[str, str]) -> None:
    (folder / "SHA256SUMS").write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))


def cifar_records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


# --- real data ---------------------------------------------------------------------------------


@needs("fashion-mnist")
def test_fashion_mnist_real_files():
    train = data.load_fashion_mnist("train", SHARED)
    test = data.load_fashion_mnist("test", SHARED)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and int(train.labels.min()) == 0 and int(train.labels.max()) == 9
    assert test.class_counts() == [1000] * 10
    assert train.class_counts() == [6000] * 10


@needs("fashion-mnist")
def test_decompressed_official_idx_files_are_recognised(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(gzip.decompress((SHARED / "fashion-mnist" / f"{name}.gz").read_bytes()))
    test = data.load_fashion_mnist("test", tmp_path)  # verified against the registered raw digests
    assert torch.equal(test.labels, data.load_fashion_mnist("test", SHARED).labels)


@needs("cifar-10-batches-bin")
def test_cifar10_real_files_found_through_the_environment(monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(SHARED))
    test = data.load_cifar10("test")  # found through $DROPKEY_DATA
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.class_counts() == [1000] * 10
    assert test.info.classes == data.CIFAR10_CLASSES
    train = data.load_cifar10("train", SHARED, verify=False)  # checksums: test split above, and the cache test
    assert train.images.shape == (50000, 3, 32, 32)
    assert train.class_counts() == [5000] * 10
    mean, _ = data.channel_stats(train.images)
    # the README's per-channel training means 125.3 / 122.9 / 113.9: the planes are R, G, B in that order
    np.testing.assert_allclose(np.array(mean) * 255, [125.3, 122.9, 113.9], atol=0.1)


@needs("cifar-10-batches-bin")
def test_digest_cache_is_used_on_the_second_verification(monkeypatch):
    path = SHARED / "cifar-10-batches-bin" / "test_batch.bin"
    first = data.file_digest(path)
    calls = []
    monkeypatch.setattr(datafiles, "_hash_file", lambda *a: calls.append(a) or "x")
    assert data.file_digest(path) == first and calls == []


def test_digits_split_is_fixed_stratified_and_scaled():
    train, test = data.load_digits("train"), data.load_digits("test")
    assert train.images.shape == (1438, 1, 8, 8) and test.images.shape == (359, 1, 8, 8)
    assert len(train) == train.info.train_size and len(test) == test.info.test_size
    assert int(train.images.max()) == 255 and train.images.dtype == torch.uint8
    assert all(34 <= c <= 37 for c in test.class_counts())
    again = data.load_digits("test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


# --- locations and errors --------------------------------------------------------------------


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert data.resolve_data_dir() == tmp_path / "home" / ".local" / "share" / "dropkey-lab"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data.resolve_data_dir() == data.default_data_dir() == tmp_path / "xdg" / "dropkey-lab"
    assert data.resolve_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert data.resolve_data_dir() == tmp_path / "env"
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_without_a_data_directory_the_error_names_the_default_folder_and_the_ways_to_set_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    expected = str(tmp_path / "xdg" / "dropkey-lab" / "fashion-mnist")
    with pytest.raises(data.DataError, match=rf"{expected}.*does not exist.*--data-dir, set \$DROPKEY_DATA"):
        data.load_fashion_mnist("test")


def test_missing_file_names_the_expected_path(tmp_path):
    write_fashion(tmp_path / "fashion-mnist")
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match=r"expected .*t10k-labels-idx1-ubyte\.gz.*holds \["):
        data.load_fashion_mnist("test", tmp_path, verify=False)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_cifar10("test", tmp_path / "nowhere")


def test_unknown_file_without_manifest_is_a_checksum_error(tmp_path):
    write_fashion(tmp_path / "fashion-mnist")
    message = r"train-images-idx3-ubyte\.gz.*matches no known digest.*expected one of"
    with pytest.raises(data.ChecksumError, match=message):
        data.load_fashion_mnist("train", tmp_path)


def test_manifest_accepts_a_listed_copy_and_rejects_a_modified_one(tmp_path):
    folder = tmp_path / "fashion-mnist"
    write_sums(folder, write_fashion(folder))
    assert len(data.load_fashion_mnist("train", tmp_path)) == 20
    target = folder / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(target.read_bytes()))
    raw[-1] ^= 0xFF
    target.write_bytes(gzip.compress(bytes(raw), mtime=0))
    message = r"checksum mismatch for .*t10k-images-idx3-ubyte\.gz.*SHA256SUMS lists"
    with pytest.raises(data.ChecksumError, match=message):
        data.load_fashion_mnist("test", tmp_path)


def test_known_digest_accepts_and_changed_file_is_rehashed(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    known = (data.KnownDigest("sha256", hashlib.sha256(b"hello").hexdigest(), "test"),)
    assert data.verify_file(path, known) == "test"
    md5 = (data.KnownDigest("md5", hashlib.md5(b"hello").hexdigest(), "md5 source"),)
    assert data.verify_file(path, md5) == "md5 source"
    path.write_bytes(b"hellO!")  # new size: the cache must not answer
    with pytest.raises(data.ChecksumError):
        data.verify_file(path, known)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_gzipped_or_raw(tmp_path, gz):
    write_fashion(tmp_path / "fashion-mnist", gz=gz)
    train = data.load_fashion_mnist("train", tmp_path, verify=False)
    assert train.images.shape == (20, 1, 28, 28) and train.labels.tolist() == [i % 10 for i in range(20)]


def test_idx_header_is_validated(tmp_path):
    good = idx_bytes(np.zeros((2, 3), dtype=np.uint8))
    (tmp_path / "ok").write_bytes(good)
    assert data.read_idx(tmp_path / "ok").shape == (2, 3)
    for name, payload, message in (
        ("magic", b"\x01\x00" + good[2:], "not an IDX file"),
        ("short", good[:-1], "header says dims"),
        ("gz", b"\x1f\x8b" + b"junk", "corrupt gzip"),
        ("tiny", b"\x00", "too short"),
    ):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(data.DataError, match=message):
            data.read_idx(tmp_path / name)


# --- CIFAR-10 layouts -------------------------------------------------------------------------


def test_cifar_binary_layout_planes_and_records(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    images, labels = cifar_records(5, seed=1)
    records = np.concatenate([labels[:, None], images.reshape(5, -1)], axis=1)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records.tofile(folder / name)
    (folder / "batches.meta.txt").write_text("\n".join(data.CIFAR10_CLASSES) + "\n")
    names = [p.name for p in folder.iterdir()]  # 5-record batches: a manifest vouches for them (verify=False
    write_sums(folder, {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names})  # wants 10000)
    test = data.load_cifar10("test", tmp_path)
    assert torch.equal(test.images, torch.from_numpy(images)) and test.labels.tolist() == labels.tolist()
    raw = (folder / "test_batch.bin").read_bytes()
    # record 0: label byte, then the red plane row-major: pixel (row 0, col 1) of red is byte 2
    assert raw[0] == labels[0] and raw[2] == images[0, 0, 0, 1] and raw[1 + 1024] == images[0, 1, 0, 0]
    assert len(data.load_cifar10("train", tmp_path)) == 25
    (folder / "test_batch.bin").write_bytes(raw[:-7])
    with pytest.raises(data.DataError, match="not a whole number of 3073-byte"):
        data.load_cifar10("test", tmp_path, verify=False)


def test_cifar_pickle_layout_synthetic(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    sums = {}
    for name, seed in [(f"data_batch_{i}", i) for i in range(1, 6)] + [("test_batch", 9)]:
        images, labels = cifar_records(4, seed)
        batch = {b"batch_label": b"x", b"labels": labels.tolist(), b"data": images.reshape(4, -1)}
        payload = pickle.dumps(batch, protocol=2)
        (folder / name).write_bytes(payload)
        sums[name] = hashlib.sha256(payload).hexdigest()
    meta = pickle.dumps({b"label_names": [c.encode() for c in data.CIFAR10_CLASSES]}, protocol=2)
    (folder / "batches.meta").write_bytes(meta)
    sums["batches.meta"] = hashlib.sha256(meta).hexdigest()
    write_sums(folder, sums)  # verified (by the manifest) before anything is unpickled
    test = data.load_cifar10("test", tmp_path)  # "auto": no binary folder, so the python layout
    assert test.info.layout == "cifar-pickle"
    images, labels = cifar_records(4, 9)
    assert torch.equal(test.images, torch.from_numpy(images)) and test.labels.tolist() == labels.tolist()
    assert len(data.load_cifar10("train", tmp_path, layout="pickle")) == 20


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(data.DataError, match="refusing to load posix.getcwd|refusing to load"):
        data.read_cifar_pickle(path)


# --- subsets ---------------------------------------------------------------------------------


def test_balanced_subset_is_seeded_and_balanced():
    labels = torch.arange(1000) % 10
    a = data.balanced_subset_indices(labels, 105, seed=3)
    assert torch.equal(a, data.balanced_subset_indices(labels, 105, seed=3))
    assert not torch.equal(a, data.balanced_subset_indices(labels, 105, seed=4))
    counts = torch.bincount(labels[a], minlength=10)
    assert counts.sum() == 105 and counts.min() == 10 and counts.max() == 11
    assert len(set(a.tolist())) == 105
    with pytest.raises(ValueError, match="size must be"):
        data.balanced_subset_indices(labels, 0, seed=0)
    with pytest.raises(ValueError, match="class 0 has 1 images"):
        data.balanced_subset_indices(torch.tensor([0, 1, 1, 1]), 4, seed=0)


# --- download from a loopback server ------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_verifies_and_writes_atomically(served, tmp_path):
    root, url = served
    sums = write_fashion(root)
    target = tmp_path / "data"
    test = data.load_fashion_mnist("test", target, download=True, base_url=url, expected=sums)
    assert len(test) == 10
    name = "t10k-images-idx3-ubyte.gz"
    assert (target / "fashion-mnist" / name).read_bytes() == (root / name).read_bytes()
    assert not list((target / "fashion-mnist").glob(".*.tmp"))


def test_download_with_wrong_checksum_writes_nothing(served, tmp_path):
    root, url = served
    sums = write_fashion(root)
    sums["t10k-images-idx3-ubyte.gz"] = "0" * 64
    target = tmp_path / "data"
    with pytest.raises(data.ChecksumError, match="checksum mismatch for download .*t10k-images"):
        data.load_fashion_mnist("test", target, download=True, base_url=url, expected=sums)
    assert not (target / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").exists()
    with pytest.raises(ValueError, match="without a digest"):
        data.download_file(f"{url}/x", tmp_path / "x", ())
