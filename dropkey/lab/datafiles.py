"""Dataset files: checksums (known digests, ``SHA256SUMS``, a digest cache), download, and the
readers of the official formats (IDX, CIFAR-10 binary and python batches). See :mod:`dropkey.lab.data`
for the datasets and where their files are.

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

import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import struct
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dropkey.storage import file_hash, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

CACHE_ENV = "DROPKEY_CACHE"


class DataError(RuntimeError):
    """A dataset file is missing or malformed (the message names the file and what was found)."""


class ChecksumError(DataError):
    """A file's digest matches none of the known ones."""


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


@contextmanager
def malformed_file(path: Path, what: str, errors: tuple[type[BaseException], ...] = (Exception,)) -> Iterator[None]:
    """Turn ``errors`` raised while reading ``path`` into a one-line :class:`DataError` naming it.

    A malformed file can make a decoder raise nearly anything (``zlib.error``, ``UnpicklingError``,
    ``AttributeError``, ``MemoryError``, ``UnicodeDecodeError``, ...): the caller learns which file
    is not ``what`` it should be, never a traceback from inside the decoder.
    """
    try:
        yield
    except DataError:
        raise
    except errors as error:
        raise DataError(f"{path}: not {what} ({type(error).__name__}: {_first_line(error)})") from error


@dataclass(frozen=True)
class KnownDigest:
    """One accepted digest of a file: algorithm ("sha256" or "md5"), hex value, where it comes from."""

    algorithm: str
    hexdigest: str
    source: str



def cache_dir() -> Path:
    """Where digests are cached: ``$DROPKEY_CACHE``, else ``$XDG_CACHE_HOME/dropkey-lab``, else
    ``~/.cache/dropkey-lab``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dropkey-lab"


# --- checksums ---------------------------------------------------------------------------


def _hash_file(path: Path, algorithm: str) -> str:
    return file_hash(path, algorithm)


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
    """Parse a ``sha256sum`` output file: {file name: hex digest} (DataError naming it if it is not UTF-8 text)."""
    with malformed_file(path, "a SHA256SUMS list (UTF-8 text)", (OSError, UnicodeDecodeError)):
        text = path.read_bytes().decode("utf-8")
    sums = {}
    for line in text.splitlines():
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
            with malformed_file(path, "a readable file", (OSError,)):
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


# --- format readers ------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped if it starts with the gzip magic): header checked, array returned."""
    path = Path(path)
    with malformed_file(path, "a readable file", (OSError,)):
        raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        with malformed_file(path, "an IDX file: corrupt gzip stream", (OSError, EOFError, zlib.error, MemoryError)):
            raw = gzip.decompress(raw)
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
    with malformed_file(path, "a readable file", (OSError, ValueError, MemoryError)):
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


def _unpickle(path: Path, what: str) -> object:
    """The restricted unpickling of a whole file (read first: the decoder sees bytes, never a stream)."""
    with malformed_file(path, "a readable file", (OSError,)):
        raw = path.read_bytes()
    with malformed_file(path, what):  # any exception: the opcodes of a malformed pickle reach far
        return _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()


def read_cifar_pickle(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python-version batch (a pickle; restricted unpickler) -> (images, labels)."""
    path = Path(path)
    batch = _unpickle(path, "a CIFAR-10 python batch")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', found {keys}")
    with malformed_file(path, "a CIFAR-10 python batch"):
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DataError(f"{path}: data {data.shape} / labels {labels.shape}, expected (N, 3072) / (N,)")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels {int(labels.min())}..{int(labels.max())} out of range 0..9 (not CIFAR-10?)")
    return data.reshape(-1, 3, 32, 32).copy(), labels


def read_cifar_pickle_meta(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The class names of a CIFAR-10 python-version ``batches.meta`` (a pickle; restricted unpickler)."""
    path = Path(path)
    meta = _unpickle(path, "a CIFAR-10 batches.meta pickle")
    names = meta.get(b"label_names", []) if isinstance(meta, dict) else []
    with malformed_file(path, "a CIFAR-10 batches.meta pickle"):
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def read_cifar_meta_text(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The class names of a CIFAR-10 binary-version ``batches.meta.txt`` (one per line, UTF-8)."""
    path = Path(path)
    with malformed_file(path, "a CIFAR-10 batches.meta.txt (UTF-8 text)", (OSError, UnicodeDecodeError)):
        text = path.read_bytes().decode("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())
