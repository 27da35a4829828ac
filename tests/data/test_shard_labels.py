"""What a shard holds is checked when it is indexed: members that one WebDataset key joins
into a sample with two images or labels, and labels that are not classes, are one line naming
``SHARD:KEY`` and exit code 2, before a run trains to fail (or to fill the memory) at the
probes; the class count comes from the labels present, or from ``data.num_classes``."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from ssl_toolkit.cli import main
from ssl_toolkit.data import DatasetNotFoundError, build_dataset
from tests.data.test_shards import _tar, sharded


def _jpeg(tmp_path: Path) -> bytes:
    """The bytes of one small JPEG, from shards that make_shards wrote."""
    shard = next((sharded(tmp_path / "source", {"a": 1, "b": 1}, 5) / "train").glob("*.tar"))
    with tarfile.open(shard) as tar:
        return tar.extractfile(next(m for m in tar if m.name.endswith(".jpg"))).read()


def _shards(root: Path, samples: list[dict[str, bytes]]) -> Path:
    """``root``, a folder of shards of 10 samples from ``samples`` (member names after the key
    ``sNN``, as ``{".jpg": ..., ".cls": b"3"}``)."""
    root.mkdir(parents=True)
    for start in range(0, len(samples), 10):
        members = {
            f"s{i:02d}{suffix}": data
            for i, sample in enumerate(samples[start : start + 10], start)
            for suffix, data in sample.items()
        }
        _tar(root / f"part-{start // 10}.tar", members)
    return root


def _labelled(jpeg: bytes, labels: list[int | None]) -> list[dict[str, bytes]]:
    """One sample per label: an image and, unless ``None``, its ``.cls``."""
    return [{".jpg": jpeg} | ({} if c is None else {".cls": str(c).encode()}) for c in labels]


def test_two_images_of_one_key_are_an_error_not_one_sample(tmp_path: Path) -> None:
    jpeg = _jpeg(tmp_path)
    # 20 images as s00.v0.jpg, s00.v1.jpg, ...: by the key rule, 10 samples of two images.
    root = _shards(tmp_path / "wds", [{".v0.jpg": jpeg, ".v1.jpg": jpeg, ".cls": b"0"}] * 5)
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("shards", root=root, image_size=8)
    message = str(info.value)
    assert message.startswith(f"{root / 'part-0.tar'}:s00: one sample with 2 images ")
    assert "s00.v0.jpg, s00.v1.jpg" in message and "\n" not in message


@pytest.mark.parametrize(
    "members,what",
    [
        ({"s00.jpg": b"", "s00.cls": b"0", "s00.x.cls": b"1"}, "one sample with 2 labels"),
        ({"s00.jpg": b"", "s01.jpg": b"", "s00.cls": b"1"}, "the key comes back"),
        ({"s00.jpg": b"", "s00.cls": b"cat"}, "the label b'cat' is not a whole number"),
        ({"s00.jpg": b"", "s00.cls": b"-3"}, "the label -3 is negative"),
    ],
)
def test_a_sample_laid_out_wrongly_is_named_as_shard_and_key(
    tmp_path: Path, members: dict[str, bytes], what: str
) -> None:
    jpeg = _jpeg(tmp_path)
    (tmp_path / "wds").mkdir()
    _tar(tmp_path / "wds" / "bad.tar", {n: d or jpeg for n, d in members.items()})
    # Not a shard that cannot be read: data.skip_bad does not leave it out.
    with pytest.raises(DatasetNotFoundError, match=f"^{tmp_path / 'wds' / 'bad.tar'}:s00: {what}"):
        build_dataset("shards", root=tmp_path / "wds", image_size=8, skip_bad=True)


def test_the_class_count_comes_from_the_labels_present(tmp_path: Path) -> None:
    jpeg = _jpeg(tmp_path)
    root = _shards(tmp_path / "wds", _labelled(jpeg, [0, 1, 2] * 4))
    assert build_dataset("shards", root=root, image_size=8).classes == ["0", "1", "2"]
    gaps = _shards(tmp_path / "gaps", _labelled(jpeg, [0, 5, 7] * 4))
    with pytest.raises(
        DatasetNotFoundError, match=r"the label 5 is not a class; the labels count 3"
    ):
        build_dataset("shards", root=gaps, image_size=8)
    declared = build_dataset("shards", root=gaps, image_size=8, num_classes=8)
    assert declared.classes == [str(c) for c in range(8)]
    assert sorted(set(declared.targets.tolist())) == [0, 5, 7]
    with pytest.raises(DatasetNotFoundError, match=r"label 7 is not a class; data.num_classes=6"):
        build_dataset("shards", root=gaps, image_size=8, num_classes=6)


def test_val_labels_beyond_the_classes_of_train_are_an_error(tmp_path: Path) -> None:
    jpeg = _jpeg(tmp_path)
    _shards(tmp_path / "split" / "train", _labelled(jpeg, [0, 1] * 3))
    _shards(tmp_path / "split" / "val", _labelled(jpeg, [0, 1, 2]))
    with pytest.raises(DatasetNotFoundError, match=r"val/part-0\.tar:s02: the label 2 is not"):
        build_dataset("shards", root=tmp_path / "split", train=False, image_size=8)


def _pretrain(tmp_path: Path, root: Path, *overrides: str) -> int:
    """The command line on the shards at ``root``: a tiny SimCLR, one epoch, on the CPU."""
    return main(
        [
            "--config",
            "simclr_lars",
            "model.backbone=timm/test_resnet",
            "method.projector={hidden_dim: 32, out_dim: 16}",
            "data.name=shards",
            f"data.root={root}",
            "data.batch_size=4",
            "data.image_size=16",
            "data.num_workers=0",
            "eval.labels_per_class=1",
            "eval.knn_k=3",
            "logging.wandb.mode=disabled",
            "trainer.device=cpu",
            "trainer.epochs=1",
            f"trainer.output_dir={tmp_path / 'run'}",
            *overrides,
        ]
    )


@pytest.mark.parametrize(
    "labels,expected",
    [
        ([0, 1] * 9 + [-3, 1], "part-1.tar:s18: the label -3 is negative"),
        ([0, 1] * 9 + [None, 1], "part-1.tar:s18: the sample has no label (.cls member), but"),
        ([0, 1] * 9 + [99999999999, 1], "part-1.tar:s18: the label 99999999999 is not a class"),
    ],
)
def test_the_command_line_stops_before_training_naming_the_bad_label(
    tmp_path: Path, capsys, labels: list[int | None], expected: str
) -> None:
    root = _shards(tmp_path / "wds", _labelled(_jpeg(tmp_path), labels))
    assert _pretrain(tmp_path, root) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and expected in errors[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()  # not one step trained


def test_the_command_line_stops_at_a_sample_of_two_images(tmp_path: Path, capsys) -> None:
    jpeg = _jpeg(tmp_path)
    root = _shards(tmp_path / "wds", _labelled(jpeg, [0, 1] * 10))
    _tar(root / "part-2.tar", {"x.0.jpg": jpeg, "x.1.jpg": jpeg, "x.cls": b"1"})
    assert _pretrain(tmp_path, root) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{root / 'part-2.tar'}:x: one sample with 2 images" in errors[0]


@pytest.mark.slow
def test_declared_classes_train_and_probe_labels_with_gaps(tmp_path: Path, capsys) -> None:
    root = _shards(tmp_path / "wds", _labelled(_jpeg(tmp_path), [0, 5, 7] * 8))
    assert _pretrain(tmp_path, root) == 2
    err = capsys.readouterr().err
    assert "the labels count 3 classes" in err and "data.num_classes" in err
    assert _pretrain(tmp_path, root, "data.num_classes=8", "eval.baseline=false") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "error" not in summary["probes"] and 0.0 <= summary["linear_top1"] <= 1.0


@pytest.mark.parametrize(
    "override,expected",
    [
        ("data.num_classes=0", "data.num_classes: Input should be greater than 0"),
        ("data.name=digits", "num_classes: declares the classes of shards; 'digits' has its own"),
    ],
)
def test_num_classes_is_a_positive_count_for_shards_only(
    tmp_path: Path, capsys, override: str, expected: str
) -> None:
    root = _shards(tmp_path / "wds", _labelled(_jpeg(tmp_path), [0, 1] * 4))
    assert _pretrain(tmp_path, root, "data.num_classes=2", override) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in err
    assert not (tmp_path / "run" / "checkpoints").exists()
