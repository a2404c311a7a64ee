"""Files and result folders: atomic writes, one CSV float format, one JSON conversion, one completion marker.

Atomic writes: a file is either fully written or untouched, never half-written (write to a
temporary file in the same directory, flush and fsync it, then ``os.replace`` it over the
target: atomic on POSIX and Windows).

A *result folder* is what every layer writes a finished computation into (an experiment, a
study, a training run): CSV tables (:data:`FLOAT_FORMAT`), JSON documents (through
:func:`to_jsonable`), ``provenance.json`` and, written last, the completion marker
``complete.json``. The marker records every file written with its size and SHA-256, so a folder
is complete exactly when its marker exists, and a reader sees only the files the marker lists.
:func:`write_result_folder` writes one, :func:`read_result_folder` reads one back (a
FileNotFoundError naming the folder and what to run if it is absent or incomplete) after
checking every listed file against the marker's size and SHA-256 (:func:`verify_result_folder`:
an :class:`IntegrityError` naming the file that is missing, unreadable or changed). A cache
recomputes such a folder; a reader of evidence refuses it.

Sealed files: :func:`write_sealed_atomic` writes a payload behind a one-line header holding its
length and SHA-256 (one file, written atomically, so the digest can never belong to another
payload); :func:`read_sealed` gives the payload back only if it matches (training checkpoints).

Only the standard library is imported here: data frames are written by their own ``to_csv``
and read back by the caller (``pandas.read_csv(result.path(name))``).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class Frame(Protocol):
    """What the writers need of a table: a pandas DataFrame's ``to_csv``."""

    def to_csv(self, *args: Any, **kwargs: Any) -> Any: ...

#: The one float format of every CSV table the suite writes (12 significant digits).
FLOAT_FORMAT = "%.12g"
#: The completion marker of a result folder: written last, it lists the files written.
MARKER = "complete.json"
#: The provenance record of a result folder (:func:`dropkey.provenance.provenance`).
PROVENANCE = "provenance.json"
#: Version of the marker's layout.
MARKER_FORMAT = 1
#: The first bytes of a sealed file (:func:`write_sealed_atomic`).
SEAL_MAGIC = b"DROPKEY-SEALED"


class IntegrityError(ValueError):
    """A stored file is missing, unreadable, or not what its recorded digest says (the message names it)."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; written files get the usual 0666 & ~umask instead.
_FILE_MODE = 0o666 & ~_current_umask()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating parent folders; return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def json_text(payload: Any) -> str:
    """``payload`` as indented, key-sorted JSON (stable across runs), newline-terminated."""
    return json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as indented, key-sorted JSON (stable across runs) atomically."""
    return write_text_atomic(path, json_text(payload))


def to_jsonable(value: Any) -> Any:
    """``value`` as strict JSON data, recursively.

    Mappings become dicts with string keys; tuples, lists and arrays (anything with ``tolist``
    and ``ndim >= 1``) become lists; numpy and torch scalars become Python numbers; bools stay
    bools; non-finite floats become ``None``. Anything else (strings, None) is returned as is.
    """
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (str, bytes)) or value is None:
        return value
    if getattr(value, "ndim", 0) and hasattr(value, "tolist"):  # an array
        return [to_jsonable(item) for item in value.tolist()]
    if hasattr(value, "item"):  # a numpy or torch scalar (a 0-d array included)
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    return value


def csv_text(frame: Frame) -> str:
    """A data frame as CSV text in the suite's one format (no index, :data:`FLOAT_FORMAT`, ``\\n`` line ends)."""
    return frame.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n")


def write_csv_atomic(path: str | os.PathLike[str], frame: Frame) -> Path:
    """Write ``frame`` as CSV (:func:`csv_text`) atomically."""
    return write_text_atomic(path, csv_text(frame))


# --- result folders -----------------------------------------------------------------------


def _file_name(name: object, argument: str, suffix: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be keyed by file names (str), got {type(name).__name__}")
    if Path(name).name != name or name in ("", ".", "..") or not name.endswith(suffix) or name in (MARKER, PROVENANCE):
        raise ValueError(
            f"{argument} keys must be plain file names ending in {suffix!r} (not {MARKER!r} or {PROVENANCE!r}), "
            f"got {name!r}"
        )
    return name


def file_hash(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """The hex digest of a file (any :func:`hashlib.new` algorithm), read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A file's size in bytes and SHA-256 (hex)."""
    return {"bytes": os.stat(path).st_size, "sha256": file_hash(path)}


def mark_complete(
    folder: str | os.PathLike[str], files: Iterable[str] | None = None, record: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write the folder's completion marker (atomically) over ``files``; return the marker.

    ``files`` are names in ``folder`` (default: every regular file there except the marker and
    temporaries). The marker holds the layout version, each file's size and SHA-256, and
    ``record`` (e.g. a summary of the run) under ``"record"``.
    """
    where = Path(folder)
    if files is None:
        names = sorted(p.name for p in where.iterdir()
                       if p.is_file() and p.name != MARKER and not p.name.startswith("."))
    else:
        names = sorted(set(files))
    missing = [name for name in names if not (where / name).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot mark {where} complete: {missing} not written")
    marker: dict[str, Any] = {"format": MARKER_FORMAT, "files": {name: file_record(where / name) for name in names}}
    if record is not None:
        marker["record"] = to_jsonable(record)
    write_json_atomic(where / MARKER, marker)
    return marker


def is_complete(folder: str | os.PathLike[str]) -> bool:
    """True when the folder's completion marker exists (everything it lists was written before it)."""
    return (Path(folder) / MARKER).is_file()


def _listed_files(folder: Path) -> tuple[str, ...]:
    if not is_complete(folder):
        return ()
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    return tuple(marker.get("files", {})) if isinstance(marker, dict) else ()


def write_result_folder(
    folder: str | os.PathLike[str],
    *,
    tables: Mapping[str, Frame] | None = None,
    documents: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a complete result folder; return its marker.

    ``tables`` maps ``*.csv`` names to data frames (:func:`csv_text`); ``documents`` maps
    ``*.json`` names to JSON data (through :func:`to_jsonable`); ``provenance`` is written to
    ``provenance.json``; ``record`` goes into the marker. The old marker and provenance are removed
    first, so an interrupted rewrite leaves an incomplete folder, never a mix that looks complete;
    files the old marker listed and this write does not rewrite are removed. Every file is written
    atomically and the marker last.
    """
    where = Path(folder)
    tables = dict(tables or {})
    documents = dict(documents or {})
    names = [_file_name(name, "tables", ".csv") for name in tables]
    names += [_file_name(name, "documents", ".json") for name in documents]
    if not names and provenance is None:
        raise ValueError("a result folder needs at least one of tables, documents or provenance")
    where.mkdir(parents=True, exist_ok=True)
    previous = _listed_files(where)
    (where / MARKER).unlink(missing_ok=True)
    (where / PROVENANCE).unlink(missing_ok=True)
    for name in previous:
        if name not in names and name != PROVENANCE:
            (where / name).unlink(missing_ok=True)
    for name, frame in tables.items():
        write_csv_atomic(where / name, frame)
    for name, payload in documents.items():
        write_json_atomic(where / name, to_jsonable(payload))
    if provenance is not None:
        write_json_atomic(where / PROVENANCE, to_jsonable(provenance))
        names.append(PROVENANCE)
    return mark_complete(where, names, record)


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The folder's marker, its "files" a table {name: {"bytes", "sha256"}} (else IntegrityError naming it)."""
    path = Path(folder) / MARKER
    try:
        marker = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise IntegrityError(f"{path} is unreadable ({type(error).__name__}: {error})") from error
    files = marker.get("files") if isinstance(marker, dict) else None
    well_formed = isinstance(files, dict) and all(
        isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..", MARKER)
        and isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        for name, entry in files.items()
    )
    if not well_formed:
        raise IntegrityError(f"{path} is not a completion marker (no valid 'files' table of sizes and SHA-256s)")
    return marker


def verify_file_record(path: str | os.PathLike[str], expected: Mapping[str, Any]) -> None:
    """Check a file against its record (``{"bytes": ..., "sha256": ...}``, :func:`file_record`).

    Raises :class:`IntegrityError` naming the file when it is missing, unreadable, of another size
    or of another SHA-256.
    """
    path = Path(path)
    try:
        found = file_record(path)
    except FileNotFoundError as error:
        raise IntegrityError(f"{path} is missing") from error
    except OSError as error:
        raise IntegrityError(f"{path} is unreadable ({type(error).__name__}: {error})") from error
    if found["bytes"] != expected.get("bytes"):
        raise IntegrityError(f"{path} has {found['bytes']} bytes, its record says {expected.get('bytes')}")
    if found["sha256"] != expected.get("sha256"):
        raise IntegrityError(f"{path} has SHA-256 {found['sha256']}, its record says {expected.get('sha256')}")


def verify_result_folder(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file the folder's marker lists against its size and SHA-256; return the marker.

    Raises :class:`IntegrityError` naming the marker when it is unreadable or malformed, or the
    first file that is missing, unreadable or changed.
    """
    where = Path(folder)
    marker = read_marker(where)
    for name, expected in sorted(marker["files"].items()):
        verify_file_record(where / name, expected)
    return marker


def sealed_bytes(payload: bytes) -> bytes:
    """``payload`` behind a one-line header holding its length and SHA-256 (what :func:`read_sealed` checks)."""
    header = SEAL_MAGIC + b" 1 %d sha256 %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode())
    return header + payload


def write_sealed_atomic(path: str | os.PathLike[str], payload: bytes) -> Path:
    """Write :func:`sealed_bytes` of ``payload`` atomically: the digest can never belong to another payload."""
    return write_bytes_atomic(path, sealed_bytes(payload))


def read_sealed(path: str | os.PathLike[str], what: str = "file") -> bytes:
    """The payload of a file :func:`write_sealed_atomic` wrote, after checking its length and SHA-256.

    Raises :class:`IntegrityError` naming the file (and ``what`` it should be) when it is empty,
    has no seal (garbage, or written without one), is truncated or was modified.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise IntegrityError(f"{what} {path} is unreadable ({type(error).__name__}: {error})") from error
    if not raw:
        raise IntegrityError(f"{what} {path} is empty (0 bytes)")
    end = raw.find(b"\n", 0, 200)
    fields = raw[:end].split(b" ") if end > 0 else []
    if len(fields) != 5 or fields[0] != SEAL_MAGIC or fields[1] != b"1" or fields[3] != b"sha256" \
            or not fields[2].isdigit():
        raise IntegrityError(
            f"{what} {path} has no content digest ({len(raw)} bytes starting {raw[:8]!r}): it is garbage or was "
            "written by an earlier version, so it cannot be verified")
    payload = raw[end + 1:]
    if len(payload) != int(fields[2]):
        raise IntegrityError(f"{what} {path} is truncated or extended: {len(payload)} bytes after its header, "
                             f"which says {int(fields[2])}")
    if hashlib.sha256(payload).hexdigest().encode() != fields[4]:
        raise IntegrityError(f"{what} {path} is corrupt: its SHA-256 does not match the digest written with it")
    return payload


@dataclass(frozen=True)
class ResultFolder:
    """A complete result folder as read back: its path, marker and provenance; the files on demand."""

    folder: Path
    files: tuple[str, ...]  # what the writer recorded (the marker's list)
    marker: dict[str, Any]
    provenance: dict[str, Any]

    def has(self, name: str) -> bool:
        """Whether the writer wrote ``name`` (a file left over from an earlier write does not count)."""
        return name in self.files

    def path(self, name: str) -> Path:
        """Where ``name`` is (FileNotFoundError unless the writer wrote it); tables: ``pandas.read_csv(path)``."""
        if not self.has(name):
            raise FileNotFoundError(f"{self.folder} has no {name} (written: {list(self.files)})")
        return self.folder / name

    def read_json(self, name: str) -> Any:
        return json.loads(self.path(name).read_text(encoding="utf-8"))


def read_result_folder(
    folder: str | os.PathLike[str], *, remedy: str, what: str = "result", legacy_marker: str | None = None
) -> ResultFolder:
    """Read back a complete result folder (see :func:`write_result_folder`), its files verified.

    Raises FileNotFoundError naming ``what``, the folder and ``remedy`` (the command that writes it)
    when the folder is absent or incomplete, and :class:`IntegrityError` naming the file when one
    the marker lists is missing, unreadable or changed (:func:`verify_result_folder`).
    ``legacy_marker`` (e.g. ``"provenance.json"``) also accepts folders written before the marker
    existed, whose writer wrote that file last; every file present then counts as written (there
    are no digests to check).
    """
    where = Path(folder)
    if is_complete(where):
        marker = verify_result_folder(where)
        files = tuple(marker["files"])
    elif legacy_marker is not None and (where / legacy_marker).is_file():
        marker = {}
        files = tuple(sorted(p.name for p in where.iterdir() if p.is_file() and not p.name.startswith(".")))
    else:
        raise FileNotFoundError(f"no complete {what} in {where}: run `{remedy}`")
    record = json.loads((where / PROVENANCE).read_text(encoding="utf-8")) if PROVENANCE in files else {}
    return ResultFolder(folder=where, files=files, marker=marker, provenance=record)
