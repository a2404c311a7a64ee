"""The compiled-kernel cache's integrity rules: only a private, digest-checked library is ever loaded.

A cached shared library is code this process will run, so it is loaded only when nobody but
this user could have put it there, and only when it is exactly the file this code built:

- :func:`private_folder`: the cache folder is owned by this user and writable by nobody else,
  and every folder above it is owned by this user or root and, if others can write it, sticky
  (as /tmp is). Otherwise the cache is not used (the caller builds privately instead);
- :func:`install_library` moves a freshly built library into place (mode 0755 whatever the
  umask) and then records its size and SHA-256 in a sidecar, ``<name>.sha256.json``, written
  atomically (:func:`dropkey.storage.write_json_atomic`);
- :func:`verified_library`: the library is a regular file owned by this user, writable by
  nobody else, and matches its sidecar. Anything else (truncated by a full disk or a killed
  copy, planted, replaced, no sidecar) is deleted and reported, so the caller rebuilds; a
  truncated library never reaches ``ctypes.CDLL`` (where it would die of SIGBUS).

No check is made where there are no POSIX owners and modes (Windows): the digest still is.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Optional

from dropkey.storage import file_record, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["digest_path", "install_library", "private_folder", "verified_library"]


def digest_path(target: Path) -> Path:
    """The sidecar recording ``target``'s size and SHA-256."""
    return target.with_name(target.name + ".sha256.json")


def install_library(built: Path | str, target: Path) -> None:
    """Move the library ``built`` to ``target`` (atomically, mode 0755), then record its digest beside it."""
    os.chmod(built, 0o755)  # whatever the umask: group or others must not be able to write it
    record = {"file": target.name, **file_record(built)}
    os.replace(built, target)
    sidecar = write_json_atomic(digest_path(target), record)
    os.chmod(sidecar, 0o644)


def _not_private(path: Path, *, follow: bool) -> Optional[str]:
    """Why ``path`` could hold something another user put there (None: it could not).

    It must be owned by this user and writable by nobody else; a file must be a regular file
    (``follow=False``: a symbolic link is refused). Not checked where there are no POSIX owners.
    """
    if os.name != "posix":
        return None
    info = os.stat(path) if follow else os.lstat(path)
    if not follow and not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if info.st_uid != os.getuid():
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def private_folder(folder: Path) -> Optional[str]:
    """Create ``folder`` (mode 0700) if missing; why it is not private to this user, or None.

    The folder must pass :func:`_not_private`; each folder above it must be owned by this user
    or root and, if others can write it, carry the sticky bit (as /tmp does), so that nobody
    else can rename or replace what lies below.
    """
    if os.name != "posix":
        folder.mkdir(parents=True, exist_ok=True)
        return None
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for part in reversed(missing):
        try:
            os.mkdir(part, 0o700)
        except FileExistsError:
            pass
    folder = folder.resolve()
    problem = _not_private(folder, follow=True)
    for above in folder.parents:
        if problem is not None:
            break
        info = os.stat(above)
        if info.st_uid not in (0, os.getuid()):
            problem = f"{above} is owned by uid {info.st_uid}"
        elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            problem = f"{above} is writable by group or others without the sticky bit"
    return problem


def verified_library(target: Path) -> bool:
    """True when ``target`` is a private regular file matching its sidecar; else both are removed
    (with a warning when a library was there), so that the caller rebuilds."""
    sidecar = digest_path(target)
    if not os.path.lexists(target):
        sidecar.unlink(missing_ok=True)
        return False
    try:
        problem = _not_private(target, follow=False) or _not_private(sidecar, follow=False)
        if problem is None:
            recorded = json.loads(sidecar.read_text(encoding="utf-8"))
            if recorded != {"file": target.name, **file_record(target)}:
                problem = f"{target} does not match the size and SHA-256 recorded in {sidecar.name}"
    except FileNotFoundError:
        problem = f"{target} has no digest record ({sidecar.name})"
    except (OSError, ValueError) as error:  # unreadable, or not JSON / not UTF-8
        problem = f"the digest record of {target} is unreadable ({type(error).__name__}: {error})"
    if problem is None:
        return True
    logger.warning("not loading the cached DropKey CPU kernel: %s; rebuilding", problem)
    target.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)
    return False
