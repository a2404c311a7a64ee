"""The studies' registry and their one command line (``dropkey-lab simulate NAME``, ``python -m simulations NAME``).

Every study of :mod:`simulations.registry` is checked here for what the command line and the
report need of it; each study's own tests run it through :func:`simulations.cli.main`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dropkey import storage
from reports.cli import main as dropkey_lab
from simulations import cli, registry
from simulations.common import read_study_outputs, write_study_outputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", registry.study_names())
def test_every_study_describes_itself_completely(name):
    study = registry.study(name)
    assert study.name == name and study.title and study.question and study.method
    module = importlib.import_module(study.module)
    assert module.STUDY is study and study.module == f"simulations.{name}"
    for size in registry.SIZES:
        config = study.config(size, seed=7)
        assert isinstance(config, study.config_class) and config.seed == 7
    page = importlib.import_module(study.page)
    assert callable(page.figures) and study.equations(), "a study page states what it measures"


def test_the_registry_finds_every_study_module_in_rank_order():
    assert registry.study_names() == ("coefficients", "gradient_damping", "toy_optimisation", "train_test_mismatch",
                                      "toy_regimes", "structured_masks")


def test_registry_rejects_unknown_repeated_and_malformed_studies():
    with pytest.raises(ValueError, match="study must be one of .*coefficients.*got 'nope'"):
        registry.study("nope")
    existing = registry.study("coefficients")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(existing)
    with pytest.raises(TypeError, match="entry must be a Study"):
        registry.register("coefficients")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name must be an identifier"):
        dataclasses.replace(existing, name="two words")
    with pytest.raises(ValueError, match="size must be one of"):
        existing.config("medium")
    with pytest.raises(ValueError, match="register"):
        registry.unregister("coefficients")


def test_python_dash_m_entry_point_works():
    result = subprocess.run(
        [sys.executable, "-m", "simulations", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.startswith("usage: python -m simulations")
    for option in ("--full", "--seed", "--out", "--log-level"):
        assert option in result.stdout


def test_parser_defaults_write_under_runs():
    args = cli.build_parser().parse_args(["coefficients"])
    assert (args.name, args.full, args.seed, args.out, args.log_level) == ("coefficients", False, None, None, "WARNING")
    assert cli.DEFAULT_OUT == Path("runs") / "simulations"


def test_an_unknown_study_is_a_usage_error_naming_the_studies(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dropkey_lab(["simulate", "no_such_study"])
    assert exit_info.value.code == 2
    assert "study must be one of" in capsys.readouterr().err


def test_dropkey_lab_simulate_writes_under_runs_by_default(tmp_path, monkeypatch, capsys):
    study = registry.study("train_test_mismatch")
    tiny = dataclasses.replace(study.config(), ns=(4,), drop_ratios=(0.3,), n_problems=3, ks=(1, 4))
    monkeypatch.setattr(study.config_class, "quick", classmethod(lambda cls: tiny))
    monkeypatch.chdir(tmp_path)
    assert dropkey_lab(["simulate", "train_test_mismatch", "--seed", "5"]) == 0
    out = tmp_path / "runs" / "simulations" / "train_test_mismatch"
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == "train_test_mismatch" and config["config"]["seed"] == 5 and config["size"] == "quick"
    assert json.loads((out / "provenance.json").read_text())["command"].startswith("dropkey-lab")
    rows = len(pd.read_csv(out / "results.csv"))
    assert rows > 0
    assert f"train_test_mismatch: {rows} rows -> runs/simulations" in capsys.readouterr().out


def test_study_outputs_are_one_result_folder_written_without_printing(tmp_path, capsys, caplog):
    """The command line and the report's cache write the same layout (dropkey.storage's folder and marker)."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        seed: int = 5
        ratios: tuple[float, ...] = (0.1, 0.5)

    frame = pd.DataFrame({"a": [1, 2], "b": [1 / 3, 0.25]})
    summary = {"x": np.float64(1.5), "bad": math.nan, "n": np.int64(2)}
    with caplog.at_level("INFO", logger="simulations.common"):
        write_study_outputs(tmp_path, name="demo", size="quick", config=Config(), frame=frame, summary=summary,
                            command=["demo"])
    assert capsys.readouterr() == ("", "")
    assert "demo: 2 rows written" in caplog.text
    assert storage.is_complete(tmp_path)
    assert (tmp_path / "results.csv").read_text().splitlines()[1] == "1,0.333333333333"  # storage.FLOAT_FORMAT
    outputs = read_study_outputs(tmp_path, remedy="demo")
    pd.testing.assert_frame_equal(outputs.frame, frame, check_exact=False, rtol=1e-12)
    assert outputs.summary == {"x": 1.5, "bad": None, "n": 2}
    assert outputs.config == {"study": "demo", "size": "quick", "config": {"seed": 5, "ratios": [0.1, 0.5]}}
    assert outputs.provenance["seed"] == 5 and outputs.provenance["command"] == "demo"


def test_an_incomplete_study_folder_is_not_read(tmp_path):
    (tmp_path / "results.csv").write_text("a\n1\n")
    with pytest.raises(FileNotFoundError, match="run `dropkey-lab simulate demo`"):
        read_study_outputs(tmp_path, remedy="dropkey-lab simulate demo")
