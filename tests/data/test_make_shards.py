"""scripts/make_shards.py never deletes or overwrites what it did not write: an output that
overlaps the input, a split folder holding other files and an image that cannot be read are
each one line and exit code 2, from the command line as a user runs it."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.make_shards import main as make_shards
from ssl_toolkit.data import build_dataset
from ssl_toolkit.data.shards import SHARD_INDEX
from tests.data.test_folders import _class_folders

ROOT = Path(__file__).resolve().parents[2]


def _command(*args: object) -> subprocess.CompletedProcess:
    """``scripts/make_shards.py ARGS`` run as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_shards.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path) with a digest of its bytes."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _one_error(result: subprocess.CompletedProcess, *parts: str) -> str:
    """The single line on stderr, checked to hold ``parts``, with exit code 2."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("make_shards: ")
    for part in parts:
        assert part in lines[0]
    return lines[0]


def test_the_input_folder_as_the_output_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _class_folders(data, {"cat": 12, "dog": 12})
    before = _tree(data)
    _one_error(_command(data, data), str(data), "overlap")
    assert _tree(data) == before and len(before) == 24


@pytest.mark.parametrize("where", ["inside the input", "around the input", "a link to it"])
def test_an_output_that_overlaps_the_input_is_refused(tmp_path: Path, capsys, where: str) -> None:
    data = tmp_path / "data"
    _class_folders(data / "train", {"cat": 15, "dog": 15})
    _class_folders(data / "val", {"cat": 2, "dog": 2})
    folder, out = {
        "inside the input": (data, data / "shards"),
        "around the input": (data / "train", data),
        "a link to it": (data, tmp_path / "link"),
    }[where]
    (tmp_path / "link").symlink_to(data)
    before = _tree(data)
    assert make_shards([str(folder), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "overlap" in err and "Traceback" not in err
    assert _tree(data) == before and len(before) == 34


def test_a_split_folder_holding_other_files_is_refused_and_only_ours_replaced(
    tmp_path: Path, capsys
) -> None:
    _class_folders(tmp_path / "data", {"cat": 10, "dog": 10})
    notes = tmp_path / "out" / "train" / "project" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    stale = tmp_path / "out" / "train" / "train-000007.tar"  # one of our names: replaced
    stale.write_bytes(b"an old shard")
    assert make_shards([str(tmp_path / "data"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and f"{notes.parents[1]} holds files" in err and "--overwrite" in err
    )
    assert notes.read_text() == "mine" and stale.read_bytes() == b"an old shard"
    assert not (tmp_path / "out" / "val").exists()  # nothing written before the refusal

    result = _command(tmp_path / "data", tmp_path / "out", "--overwrite", "--shard-size", "8")
    assert result.returncode == 0, result.stderr
    assert f"{notes.parents[1]}: kept 1 file that make_shards did not write (project)" in (
        result.stdout
    )
    assert notes.read_text() == "mine" and not stale.exists()
    train = tmp_path / "out" / "train"
    assert sorted(os.listdir(train)) == [
        SHARD_INDEX,
        "project",
        "train-000000.tar",
        "train-000001.tar",
    ]
    assert len(build_dataset("shards", root=tmp_path / "out", image_size=8)) == 16
    assert sorted(os.listdir(tmp_path / "out")) == ["train", "val"]


def test_a_finished_shard_set_of_ours_is_replaced_by_a_new_run(tmp_path: Path) -> None:
    _class_folders(tmp_path / "data", {"cat": 10, "dog": 10})
    out = tmp_path / "out"
    assert make_shards([str(tmp_path / "data"), str(out), "--shard-size", "3"]) == 0
    assert len(list((out / "train").glob("*.tar"))) == 6
    assert make_shards([str(tmp_path / "data"), str(out), "--shard-size", "8"]) == 0
    assert sorted(os.listdir(out / "train")) == [
        SHARD_INDEX,
        "train-000000.tar",
        "train-000001.tar",
    ]
    index = json.loads((out / "train" / SHARD_INDEX).read_text())
    assert sorted(index["shards"]) == ["train-000000.tar", "train-000001.tar"]
    assert sorted(os.listdir(out)) == ["train", "val"]  # no temporary folder left behind


def test_a_folder_beside_the_splits_is_not_taken_for_a_temporary_one(tmp_path: Path) -> None:
    _class_folders(tmp_path / "data", {"cat": 5, "dog": 5})
    kept = tmp_path / "out" / "train.partial" / "keep.txt"
    kept.parent.mkdir(parents=True)
    kept.write_text("mine")
    assert make_shards([str(tmp_path / "data"), str(tmp_path / "out")]) == 0
    assert kept.read_text() == "mine"


def _unreadable(monkeypatch, path: Path) -> None:
    """Opening ``path`` fails as a file without read permission does (tests run as root)."""
    real_open = builtins.open

    def refusing(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)


def test_an_unreadable_image_is_named_or_skipped_with_skip_bad(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    _class_folders(tmp_path / "data", {"cat": 10, "dog": 10})
    bad = tmp_path / "data" / "dog" / "3.jpg"
    _unreadable(monkeypatch, bad)
    assert make_shards([str(tmp_path / "data"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "--skip-bad" in err
    assert not (tmp_path / "out" / "train").exists() and not (tmp_path / "out" / "val").exists()
    assert os.listdir(tmp_path / "out") == []  # no temporary folder left behind

    assert make_shards([str(tmp_path / "data"), str(tmp_path / "out"), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "1 image that cannot be read skipped" in out and str(bad) in out
    sizes = [len(build_dataset("shards", root=tmp_path / "out", train=t)) for t in (True, False)]
    assert sum(sizes) == 19


def test_an_output_that_cannot_be_written_is_one_line(tmp_path: Path, capsys) -> None:
    _class_folders(tmp_path / "data", {"cat": 5, "dog": 5})
    (tmp_path / "file").write_text("not a folder")
    assert make_shards([str(tmp_path / "data"), str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("make_shards: ") and str(tmp_path / "file") in err
    assert (tmp_path / "file").read_text() == "not a folder"
