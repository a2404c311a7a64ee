"""The simulations' command line: the one place that prints or configures logging.

Project rule: library code logs and never prints; only the command line configures
output. In :mod:`simulations` that command line is :mod:`simulations.cli`; every
study keeps a ``main(argv)`` that its ``python -m simulations.NAME`` block calls.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from simulations import cli
from simulations.common import write_study_outputs

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ("coefficients", "gradient_damping", "structured_masks", "toy_optimisation", "toy_regimes",
           "train_test_mismatch")
CLI_MODULES = {ROOT / "simulations" / "cli.py"}
LIBRARY_FILES = sorted((ROOT / "simulations").glob("*.py")) + sorted((ROOT / "theory").rglob("*.py"))


def _output_calls(tree: ast.AST) -> list[str]:
    """Calls that write to the terminal or configure logging: print(...), *.basicConfig(...), sys.stdout/err.write."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Name) and function.id == "print":
            found.append(f"line {node.lineno}: print")
        elif isinstance(function, ast.Attribute) and function.attr == "basicConfig":
            found.append(f"line {node.lineno}: basicConfig")
        elif (
            isinstance(function, ast.Attribute)
            and function.attr == "write"
            and isinstance(function.value, ast.Attribute)
            and function.value.attr in ("stdout", "stderr")
        ):
            found.append(f"line {node.lineno}: {function.value.attr}.write")
    return found


def test_the_scan_finds_prints_and_logging_configuration():
    """The check below can fail: it flags the three forms of terminal output it looks for."""
    source = "import logging, sys\nprint(1)\nlogging.basicConfig()\nsys.stderr.write('x')\nlog.info('ok')\n"
    assert _output_calls(ast.parse(source)) == ["line 2: print", "line 3: basicConfig", "line 4: stderr.write"]


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_library_code_never_prints_or_configures_logging(path):
    calls = _output_calls(ast.parse(path.read_text(), filename=str(path)))
    if path in CLI_MODULES:
        assert calls, "simulations/cli.py is where the command line prints; the scan should see it"
    else:
        assert not calls, f"{path.relative_to(ROOT)}: only simulations/cli.py may print or configure logging: {calls}"


@pytest.mark.parametrize("study", STUDIES)
def test_each_study_runs_its_main_when_run_as_a_module(study):
    """``if __name__ == "__main__": raise SystemExit(main())`` and main goes through simulations.cli.run_cli."""
    tree = ast.parse((ROOT / "simulations" / f"{study}.py").read_text())
    guards = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"
    ]
    assert len(guards) == 1 and ast.unparse(guards[0].body[0]) == "raise SystemExit(main())"
    (main,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    assert "run_cli(" in ast.unparse(main)


def test_python_dash_m_entry_point_works():
    result = subprocess.run(
        [sys.executable, "-m", "simulations.coefficients", "--help"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    assert result.stdout.startswith("usage: python -m simulations.coefficients")
    for option in ("--full", "--seed", "--out", "--log-level"):
        assert option in result.stdout


def test_parser_defaults():
    args = cli.build_parser("coefficients", "d").parse_args([])
    assert (args.full, args.seed, args.log_level) == (False, None, "WARNING")
    assert args.out == Path("results") / "simulations" / "coefficients"


def test_outputs_are_written_without_printing(tmp_path, capsys, caplog):
    @dataclasses.dataclass(frozen=True)
    class Config:
        seed: int = 5

    frame = pd.DataFrame({"a": [1, 2], "b": [0.5, 0.25]})
    with caplog.at_level("INFO", logger="simulations.common"):
        write_study_outputs(
            tmp_path, name="demo", size="quick", config=Config(), frame=frame, summary={"x": 1.5}, command=["demo"]
        )
    assert capsys.readouterr() == ("", "")
    assert "demo: 2 rows written" in caplog.text
    assert pd.read_csv(tmp_path / "results.csv").equals(frame)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"x": 1.5}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["study"] == "demo" and config["config"] == {"seed": 5} and config["provenance"]["seed"] == 5
