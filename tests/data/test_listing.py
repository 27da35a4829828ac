"""Listing image folders: no stat per file, the order of ``Path`` sorting, and the kept index,
a hint that is used only when it passes its own checks and matches a fresh walk of the tree."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
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


def _folders(root: Path) -> list[Path]:
    return [root, *(p for p in root.rglob("*") if p.is_dir())]


def _age(root: Path) -> None:
    """Every folder of the tree last modified a day ago, as a dataset at rest is."""
    for folder in _folders(root):
        mtime = os.stat(folder).st_mtime_ns - DAY_NS
        os.utime(folder, ns=(mtime, mtime))


def _times(root: Path) -> dict[Path, tuple[int, int]]:
    return {f: (os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns) for f in _folders(root)}


def _put_back(times: dict[Path, tuple[int, int]]) -> None:
    """The folders' times as they were, as ``touch -r``, ``tar x`` and ``rsync -a`` leave them."""
    for folder, ns in times.items():
        if folder.exists():
            os.utime(folder, ns=ns)


def _index_files(tmp_path: Path, cache: Path) -> list[Path]:
    """Every listing index in the test's folders and its cache, wherever it was kept."""
    return sorted({*tmp_path.rglob(f"*{INDEX_SUFFIX}"), *cache.rglob(f"*{INDEX_SUFFIX}")})


def _edit(place: Path, change) -> None:
    """Apply ``change`` to the index at ``place``; sealed again when it carries a checksum (the
    SHA-256 of its content as sorted, compact JSON), so that only the other checks stand."""
    index = json.loads(place.read_text())
    sealed = index.pop("checksum", None) is not None
    change(index)
    if sealed:
        text = json.dumps(index, separators=(",", ":"), sort_keys=True)
        index["checksum"] = hashlib.sha256(text.encode()).hexdigest()
    place.write_text(json.dumps(index))


def _not_sorted_again(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self):
        raise AssertionError("sorted again although the index is current")

    monkeypatch.setattr(listing._Found, "sorted_images", refuse)


CATS_AND_DOGS = {"cat": ["0.jpg", "1.png"], "dog": ["deep/2.jpg", "3.jpg"]}


def test_folders_are_listed_without_a_stat_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path / "data", {c: [f"{i}.jpg" for i in range(20)] for c in "abc"})
    stat, stats = os.stat, []
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: stats.append(path) or stat(path, *a, **k))
    for _ in range(2):  # listed afresh, then checked against the index
        files = find_images(root)
        assert len(files.paths) == 60 and files.labels == [0] * 20 + [1] * 20 + [2] * 20
    monkeypatch.undo()
    assert not [path for path in stats if os.path.isfile(path)]


def test_the_order_is_that_of_sorted_paths(tmp_path: Path) -> None:
    names = ["b.jpg", "a.b.jpg", "a/b.jpg", "a/a.jpg", "A.jpg", "a-c.jpg", "z/0.jpg"]
    root = _tree(tmp_path / "data", {"cls": names})
    expected = sorted(root / "cls" / name for name in names)
    for _ in range(2):
        assert find_images(root).paths == [str(path) for path in expected]


def test_the_index_is_kept_in_the_user_cache_or_index_dir_never_beside_the_data(
    tmp_path: Path, _own_index_cache: Path
) -> None:
    root = _tree(tmp_path / "share" / "data", CATS_AND_DOGS)
    _age(root)
    before = sorted(os.listdir(tmp_path / "share"))
    find_images(root)
    assert sorted(os.listdir(tmp_path / "share")) == before == ["data"]
    assert len(list(_own_index_cache.glob(f"listing-*{INDEX_SUFFIX}"))) == 1
    chosen = tmp_path / "indexes"
    find_images(root, index_dir=chosen)
    assert len(list(chosen.glob(f"listing-*{INDEX_SUFFIX}"))) == 1
    assert sorted(os.listdir(tmp_path / "share")) == ["data"]


def test_a_kept_index_is_used_while_it_matches_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path / "data", CATS_AND_DOGS)
    first = find_images(root)
    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("error")
        _not_sorted_again(patch)
        assert find_images(root) == first
    order = ["cat/0.jpg", "cat/1.png", "dog/3.jpg", "dog/deep/2.jpg"]  # Path order
    assert first.paths == [str(root / path) for path in order]
    assert first.labels == [0, 0, 1, 1] and first.classes == ["cat", "dog"]


@pytest.mark.parametrize(
    "change",
    [
        lambda root: (root / "cat" / "new.jpg").touch(),  # an image added to a class
        lambda root: (root / "dog" / "deep" / "2.jpg").unlink(),  # one removed, deeper down
        lambda root: (root / "dog" / "3.jpg").rename(root / "dog" / "4.jpg"),  # one renamed
        lambda root: (root / "dog" / "3.jpg").rename(root / "cat" / "3.jpg"),  # one moved
        lambda root: _tree(root, {"emu": ["5.jpg"]}),  # a class added
    ],
)
@pytest.mark.parametrize("times_put_back", [False, True])
def test_a_changed_folder_is_listed_afresh_whatever_its_times_say(
    tmp_path: Path, change, times_put_back: bool
) -> None:
    root = _tree(tmp_path / "data", CATS_AND_DOGS)
    _age(root)
    find_images(root)
    times = _times(root)
    change(root)
    if times_put_back:
        _put_back(times)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stale index is replaced without a word
        found = find_images(root)
    assert found == listing._sorted_listing(str(root), listing._walk_tree(str(root)))
    images = sorted(str(p) for p in root.rglob("*") if p.is_file())
    assert sorted(found.paths) == images
    for path, label in zip(found.paths, found.labels, strict=True):
        assert Path(path).relative_to(root).parts[0] == found.classes[label]


@pytest.mark.parametrize(
    "outside", ["../private/c0/img000.png", "../../../etc/passwd", "/etc/passwd", "c0/../x.png"]
)
def test_an_index_naming_a_path_outside_the_folder_is_refused(
    tmp_path: Path, _own_index_cache: Path, outside: str
) -> None:
    root = _tree(tmp_path / "data", {"c0": ["img000.png", "img001.png"], "c1": ["img002.png"]})
    _tree(tmp_path / "private", {"c0": ["img000.png"]})
    _age(root)
    expected = find_images(root)
    (index,) = _index_files(tmp_path, _own_index_cache)
    _edit(index, lambda content: content["paths"].__setitem__(0, outside))
    with pytest.warns(RuntimeWarning, match=rf"ignoring the index {index}: .* afresh") as caught:
        found = find_images(root)
    assert len([w for w in caught if "ignoring the index" in str(w.message)]) == 1
    assert found == expected
    assert all(Path(p).resolve().is_relative_to(root.resolve()) for p in found.paths)


def _shift_counts(content: dict) -> None:
    content["counts"] = [content["counts"][0] + 1, content["counts"][1] - 1]


def _rename_class(content: dict) -> None:
    content["classes"] = ["cat", "lion"]


def _swap_classes(content: dict) -> None:
    content["classes"] = content["classes"][::-1]


def _drop_an_image(content: dict) -> None:
    content["paths"].pop()
    content["counts"][-1] -= 1


@pytest.mark.parametrize(
    "edit,refused",
    [(_shift_counts, True), (_rename_class, True), (_swap_classes, True), (_drop_an_image, False)],
)
def test_edited_counts_classes_or_paths_are_not_taken_as_given(
    tmp_path: Path, _own_index_cache: Path, edit, refused: bool
) -> None:
    """Sealed again, an edit that breaks the index's own checks is refused with a warning;
    one that leaves a consistent index of other images is stale, and listed afresh."""
    root = _tree(tmp_path / "data", CATS_AND_DOGS)
    _age(root)
    expected = find_images(root)
    (index,) = _index_files(tmp_path, _own_index_cache)
    _edit(index, edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = find_images(root)
    named = [w for w in caught if f"ignoring the index {index}: " in str(w.message)]
    assert len(named) == (1 if refused else 0) and len(caught) == len(named)
    assert found == expected
    assert found.classes == ["cat", "dog"] and found.labels == [0, 0, 1, 1]


def test_an_edit_without_a_new_checksum_is_named_as_such(
    tmp_path: Path, _own_index_cache: Path
) -> None:
    root = _tree(tmp_path / "data", CATS_AND_DOGS)
    expected = find_images(root)
    (index,) = _index_files(tmp_path, _own_index_cache)
    content = json.loads(index.read_text())
    content["classes"] = ["dog", "cat"]
    index.write_text(json.dumps(content))
    with pytest.warns(RuntimeWarning, match="its checksum does not match its content"):
        assert find_images(root) == expected


def test_huge_counts_are_refused_before_any_label_is_built(
    tmp_path: Path, _own_index_cache: Path
) -> None:
    root = _tree(tmp_path / "data", CATS_AND_DOGS)
    _age(root)
    expected = find_images(root)
    (index,) = _index_files(tmp_path, _own_index_cache)
    _edit(index, lambda content: content.__setitem__("counts", [10**12, 2]))
    with pytest.warns(RuntimeWarning, match=r"counts adding up to 1000000000002 do not fit"):
        assert find_images(root) == expected


@pytest.mark.parametrize("text", ["{not json", '{"version": 2}', "[]", ""])
def test_an_unreadable_or_foreign_index_is_refused_and_replaced(
    tmp_path: Path, _own_index_cache: Path, text: str
) -> None:
    root = _tree(tmp_path / "data", CATS_AND_DOGS)
    expected = find_images(root)
    (index,) = _index_files(tmp_path, _own_index_cache)
    index.write_text(text)
    with pytest.warns(RuntimeWarning, match=f"ignoring the index {index}"):
        assert find_images(root) == expected
    assert json.loads(index.read_text())["folder"] == str(root.resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_images(root) == expected


def test_an_index_of_another_folder_is_refused(tmp_path: Path, _own_index_cache: Path) -> None:
    root = _tree(tmp_path / "data", CATS_AND_DOGS)
    expected = find_images(root)
    (index,) = _index_files(tmp_path, _own_index_cache)
    _edit(index, lambda content: content.__setitem__("folder", "/elsewhere"))
    with pytest.warns(RuntimeWarning, match="it lists '/elsewhere'"):
        assert find_images(root) == expected


def test_a_cached_start_still_warns_of_unsupported_formats(
    tmp_path: Path, _own_index_cache: Path
) -> None:
    root = _tree(tmp_path / "data", {"cat": ["0.jpg", "a.heic"], "dog": ["1.jpg"]})
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match=r"1 files with unsupported suffixes \(\.heic\)"):
            find_images(root)
    assert len(_index_files(tmp_path, _own_index_cache)) == 1


def test_an_unlabelled_folder_is_kept_too(tmp_path: Path, monkeypatch, _own_index_cache) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for i in range(5):
        (root / f"{i}.jpg").touch()
    first = find_images(root)
    assert first.labels == [-1] * 5 and not first.classes
    assert len(_index_files(tmp_path, _own_index_cache)) == 1
    _not_sorted_again(monkeypatch)
    assert find_images(root) == first


def test_suffixes_are_read_as_os_path_splitext_reads_them(tmp_path: Path) -> None:
    names = [".jpg", "..jpg", "a.jpg", ".a.JPG", "x", "x.", "a.b.png", "._x.jpg", "y.txt"]
    root = _tree(tmp_path / "data", {"cls": names})
    listed = {Path(path).name for path in find_images(root).paths}
    assert listed == {n for n in names if os.path.splitext(n)[1].lower() in {".jpg", ".png"}}
    assert listed == {"a.jpg", ".a.JPG", "a.b.png", "._x.jpg"}


def _run_directory(folder: Path, marker: str) -> None:
    """A run directory of the toolkit, with the pictures a run writes."""
    folder.mkdir(parents=True)
    if marker == "lock":
        (folder / ".run.lock").write_text("123\n")
    else:
        (folder / "config.yaml").write_text("{}\n")
        (folder / "checkpoints").mkdir()
    (folder / "report.png").touch()
    (folder / "trust_ratios.png").touch()


@pytest.mark.parametrize("marker", ["lock", "config and checkpoints"])
def test_a_run_directory_is_never_listed_as_data(tmp_path: Path, marker: str) -> None:
    unlabelled = tmp_path / "unlabelled"
    for i in range(3):
        _tree(unlabelled, {".": [f"{i}.jpg"]})
    _run_directory(unlabelled / "runs" / "simclr", marker)
    files = find_images(unlabelled)
    assert not files.labelled and files.paths == [str(unlabelled / f"{i}.jpg") for i in range(3)]
    labelled = _tree(tmp_path / "labelled", CATS_AND_DOGS)
    _run_directory(labelled / "run", marker)
    _run_directory(labelled / "cat" / "run", marker)
    files = find_images(labelled)
    assert files.classes == ["cat", "dog"] and len(files.paths) == 4


def test_a_folder_with_a_config_but_no_checkpoints_is_data(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", {"cat": ["0.jpg", "config.yaml"], "dog": ["1.jpg"]})
    (root / "dog" / "checkpoints").touch()  # a file of that name, not a run's folder
    (root / "dog" / "config.yaml").touch()
    assert find_images(root).classes == ["cat", "dog"]
