"""Every Python example in the README runs as written (docs match the code)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_readme_has_exactly_the_two_setup_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_local_file_the_readme_shows_or_links_exists():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#]+)\)", text)  # markdown links and images
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert "docs/report-index.png" in local
    for target in local:
        assert (README.parent / target).exists(), target


def test_make_targets_named_in_the_readme_exist():
    makefile = (README.parent / "Makefile").read_text()
    for target in set(re.findall(r"`make ([\w-]+)`", README.read_text())):
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), target
