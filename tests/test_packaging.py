"""The distribution declares every package and subpackage that exists on disk."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("dropkey", "theory", "simulations", "reports")


def test_every_package_on_disk_is_declared():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP_LEVEL
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert set(TOP_LEVEL) <= declared
    assert on_disk == declared, f"declare these in pyproject.toml: {sorted(on_disk - declared)}"
