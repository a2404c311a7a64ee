"""The distribution declares every package and subpackage that exists on disk.

pyproject.toml is read with the standard library's ``tomllib`` (Python >= 3.11).
The project supports Python >= 3.10, where ``tomllib`` does not exist: there the
test falls back to ``tomli`` (the same parser, published on PyPI) and is skipped,
with the reason, if that is not installed either.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib as toml_reader
else:  # Python 3.10: tomllib is new in 3.11
    try:
        import tomli as toml_reader
    except ModuleNotFoundError:
        toml_reader = None

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("dropkey", "theory", "simulations", "reports")


@pytest.mark.skipif(
    toml_reader is None,
    reason="reading pyproject.toml needs tomllib (Python >= 3.11) or, on Python 3.10, the tomli package",
)
def test_every_package_on_disk_is_declared():
    declared = set(toml_reader.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP_LEVEL
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert set(TOP_LEVEL) <= declared
    assert on_disk == declared, f"declare these in pyproject.toml: {sorted(on_disk - declared)}"


@pytest.mark.skipif(toml_reader is None, reason="reading pyproject.toml needs tomllib or tomli")
def test_the_cpu_kernel_source_ships_as_package_data():
    """dropkey/kernels/dropkey_cpu.cpp is compiled at first use, so a wheel must contain it."""
    from fnmatch import fnmatch

    patterns = toml_reader.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dropkey.kernels"]
    assert any(fnmatch("dropkey_cpu.cpp", pattern) for pattern in patterns)
    assert (ROOT / "dropkey" / "kernels" / "dropkey_cpu.cpp").is_file()
