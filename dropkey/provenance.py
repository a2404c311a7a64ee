"""Provenance of a run: git commit, package versions, machine, seed and command.

Every result file the suite writes carries this record, so a number can be
traced back to the code and inputs that produced it.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

_PACKAGES = ("numpy", "scipy", "sympy", "mpmath", "torch", "pandas", "hypothesis")


def git_commit(cwd: Path | None = None) -> str:
    """The current commit (with '-dirty' if the tree has changes), or 'unknown'."""
    where = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def package_versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape numerical results."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine() -> dict[str, Any]:
    """A short description of the machine: processor, core count, OS."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def provenance(seed: int | None = None, command: list[str] | None = None) -> dict[str, Any]:
    """The full provenance record of a run, as a JSON-serialisable dict."""
    return {
        "git_commit": git_commit(),
        "versions": package_versions(),
        "machine": machine(),
        "seed": seed,
        "command": " ".join(command if command is not None else sys.argv),
        "utc_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
