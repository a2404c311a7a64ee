"""The layers of docs/architecture.md hold: import-linter's contracts, and a light attention library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
#: What an environment with only torch and numpy lacks (torch's own dependencies, e.g. sympy, stay).
ABSENT = ("pandas", "scipy", "matplotlib", "seaborn", "statsmodels", "sklearn", "tqdm", "hypothesis",
          "simulations", "reports")


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_linter_contracts_are_kept():
    linter = Path(sys.executable).with_name("lint-imports")
    if not linter.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    result = subprocess.run([str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout


def test_the_library_contract_names_every_library_module():
    """A module added to dropkey/ (outside the lab) must be listed, so the contract covers it."""
    library = next(c for c in _contracts() if c["type"] == "forbidden" and "dropkey.lab" in c["forbidden_modules"])
    on_disk = {f"dropkey.{path.stem}" for path in (ROOT / "dropkey").glob("*.py") if path.stem != "__init__"}
    on_disk |= {f"dropkey.{path.name}" for path in (ROOT / "dropkey").iterdir()
                if path.is_dir() and (path / "__init__.py").is_file() and path.name != "lab"}
    assert on_disk == set(library["source_modules"]), on_disk ^ set(library["source_modules"])


def test_the_attention_library_imports_with_torch_and_numpy_only():
    """In a fresh interpreter where pandas, scipy, ... are missing, the whole library imports and runs."""
    blocked = ", ".join(repr(name) for name in ABSENT)
    script = f"""
import importlib, sys
for name in ({blocked},):
    sys.modules[name] = None  # as if not installed
import torch, dropkey
from dropkey import DropKeyAttention, create_model, dropkey_attention
for name in sorted(dropkey.__dir__()):
    getattr(dropkey, name)
model = create_model("vit_tiny_8")
model.train()
out = model(torch.randn(2, 1, 8, 8))
assert out.shape[0] == 2 and torch.isfinite(out).all()
print("loaded", sorted(m for m in sys.modules if m.startswith("dropkey")))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropkey.lab" not in result.stdout
