"""Listing image folders: no stat per file, the order of ``Path`` sorting, and the kept index
that a later start reads while no folder of the tree has changed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from ssl_toolkit.data import listing
from ssl_toolkit.data.listing import INDEX_SUFFIX, find_images

DAY_NS = 86_400 * 10**9


def _tree(root: Path, classes: dict[str, list[str]]) -> Path:
    """Empty image files (a listing does not open them) under class folders."""
    for name, files in classes.items():
        for file in files:
            (root / name / file).parent.mkdir(parents=True, exist_ok=True)
            (root / name / file).touch()
    return root


def _age(root: Path) -> None:
    """Every folder of the tree last modified a day ago, as a dataset at rest is."""
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        mtime = os.stat(folder).st_mtime_ns - DAY_NS
        os.utime(folder, ns=(mtime, mtime))


def _beside(root: Path) -> Path:
    return root.parent / f".{root.name}{INDEX_SUFFIX}"


def _no_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path):
        raise AssertionError(f"listed {path} although the index is current")

    monkeypatch.setattr(os, "scandir", refuse)


def test_folders_are_listed_without_a_stat_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path / "data", {c: [f"{i}.jpg" for i in range(20)] for c in "abc"})
    stat, stats = os.stat, []
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: stats.append(path) or stat(path, *a, **k))
    files = find_images(root)
    assert len(files.paths) == 60 and files.labels == [0] * 20 + [1] * 20 + [2] * 20
    assert sorted(map(str, stats)) == sorted(str(root / c) for c in ["", *"abc"])


def test_the_order_is_that_of_sorted_paths(tmp_path: Path) -> None:
    names = ["b.jpg", "a.b.jpg", "a/b.jpg", "a/a.jpg", "A.jpg", "a-c.jpg", "z/0.jpg"]
    root = _tree(tmp_path / "data", {"cls": names})
    expected = sorted(root / "cls" / name for name in names)
    assert find_images(root).paths == [str(path) for path in expected]


def test_a_kept_index_is_read_while_no_folder_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path / "data", {"cat": ["0.jpg", "1.png"], "dog": ["deep/2.jpg", "3.jpg"]})
    _age(root)
    first = find_images(root)
    assert _beside(root).is_file()
    with monkeypatch.context() as patch:
        _no_listing(patch)
        assert find_images(root) == first


@pytest.mark.parametrize(
    "change",
    [
        lambda root: (root / "cat" / "new.jpg").touch(),  # an image added to a class
        lambda root: (root / "dog" / "deep" / "2.jpg").unlink(),  # one removed, deeper down
        lambda root: (root / "dog" / "3.jpg").rename(root / "dog" / "4.jpg"),  # one renamed
        lambda root: _tree(root, {"emu": ["5.jpg"]}),  # a class added
    ],
)
def test_a_changed_folder_makes_the_index_stale(tmp_path: Path, change) -> None:
    root = _tree(tmp_path / "data", {"cat": ["0.jpg", "1.png"], "dog": ["deep/2.jpg", "3.jpg"]})
    _age(root)
    find_images(root)
    change(root)
    fresh = listing._list(str(root))[0]
    assert find_images(root) == fresh
    assert sorted(fresh.paths) == sorted(
        str(p) for p in root.rglob("*") if p.is_file() and p.suffix in {".jpg", ".png"}
    )


def test_a_folder_changed_moments_ago_is_not_trusted_to_an_index(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", {"cat": ["0.jpg"], "dog": ["1.jpg"]})
    find_images(root)  # just written: a second change in the same tick would go unseen
    assert not _beside(root).exists()
    _age(root)
    find_images(root)
    assert _beside(root).exists()


def test_the_index_goes_to_index_dir_when_beside_is_not_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path / "data", {"cat": ["0.jpg"], "dog": ["1.jpg"]})
    _age(root)
    run_dir = tmp_path / "run"
    original = tempfile.mkstemp

    def read_only_parent(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path:  # as a read-only file system would
            raise PermissionError(13, "Read-only file system", str(dir))
        return original(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_parent)
    first = find_images(root, index_dir=run_dir)
    kept = list(run_dir.glob(f"listing-*{INDEX_SUFFIX}"))
    assert not _beside(root).exists() and len(kept) == 1
    assert not list(tmp_path.glob("*.tmp")) and not list(run_dir.glob("*.tmp"))
    _no_listing(monkeypatch)
    assert find_images(root, index_dir=run_dir) == first


def test_an_unreadable_or_foreign_index_is_ignored_and_replaced(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", {"cat": ["0.jpg"], "dog": ["1.jpg"]})
    _age(root)
    expected = find_images(root)
    for text in ("{not json", json.dumps({"version": 1, "folder": "/elsewhere"}), "[]"):
        _beside(root).write_text(text)
        assert find_images(root) == expected
        assert json.loads(_beside(root).read_text())["folder"] == str(root.resolve())


def test_a_cached_start_still_warns_of_unsupported_formats(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", {"cat": ["0.jpg", "a.heic"], "dog": ["1.jpg"]})
    _age(root)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match=r"1 files with unsupported suffixes \(\.heic\)"):
            find_images(root)
    assert _beside(root).exists()


def test_an_unlabelled_folder_is_kept_too(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for i in range(5):
        (root / f"{i}.jpg").touch()
    _age(root)
    first = find_images(root)
    assert first.labels == [-1] * 5 and not first.classes
    _no_listing(monkeypatch)
    assert find_images(root) == first


def test_suffixes_are_read_as_os_path_splitext_reads_them(tmp_path: Path) -> None:
    names = [".jpg", "..jpg", "a.jpg", ".a.JPG", "x", "x.", "a.b.png", "._x.jpg", "y.txt"]
    root = _tree(tmp_path / "data", {"cls": names})
    listed = {Path(path).name for path in find_images(root).paths}
    assert listed == {n for n in names if os.path.splitext(n)[1].lower() in {".jpg", ".png"}}
    assert listed == {"a.jpg", ".a.JPG", "a.b.png", "._x.jpg"}
