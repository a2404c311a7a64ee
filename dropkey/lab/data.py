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

Checksums, the digest cache, downloads and the readers of the official formats are
:mod:`dropkey.lab.datafiles` (re-exported here). Nothing is downloaded unless asked
(``download=True``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dropkey.lab.datafiles import (
    CACHE_ENV,
    ChecksumError,
    DataError,
    KnownDigest,
    cache_dir,
    download_file,
    file_digest,
    read_cifar_bin,
    read_cifar_meta_text,
    read_cifar_pickle,
    read_cifar_pickle_meta,
    read_idx,
    read_sha256sums,
    verify_file,
)
from theory.checks import check_choice, check_int
from theory.seeding import generator, root_sequence

DATA_ENV = "DROPKEY_DATA"
#: the per-user data folder's name under $XDG_DATA_HOME (else ~/.local/share)
DATA_FOLDER = "dropkey-lab"
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
#: records in every CIFAR-10 batch file (five train batches, one test batch)
CIFAR10_BATCH_RECORDS = 10000


# --- dataset descriptions --------------------------------------------------------------


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
            raise ValueError(f"labels must be int64 ({self.images.shape[0]},), "
                             f"got {self.labels.dtype} {tuple(self.labels.shape)}")

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


# --- loaders -------------------------------------------------------------------------------


def _to_data(images: np.ndarray, labels: np.ndarray, info: DatasetInfo, split: str) -> ImageData:
    return ImageData(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)), info,
                     split)


def _check_split(split: str) -> str:
    return check_choice(split, "split", ("train", "test"))


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
    """CIFAR-10 from the binary layout (or, with layout "auto" and no binary folder, the python layout).

    With ``verify=False`` no digest vouches for the files, so each batch must hold the official
    :data:`CIFAR10_BATCH_RECORDS` records (a DataError naming the file otherwise); a smaller
    custom batch is loaded with ``verify=True`` and its digest in a ``SHA256SUMS`` or ``expected``.
    """
    _check_split(split)
    check_choice(layout, "layout", ("auto", "bin", "pickle"))
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
    if not verify:  # nothing vouches for the files: each must hold an official batch's record count
        for name, (batch, _) in zip(names, parts, strict=True):
            if len(batch) != CIFAR10_BATCH_RECORDS:
                raise DataError(f"{paths[name]}: {len(batch)} records, a CIFAR-10 batch holds "
                                f"{CIFAR10_BATCH_RECORDS} (a truncated or foreign file; verify=True checks its digest)")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    meta = root / ("batches.meta" if use_pickle else "batches.meta.txt")
    if meta.is_file():
        if verify:
            _ensure_files(info, root, [meta.name], verify=True, download=False, base_url=None,
                          expected=expected, hash_cache=hash_cache)
        classes = read_cifar_pickle_meta(meta) if use_pickle else read_cifar_meta_text(meta)
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
    rng = generator(root_sequence(seed))
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
    check_choice(name, "dataset", DATASET_NAMES)
    if name == "digits":
        return load_digits(split)
    if name == "cifar10":
        return load_cifar10(split, data_dir, **options)
    return load_fashion_mnist(split, data_dir, **options)


# --- subsets and statistics -------------------------------------------------------------------


def balanced_subset_indices(labels: Tensor, size: int, *, seed: int, num_classes: int | None = None) -> Tensor:
    """A seeded, class-balanced subset of ``size`` indices (sorted).

    Each class gets ``size // C`` (the first ``size % C`` classes in a seeded order one more);
    a class with too few members raises ValueError.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    classes = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    check_int(size, "size", 1, labels.numel())
    rng = generator(root_sequence(seed))
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
    "DATASET_NAMES", "CIFAR10_BIN", "CIFAR10_PY", "FASHION_MNIST", "DIGITS", "DATA_ENV", "DATA_FOLDER",
    "CACHE_ENV", "CIFAR10_BATCH_RECORDS", "cache_dir", "default_data_dir", "resolve_data_dir",
    "file_digest", "verify_file", "read_sha256sums", "download_file", "read_idx", "read_cifar_bin",
    "read_cifar_pickle", "load_cifar10", "load_fashion_mnist", "load_digits", "load_dataset",
    "balanced_subset_indices", "channel_stats",
]
