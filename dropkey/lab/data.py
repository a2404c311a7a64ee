"""Image datasets for the DropKey experiments: CIFAR-10, Fashion-MNIST and sklearn's digits.

Every loader returns an :class:`ImageData`: ``images`` uint8 (N, C, H, W) in [0, 255]
and ``labels`` int64 (N,), plus the :class:`DatasetInfo` that describes the dataset
(name, shape, classes, the files and their known checksums).

Layouts read (the official ones, so a user's own download works):

- ``cifar10``: the "binary version" folder ``cifar-10-batches-bin/`` (``data_batch_1.bin``
  .. ``data_batch_5.bin``, ``test_batch.bin``, ``batches.meta.txt``; each record is 1 label
  byte then 1024 red, 1024 green, 1024 blue bytes, row-major), or, if that folder is
  absent, the "python version" folder ``cifar-10-batches-py/`` (``data_batch_1`` ..
  ``data_batch_5``, ``test_batch``, ``batches.meta``). The python version is a set of
  **pickles**; unpickling untrusted data can run arbitrary code, so we (1) verify the
  checksums first (unless ``verify=False``) and (2) unpickle with a restricted unpickler
  that only admits the numpy array reconstruction the official files need.
- ``fashion_mnist``: ``fashion-mnist/`` with the four IDX files, gzipped (``*.gz``, as
  released) or not; the IDX header (magic, element type, dimensions) is parsed and checked.
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 16 grey levels, no files
  needed), scaled to [0, 255] as ``round(v * 255 / 16)``, with a fixed class-stratified
  split (seed 0): round(20%) of each class for test (359 images), the rest (1438) for training.

Where the data is: the ``data_dir`` argument (``--data-dir``), else the environment variable
``DROPKEY_DATA``, else the per-user default ``$XDG_DATA_HOME/dropkey-lab`` (without
``XDG_DATA_HOME``: ``~/.local/share/dropkey-lab``); see :func:`resolve_data_dir`. Each dataset
lives in its own sub-folder of it (``cifar-10-batches-bin/``, ``fashion-mnist/``, ...). The
project's own machines keep a shared copy and point ``DROPKEY_DATA`` at it.

Checksums (see :func:`verify_file`). Each file has a list of known digests in
:data:`DATASETS`, each with its source:

- official releases: Fashion-MNIST ``.gz`` MD5s (Zalando's README) and SHA-256s (as recorded
  by other public loaders; not re-checked here, this machine has no internet), the SHA-256s
  of the decompressed IDX files (computed here: the data README states the local copy
  decompresses to the official bytes), and the MD5s of the CIFAR-10 *python* batches (as
  torchvision publishes them);
- the project machines' shared copy (its ``SHA256SUMS``): the CIFAR-10 there is a
  JPEG-rebuilt variant whose bytes differ from the official release, and its
  Fashion-MNIST ``.gz`` files are recompressed (different bytes, same content).
 A file passes if it matches any known digest; otherwise, if a ``SHA256SUMS`` file
next to it lists it, it must match that (a mismatch is corruption), and passes with a log
message saying it is not a registered release. Anything else is a :class:`ChecksumError`
naming the file, the digest found and the digests expected. For the official CIFAR-10
*binary* files no per-file digests are published; verify them by writing a ``SHA256SUMS``
next to them (``sha256sum *.bin > SHA256SUMS``) or pass ``verify=False``.

Hashing 180 MB of CIFAR-10 takes about a second, so digests are cached in a small JSON
file keyed by (absolute path, size, mtime in ns): ``$DROPKEY_CACHE/file-digests.json``,
default ``~/.cache/dropkey-lab`` (``$XDG_CACHE_HOME`` respected). A changed file gets a
new size or mtime and is hashed again (the cache guards against corruption and stale
copies, not against someone who edits a file and restores its mtime; ``hash_cache=False``
always hashes). ``verify=False`` skips the checksums altogether (the restricted unpickler
stays in force).

Download (``download=True``): missing files are fetched from ``base_url`` (default the
official per-file mirror where one exists; configurable, e.g. a local mirror) as
``{base_url}/{file name}``, verified against the known digests (or ``expected`` digests
given by the caller) and written atomically. Nothing is downloaded unless asked.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import pickle
import struct
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dropkey.storage import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

DATA_ENV = "DROPKEY_DATA"
#: the per-user data folder's name under $XDG_DATA_HOME (else ~/.local/share)
DATA_FOLDER = "dropkey-lab"
CACHE_ENV = "DROPKEY_CACHE"
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DataError(RuntimeError):
    """A dataset file is missing or malformed (the message names the file and what was found)."""


class ChecksumError(DataError):
    """A file's digest matches none of the known ones."""


# --- dataset descriptions --------------------------------------------------------------


@dataclass(frozen=True)
class KnownDigest:
    """One accepted digest of a file: algorithm ("sha256" or "md5"), hex value, where it comes from."""

    algorithm: str
    hexdigest: str
    source: str


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset: its name inside the dataset folder, its split and known digests."""

    name: str
    split: str  # "train", "test" or "meta"
    digests: tuple[KnownDigest, ...] = ()


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: shape (C, H, W), classes, sizes, folder and files."""

    name: str
    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    train_size: int
    test_size: int
    folder: str | None  # sub-folder of the data directory (None: bundled, no files)
    files: tuple[DataFile, ...] = ()
    base_url: str | None = None  # default download location (per-file mirror), if any
    layout: str = "bundled"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def file(self, name: str) -> DataFile:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(f"{self.name} has no file {name!r}")


_LOCAL = "the project machines' shared data copy (its SHA256SUMS)"
_LOCAL_CIFAR = "project shared data, JPEG-rebuilt CIFAR-10 (differs from the official bytes)"
_OFFICIAL_CIFAR_PY = "official cifar-10-python.tar.gz member (MD5 as published by torchvision)"
_OFFICIAL_FASHION = "official Zalando release .gz (SHA-256 as recorded by public loaders)"
_OFFICIAL_FASHION_MD5 = "official Zalando release (MD5 published in the Fashion-MNIST README)"


def _sha(value: str, source: str) -> KnownDigest:
    return KnownDigest("sha256", value, source)


def _md5(value: str, source: str) -> KnownDigest:
    return KnownDigest("md5", value, source)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_CIFAR_BIN_LOCAL = {
    "data_batch_1.bin": "1a4530f544dd2512ece44ac5abc98109176d867c7961e377064e78ae0284edea",
    "data_batch_2.bin": "3d2c4849cd01b5e5aa220bc3d318bffec53a5d89313ca29d61cac2fa995cc6f6",
    "data_batch_3.bin": "aa68c8292fcc32c5974123cc8b26ef5e49848f005ce76cc89549bc53f3406f69",
    "data_batch_4.bin": "34dec748ecbd18b12236caec82464411243e5e412855c21b9d4984fb7fe00448",
    "data_batch_5.bin": "302b09aa4dc6b48cfd9a5193f1ae385678a9a6185a62a0a7c2c6a82badf02621",
    "test_batch.bin": "c8fbbcceac0fd27b2e43d95abb07381e2ed685320ffb54e09b49caa9873cbdb3",
    "batches.meta.txt": "2ce042b1e0b48db4bb214408e6414ba18b2731c24af244f2d6c112fddf31af00",
}
_CIFAR_PY_OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
_FASHION_LOCAL = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
_FASHION_OFFICIAL = {
    "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
    "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
    "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
    "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
}
# decompressed: byte-identical to the official release (data README), hashed from the local copy
_FASHION_RAW = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
_FASHION_OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def _split_of(name: str) -> str:
    if "meta" in name:
        return "meta"
    return "test" if name.startswith(("test", "t10k")) else "train"


CIFAR10_BIN = DatasetInfo(
    name="cifar10", shape=(3, 32, 32), classes=CIFAR10_CLASSES, train_size=50000, test_size=10000,
    folder="cifar-10-batches-bin", layout="cifar-bin",
    files=tuple(DataFile(n, _split_of(n), (_sha(d, _LOCAL_CIFAR),)) for n, d in _CIFAR_BIN_LOCAL.items()),
)
CIFAR10_PY = DatasetInfo(
    name="cifar10", shape=(3, 32, 32), classes=CIFAR10_CLASSES, train_size=50000, test_size=10000,
    folder="cifar-10-batches-py", layout="cifar-pickle",
    files=tuple(DataFile(n, _split_of(n), (_md5(d, _OFFICIAL_CIFAR_PY),)) for n, d in _CIFAR_PY_OFFICIAL_MD5.items()),
)
FASHION_MNIST = DatasetInfo(
    name="fashion_mnist", shape=(1, 28, 28), classes=FASHION_CLASSES, train_size=60000, test_size=10000,
    folder="fashion-mnist", layout="idx",
    base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    files=tuple(
        DataFile(n, _split_of(n), (
            _sha(_FASHION_OFFICIAL[n], _OFFICIAL_FASHION),
            _md5(_FASHION_OFFICIAL_MD5[n], _OFFICIAL_FASHION_MD5),
            _sha(_FASHION_LOCAL[n], _LOCAL),
        ))
        for n in _FASHION_LOCAL
    ) + tuple(
        DataFile(n, _split_of(n), (_sha(d, "official release, decompressed"),)) for n, d in _FASHION_RAW.items()
    ),
)
DIGITS = DatasetInfo(
    name="digits", shape=(1, 8, 8), classes=tuple(str(i) for i in range(10)),
    train_size=1438, test_size=359, folder=None, layout="bundled",
)

DATASETS: dict[str, DatasetInfo] = {"cifar10": CIFAR10_BIN, "fashion_mnist": FASHION_MNIST, "digits": DIGITS}
DATASET_NAMES = tuple(DATASETS)


@dataclass(frozen=True, eq=False)
class ImageData:
    """One split: images uint8 (N, C, H, W) in [0, 255], labels int64 (N,)."""

    images: Tensor
    labels: Tensor
    info: DatasetInfo
    split: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 ({self.images.shape[0]},), got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.info.num_classes).tolist()

    def subset(self, indices: Tensor | Sequence[int]) -> ImageData:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return ImageData(self.images[index], self.labels[index], self.info, self.split)


# --- locations ---------------------------------------------------------------------------


def default_data_dir() -> Path:
    """The per-user data folder: ``$XDG_DATA_HOME/dropkey-lab``, else ``~/.local/share/dropkey-lab``."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / DATA_FOLDER


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$DROPKEY_DATA``, else :func:`default_data_dir`."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return default_data_dir()


def cache_dir() -> Path:
    """Where digests are cached: ``$DROPKEY_CACHE``, else ``$XDG_CACHE_HOME/dropkey-lab``, else ``~/.cache/dropkey-lab``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dropkey-lab"


# --- checksums ---------------------------------------------------------------------------


def _hash_file(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256", *, hash_cache: bool = True) -> str:
    """Hex digest of a file; cached by (absolute path, size, mtime_ns) unless ``hash_cache=False``."""
    path = Path(path).resolve()
    if algorithm not in ("sha256", "md5"):
        raise ValueError(f"algorithm must be 'sha256' or 'md5', got {algorithm!r}")
    if not hash_cache:
        return _hash_file(path, algorithm)
    stat = path.stat()
    key = f"{algorithm}:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = cache_dir() / "file-digests.json"
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return str(cache[key])
    value = _hash_file(path, algorithm)
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{algorithm}:{path}:")}
    cache[key] = value
    try:
        write_json_atomic(cache_file, cache)
    except OSError as error:  # a read-only home must not stop training
        log.warning("could not write the digest cache %s: %s", cache_file, error)
    return value


def read_sha256sums(path: Path) -> dict[str, str]:
    """Parse a ``sha256sum`` output file: {file name: hex digest}."""
    sums = {}
    for line in path.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    return sums


def verify_file(
    path: str | os.PathLike[str],
    known: Sequence[KnownDigest] = (),
    *,
    hash_cache: bool = True,
) -> str:
    """Check ``path`` against its known digests, else its folder's SHA256SUMS; return how it passed.

    Raises :class:`ChecksumError` (naming the file, what was found and what was expected).
    """
    path = Path(path)
    found: dict[str, str] = {}

    def digest(algorithm: str) -> str:
        if algorithm not in found:
            found[algorithm] = file_digest(path, algorithm, hash_cache=hash_cache)
        return found[algorithm]

    for entry in sorted(known, key=lambda k: k.algorithm != "sha256"):  # sha256 first
        if digest(entry.algorithm) == entry.hexdigest.lower():
            log.debug("%s: %s matches %s", path, entry.algorithm, entry.source)
            return entry.source
    manifest = path.parent / "SHA256SUMS"
    if manifest.is_file():
        listed = read_sha256sums(manifest).get(path.name)
        if listed is not None:
            if digest("sha256") == listed:
                log.info("%s: not a registered release; accepted by %s", path, manifest)
                return str(manifest)
            raise ChecksumError(
                f"checksum mismatch for {path}: SHA-256 {digest('sha256')} but {manifest} lists {listed} "
                "(the file is corrupt or was modified; delete it and fetch it again)"
            )
    expected = ", ".join(f"{k.algorithm} {k.hexdigest} ({k.source})" for k in known) or "none registered"
    raise ChecksumError(
        f"checksum mismatch for {path}: SHA-256 {digest('sha256')} matches no known digest "
        f"(expected one of: {expected}) and no SHA256SUMS next to it lists it. If this is a "
        "legitimate copy, write a SHA256SUMS next to it (sha256sum FILE >> SHA256SUMS) or pass verify=False."
    )


# --- download ----------------------------------------------------------------------------


def download_file(
    url: str,
    destination: str | os.PathLike[str],
    known: Sequence[KnownDigest],
    *,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url``, check its digest against ``known`` and only then write it atomically."""
    if not known:
        raise ValueError(f"refusing to download {url} without a digest to verify it against")
    log.info("downloading %s -> %s", url, destination)
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (scheme from the caller)
        payload = response.read()
    hashes = {alg: hashlib.new(alg, payload).hexdigest() for alg in {k.algorithm for k in known}}
    if not any(hashes[k.algorithm] == k.hexdigest.lower() for k in known):
        expected = ", ".join(f"{k.algorithm} {k.hexdigest}" for k in known)
        raise ChecksumError(
            f"checksum mismatch for download {url}: SHA-256 {hashlib.sha256(payload).hexdigest()}, "
            f"expected one of: {expected}; nothing was written to {destination}"
        )
    return write_bytes_atomic(destination, payload)


def _ensure_files(
    info: DatasetInfo,
    root: Path,
    names: Sequence[str],
    *,
    verify: bool,
    download: bool,
    base_url: str | None,
    expected: Mapping[str, str] | None,
    hash_cache: bool,
) -> dict[str, Path]:
    paths = {}
    for name in names:
        entry = info.file(name)
        known = entry.digests
        if expected and name in expected:
            known = (_sha(expected[name], "given by the caller"),)
        path = root / name
        if not path.is_file() and download:
            url_base = base_url or info.base_url
            if not url_base:
                raise DataError(f"no base_url to download {name} of {info.name} from; pass base_url=")
            download_file(f"{url_base.rstrip('/')}/{name}", path, known)
        if not path.is_file():
            present = sorted(p.name for p in root.iterdir()) if root.is_dir() else None
            where = f"folder {root} holds {present}" if present is not None else f"folder {root} does not exist"
            raise DataError(
                f"missing file for {info.name}: expected {path} ({info.layout} layout); {where}. "
                f"Pass data_dir= / --data-dir, set ${DATA_ENV}, or download=True."
            )
        if verify:
            verify_file(path, known, hash_cache=hash_cache)
        paths[name] = path
    return paths


# --- format readers ------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped if it starts with the gzip magic): header checked, array returned."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise DataError(f"{path}: corrupt gzip stream ({error})") from error
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, type_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or type_code not in _IDX_TYPES or ndim < 1:
        raise DataError(
            f"{path}: not an IDX file (magic {raw[:4].hex()}; expected 0000 + type code in "
            f"{sorted(hex(t) for t in _IDX_TYPES)} + ndim >= 1)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header says dims {dims} ({expected} data bytes) but the file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).copy()


def read_cifar_bin(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch -> (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    record = 1 + 3 * 32 * 32
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR-10 records")
    table = raw.reshape(-1, record)
    labels = table[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label byte {int(labels.max())} out of range 0..9 (not CIFAR-10?)")
    return table[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what numpy arrays need (the official CIFAR-10 pickles hold dicts, lists, bytes, arrays)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"): ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> object:
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        import importlib

        try:
            return getattr(importlib.import_module(target[0]), target[1])
        except ImportError:  # numpy < 2
            return getattr(importlib.import_module(target[0].replace("numpy._core", "numpy.core")), target[1])


def read_cifar_pickle(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python-version batch (a pickle; restricted unpickler) -> (images, labels)."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            batch = _RestrictedUnpickler(stream, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({error})") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', found {keys}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DataError(f"{path}: data {data.shape} / labels {labels.shape}, expected (N, 3072) / (N,)")
    return data.reshape(-1, 3, 32, 32).copy(), labels


def _read_cifar_pickle_meta(path: Path) -> tuple[str, ...]:
    with open(path, "rb") as stream:
        meta = _RestrictedUnpickler(stream, encoding="bytes").load()
    names = meta.get(b"label_names", []) if isinstance(meta, dict) else []
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


# --- loaders -------------------------------------------------------------------------------


def _to_data(images: np.ndarray, labels: np.ndarray, info: DatasetInfo, split: str) -> ImageData:
    return ImageData(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)), info, split)


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _dataset_root(info: DatasetInfo, data_dir: str | os.PathLike[str] | None) -> Path:
    base = resolve_data_dir(data_dir)
    return base / info.folder if info.folder else base


def load_cifar10(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    layout: str = "auto",
    verify: bool = True,
    download: bool = False,
    base_url: str | None = None,
    expected: Mapping[str, str] | None = None,
    hash_cache: bool = True,
) -> ImageData:
    """CIFAR-10 from the binary layout (or, with layout "auto" and no binary folder, the python layout)."""
    _check_split(split)
    if layout not in ("auto", "bin", "pickle"):
        raise ValueError(f"layout must be 'auto', 'bin' or 'pickle', got {layout!r}")
    bin_root = _dataset_root(CIFAR10_BIN, data_dir)
    py_root = bin_root.parent / CIFAR10_PY.folder
    use_pickle = layout == "pickle" or (layout == "auto" and not bin_root.is_dir() and py_root.is_dir())
    info = CIFAR10_PY if use_pickle else CIFAR10_BIN
    root = py_root if use_pickle else bin_root
    if use_pickle:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        reader = read_cifar_pickle
    else:
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
        reader = read_cifar_bin
    paths = _ensure_files(
        info, root, names, verify=verify, download=download, base_url=base_url, expected=expected,
        hash_cache=hash_cache,
    )  # verified before anything is unpickled
    parts = [reader(paths[n]) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    meta = root / ("batches.meta" if use_pickle else "batches.meta.txt")
    if meta.is_file():
        if verify:
            _ensure_files(info, root, [meta.name], verify=True, download=False, base_url=None,
                          expected=expected, hash_cache=hash_cache)
        classes = _read_cifar_pickle_meta(meta) if use_pickle else tuple(
            line.strip() for line in meta.read_text().splitlines() if line.strip()
        )
        if classes and classes != CIFAR10_CLASSES:
            raise DataError(f"{meta}: class names {classes}, expected {CIFAR10_CLASSES}")
    return _to_data(images, labels, info, split)


def load_fashion_mnist(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    download: bool = False,
    base_url: str | None = None,
    expected: Mapping[str, str] | None = None,
    hash_cache: bool = True,
) -> ImageData:
    """Fashion-MNIST from IDX files, gzipped (as released) or decompressed (``gunzip``-ed official
    files are recognised by their own digests); the ``.gz`` is used when both are present."""
    _check_split(split)
    root = _dataset_root(FASHION_MNIST, data_dir)
    prefix = "train" if split == "train" else "t10k"
    names = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    paths: dict[str, Path] = {}
    for name in names:
        raw = root / name[:-3]
        if not (root / name).is_file() and raw.is_file():  # decompressed copy
            if verify:
                verify_file(raw, FASHION_MNIST.file(raw.name).digests, hash_cache=hash_cache)
            paths[name] = raw
        else:
            paths.update(_ensure_files(
                FASHION_MNIST, root, [name], verify=verify, download=download, base_url=base_url,
                expected=expected, hash_cache=hash_cache,
            ))
    images = read_idx(paths[names[0]])
    labels = read_idx(paths[names[1]])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"{paths[names[0]]}: expected uint8 images (N, 28, 28), found {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{paths[names[1]]}: expected {images.shape[0]} labels, found shape {labels.shape}")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{paths[names[1]]}: label {int(labels.max())} out of range 0..9")
    return _to_data(images[:, None], labels, FASHION_MNIST, split)


def load_digits(split: str = "train", *, seed: int = DIGITS_SPLIT_SEED) -> ImageData:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 255], fixed stratified 80/20 split."""
    _check_split(split)
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    values = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    targets = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = []
    for label in range(10):
        members = np.flatnonzero(targets == label)
        members = members[rng.permutation(members.size)]
        test.extend(members[: int(round(DIGITS_TEST_FRACTION * members.size))].tolist())
    is_test = np.zeros(targets.size, dtype=bool)
    is_test[test] = True
    chosen = np.flatnonzero(is_test if split == "test" else ~is_test)
    info = dataclasses.replace(DIGITS, train_size=int((~is_test).sum()), test_size=int(is_test.sum()))
    return _to_data(values[chosen][:, None], targets[chosen], info, split)


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    **options: object,
) -> ImageData:
    """Load ``name`` (one of :data:`DATASET_NAMES`) and ``split``; options go to its loader."""
    if name == "digits":
        return load_digits(split)
    if name == "cifar10":
        return load_cifar10(split, data_dir, **options)
    if name == "fashion_mnist":
        return load_fashion_mnist(split, data_dir, **options)
    raise ValueError(f"dataset must be one of {DATASET_NAMES}, got {name!r}")


# --- subsets and statistics -------------------------------------------------------------------


def balanced_subset_indices(labels: Tensor, size: int, *, seed: int, num_classes: int | None = None) -> Tensor:
    """A seeded, class-balanced subset of ``size`` indices (sorted).

    Each class gets ``size // C`` (the first ``size % C`` classes in a seeded order one more);
    a class with too few members raises ValueError.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    classes = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= labels.numel():
        raise ValueError(f"size must be an integer in [1, {labels.numel()}], got {size!r}")
    rng = np.random.default_rng(seed)
    extra = set(rng.permutation(classes)[: size % classes].tolist())
    chosen = []
    for label in range(classes):
        members = np.flatnonzero(labels.numpy() == label)
        want = size // classes + (label in extra)
        if want > members.size:
            raise ValueError(f"class {label} has {members.size} images, a balanced subset of {size} needs {want}")
        chosen.append(members[rng.permutation(members.size)[:want]])
    return torch.from_numpy(np.sort(np.concatenate(chosen)))


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), on the [0, 1] scale."""
    x = images.double() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


__all__ = [
    "ChecksumError", "DataError", "DataFile", "DatasetInfo", "ImageData", "KnownDigest", "DATASETS",
    "DATASET_NAMES", "CIFAR10_BIN", "CIFAR10_PY", "FASHION_MNIST", "DIGITS", "resolve_data_dir",
    "file_digest", "verify_file", "read_sha256sums", "download_file", "read_idx", "read_cifar_bin",
    "read_cifar_pickle", "load_cifar10", "load_fashion_mnist", "load_digits", "load_dataset",
    "balanced_subset_indices", "channel_stats",
]
