"""The dropkey-lab command line, run in-process and as the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from reports.cli import build_parser, main


def test_theory_command_reports_every_derivation_and_exits_zero(capsys):
    from theory.derivations import verify_all

    code = main(["theory"])
    output = capsys.readouterr().out
    for result in verify_all():
        assert result.key in output
    assert "all theory checks hold" in output
    assert code == 0


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_parser_requires_a_subcommand():
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_console_script_is_installed():
    script = shutil.which("dropkey-lab") or str(__import__("pathlib").Path(sys.executable).parent / "dropkey-lab")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert "theory" in result.stdout
