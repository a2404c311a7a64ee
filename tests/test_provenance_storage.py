"""Provenance records and atomic writes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dropkey import storage
from dropkey.provenance import package_versions, provenance
from dropkey.storage import (
    FLOAT_FORMAT,
    MARKER,
    csv_text,
    is_complete,
    mark_complete,
    read_result_folder,
    to_jsonable,
    write_bytes_atomic,
    write_json_atomic,
    write_result_folder,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parents[1]


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


# --- JSON conversion and CSV format --------------------------------------------------------------


def test_to_jsonable_makes_strict_json():
    record = to_jsonable({"a": np.float64(math.nan), "b": (1, np.int64(2)), "c": {"d": math.inf}, 3: np.bool_(True),
                         "e": np.array([[1.5, -math.inf]]), "f": torch.tensor(2.5), "g": np.float32(0.5), "h": None,
                         "i": "text", "j": np.array(7)})
    assert record == {"a": None, "b": [1, 2], "c": {"d": None}, "3": True, "e": [[1.5, None]], "f": 2.5, "g": 0.5,
                      "h": None, "i": "text", "j": 7}
    assert type(record["b"][1]) is int and type(record["3"]) is bool and type(record["j"]) is int
    json.dumps(record, allow_nan=False)


def test_csv_text_has_one_float_format():
    frame = pd.DataFrame({"x": [1 / 3, 1e-20, 2.0, math.nan], "n": [1, 2, 3, 4], "s": ["a", "b", "", "d"]})
    assert FLOAT_FORMAT == "%.12g"
    assert csv_text(frame) == "x,n,s\n0.333333333333,1,a\n1e-20,2,b\n2,3,\n,4,d\n"


# --- result folders --------------------------------------------------------------------------------


def _write(folder, **overrides):
    arguments = {"tables": {"results.csv": pd.DataFrame({"x": [0.5, 1 / 3]})},
                 "documents": {"summary.json": {"mean": np.float64(0.25), "bad": math.nan}},
                 "provenance": provenance(seed=3, command=["test"])} | overrides
    return write_result_folder(folder, **arguments)


def test_result_folder_round_trip_with_a_marker_listing_sizes_and_digests(tmp_path):
    folder = tmp_path / "study" / "abc"
    marker = _write(folder, record={"rows": np.int64(2)})
    assert sorted(os.listdir(folder)) == ["complete.json", "provenance.json", "results.csv", "summary.json"]
    assert marker == json.loads((folder / MARKER).read_text())
    assert marker["record"] == {"rows": 2}
    for name in ("provenance.json", "results.csv", "summary.json"):
        data = (folder / name).read_bytes()
        assert marker["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    result = read_result_folder(folder, remedy="make it")
    assert result.files == ("provenance.json", "results.csv", "summary.json") and result.has("results.csv")
    assert result.provenance["seed"] == 3
    assert result.read_json("summary.json") == {"mean": 0.25, "bad": None}
    pd.testing.assert_frame_equal(pd.read_csv(result.path("results.csv")), pd.DataFrame({"x": [0.5, 0.333333333333]}))


def test_the_marker_is_written_last(tmp_path, monkeypatch):
    order = []
    original = storage.write_bytes_atomic

    def recording(path, data):
        order.append(Path(path).name)
        return original(path, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", recording)
    _write(tmp_path)
    assert order[-2:] == ["provenance.json", "complete.json"] and len(order) == 4


def test_an_interrupted_rewrite_leaves_an_incomplete_folder(tmp_path, monkeypatch):
    _write(tmp_path)

    def broken(path, frame):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "write_csv_atomic", broken)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path)
    assert not is_complete(tmp_path) and not (tmp_path / "provenance.json").exists()
    with pytest.raises(FileNotFoundError, match=r"no complete quick study in .*: run `dropkey-lab simulate x`"):
        read_result_folder(tmp_path, what="quick study", remedy="dropkey-lab simulate x")


def test_a_missing_folder_names_itself_and_the_remedy(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no complete result in .*nowhere: run `do this`"):
        read_result_folder(tmp_path / "nowhere", remedy="do this")


def test_a_rewrite_removes_files_only_the_old_marker_listed(tmp_path):
    _write(tmp_path, tables={"a.csv": pd.DataFrame({"x": [1]}), "b.csv": pd.DataFrame({"x": [2]})})
    (tmp_path / "notes.txt").write_text("not the writer's")
    _write(tmp_path, tables={"a.csv": pd.DataFrame({"x": [3]})})
    assert sorted(os.listdir(tmp_path)) == ["a.csv", "complete.json", "notes.txt", "provenance.json", "summary.json"]
    result = read_result_folder(tmp_path, remedy="x")
    assert not result.has("b.csv") and not result.has("notes.txt")
    with pytest.raises(FileNotFoundError, match="has no notes.txt"):
        result.path("notes.txt")


def test_legacy_folders_whose_provenance_was_written_last_are_read_when_asked(tmp_path):
    (tmp_path / "results.csv").write_text("x\n1\n")
    (tmp_path / "provenance.json").write_text('{"seed": 1}')
    with pytest.raises(FileNotFoundError):
        read_result_folder(tmp_path, remedy="x")
    result = read_result_folder(tmp_path, remedy="x", legacy_marker="provenance.json")
    assert result.files == ("provenance.json", "results.csv") and result.provenance == {"seed": 1}
    assert result.marker == {}


@pytest.mark.parametrize(("arguments", "error", "match"), [
    ({"tables": {"../x.csv": pd.DataFrame()}}, ValueError, "tables keys must be plain file names"),
    ({"tables": {"x.json": pd.DataFrame()}}, ValueError, "ending in '.csv'"),
    ({"documents": {"complete.json": {}}}, ValueError, "documents keys"),
    ({"documents": {"provenance.json": {}}}, ValueError, "documents keys"),
    ({"documents": {1: {}}}, TypeError, "documents must be keyed by file names"),
    ({"tables": {}, "documents": {}, "provenance": None}, ValueError, "needs at least one"),
])
def test_bad_result_folder_arguments_are_named(tmp_path, arguments, error, match):
    with pytest.raises(error, match=match):
        _write(tmp_path / "f", **arguments)
    assert not (tmp_path / "f").exists()


def test_mark_complete_lists_every_file_or_the_named_ones(tmp_path):
    (tmp_path / "a.csv").write_text("x\n")
    (tmp_path / ".a.csv.123.tmp").write_text("partial")
    assert set(mark_complete(tmp_path)["files"]) == {"a.csv"}
    assert is_complete(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\['b.csv'\] not written"):
        mark_complete(tmp_path, ["a.csv", "b.csv"])


def test_storage_imports_only_the_standard_library():
    # dropkey/__init__ imports torch; load the modules by path to see what they themselves import
    code = ("import importlib.util, sys\n"
            "for name in ('storage', 'provenance'):\n"
            "    spec = importlib.util.spec_from_file_location(name, f'dropkey/{name}.py')\n"
            "    module = sys.modules[name] = importlib.util.module_from_spec(spec)\n"
            "    spec.loader.exec_module(module)\n"
            "print(sorted(m for m in ('numpy', 'pandas', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_file_hash_and_record(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"a" * (3 << 20) + b"tail")  # more than one 1 MiB block
    data = path.read_bytes()
    assert storage.file_hash(path) == hashlib.sha256(data).hexdigest()
    assert storage.file_hash(path, "md5") == hashlib.md5(data).hexdigest()
    assert storage.file_record(path) == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
