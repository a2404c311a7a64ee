"""The distribution: the wheel built from this checkout holds every package, its data files and the
LICENSE, declares the runtime dependencies the default commands need, and has the one version.

The wheel is built offline with the installed setuptools (``pip wheel --no-build-isolation``) from a
copy of the checkout, so the test writes nothing into the repository.
"""

from __future__ import annotations

import email
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import dropkey

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("dropkey", "theory", "simulations", "reports")


def _requirement_names(metadata: email.message.Message, extra: str | None = None) -> set[str]:
    names = set()
    for line in metadata.get_all("Requires-Dist", []):
        requirement, _, marker = line.partition(";")
        if (extra is None) == (not marker) and (extra is None or f'extra == "{extra}"' in marker):
            names.add(requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower())
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    try:
        setuptools = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        setuptools = 0
    if setuptools < 77:
        pytest.skip("building the wheel offline needs setuptools >= 77 installed (the build backend)")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for top in TOP_LEVEL:
        shutil.copytree(ROOT / top, source / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out),
         str(source)],
        capture_output=True, text=True, cwd=source,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (path,) = out.glob("dropkey_lab-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def _metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(wheel.read(name))


def test_the_wheel_holds_every_package_on_disk(wheel):
    on_disk = {init.parent.relative_to(ROOT).as_posix()
               for top in TOP_LEVEL for init in (ROOT / top).rglob("__init__.py")}
    in_wheel = {Path(name).parent.as_posix() for name in wheel.namelist() if name.endswith("/__init__.py")}
    assert set(TOP_LEVEL) <= on_disk
    assert on_disk == in_wheel, f"missing from the wheel: {sorted(on_disk - in_wheel)}"


def test_the_wheel_ships_the_data_files_used_at_run_time_and_the_license(wheel):
    names = set(wheel.namelist())
    assert "dropkey/kernels/dropkey_cpu.cpp" in names  # the C++ CPU kernel, compiled at first use
    templates = {p.relative_to(ROOT).as_posix() for p in (ROOT / "reports" / "templates").glob("*.html.j2")}
    assert templates and templates <= names
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert wheel.read(license_file) == (ROOT / "LICENSE").read_bytes()
    assert b"MIT License" in wheel.read(license_file)


def test_the_version_is_dropkey_version_and_the_license_mit(wheel):
    metadata = _metadata(wheel)
    assert metadata["Version"] == dropkey.__version__
    assert metadata["License-Expression"] == "MIT"


def test_the_default_commands_need_no_extra(wheel):
    """`pip install dropkey-lab` then `dropkey-lab train` (digits: scikit-learn) and the report (statsmodels)."""
    metadata = _metadata(wheel)
    runtime = _requirement_names(metadata)
    assert {"torch", "numpy", "pandas", "scikit-learn", "statsmodels", "jinja2", "matplotlib"} <= runtime
    assert {"pytest", "hypothesis", "import-linter", "ruff"} <= _requirement_names(metadata, "test")
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "dropkey-lab = reports.cli:main" in wheel.read(entry_points).decode()
