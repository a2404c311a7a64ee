"""Provenance records and atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from dropkey.provenance import package_versions, provenance
from dropkey.storage import write_bytes_atomic, write_json_atomic, write_text_atomic


def test_provenance_has_commit_versions_machine_seed_and_command():
    record = provenance(seed=7, command=["dropkey-lab", "theory"])
    assert record["seed"] == 7
    assert record["command"] == "dropkey-lab theory"
    assert record["versions"]["numpy"] != "not installed"
    assert record["git_commit"]  # a hash, "…-dirty", or "unknown" outside a checkout
    assert record["machine"]["cpu_count"] >= 1
    json.dumps(record)  # serialisable


def test_missing_package_is_reported_not_raised():
    assert package_versions(("surely-not-a-real-package-xyz",))["surely-not-a-real-package-xyz"] == "not installed"


def test_atomic_writes_create_parents_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "a" / "b" / "result.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert target.read_text().index('"a"') < target.read_text().index('"b"')  # stable key order
    write_text_atomic(target, "replaced")
    assert target.read_text() == "replaced"
    assert os.listdir(target.parent) == ["result.json"]


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    target = write_text_atomic(tmp_path / "shared.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "keep.txt"
    write_text_atomic(target, "old")

    def broken_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(target, b"new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.txt"]
