"""Images that do not decode: one error naming the file, from the workers too, or skipped."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from ssl_toolkit.cli import USAGE_ERRORS, main
from ssl_toolkit.data import (
    BadImageError,
    CropViews,
    DatasetNotFoundError,
    build_dataset,
    build_loader,
    folders,
)
from tests.data.test_folders import _jpeg, _pixels


def _encoded(image_format: str) -> bytes:
    """A 64 x 64 image as a file of ``image_format`` holds it."""
    buffer = io.BytesIO()
    Image.fromarray(_pixels(64, 64, seed=0)).save(buffer, format=image_format)
    return buffer.getvalue()


BROKEN = {
    "truncated.jpg": lambda: _encoded("JPEG")[: len(_encoded("JPEG")) // 2],
    "garbage.jpg": lambda: b"these bytes are no image at all" * 4,
    "empty.jpg": lambda: b"",
    "truncated.png": lambda: _encoded("PNG")[:60],
    "header-only.gif": lambda: b"GIF89a" + b"\x00" * 8,
    "truncated.webp": lambda: _encoded("WEBP")[:40],
    "garbage.bmp": lambda: b"BM not really a bitmap" * 4,
    "truncated.tif": lambda: _encoded("TIFF")[:200],
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_an_image_that_does_not_decode_is_one_line_naming_it(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(BROKEN[name]())
    _jpeg(tmp_path / "fine.jpg", 20, 20, seed=0)
    dataset = build_dataset("imagefolder", root=tmp_path, image_size=8)
    index = dataset.files.paths.index(str(path))
    with pytest.raises(BadImageError) as info:
        dataset[index]
    message = str(info.value)
    assert info.value.path == path
    assert message.startswith(f"cannot decode the image {path}: {info.value.reason} (")
    assert "\n" not in message and ".cpp" not in message and info.value.reason
    assert isinstance(info.value, USAGE_ERRORS)  # the command line exits 2 with this line


def _coloured_folder(root: Path, count: int, bad: set[int]) -> list[Path]:
    """``count`` flat 16 x 16 PNGs whose red channel is 10 x their index, but the ``bad``
    ones, which hold bytes that do not decode."""
    paths = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = root / f"{i:02d}.png"
        if i in bad:
            path.write_bytes(b"not a png" * 8)
        else:
            Image.new("RGB", (16, 16), (10 * i, 0, 0)).save(path)
        paths.append(path)
    return paths


def _indices(images: torch.Tensor) -> list[int]:
    """The folder indices of a batch of :func:`_coloured_folder` images."""
    return (images[:, 0, 0, 0] // 10).tolist()


def test_the_worker_loader_stops_at_a_bad_image_with_its_error(tmp_path: Path) -> None:
    paths = _coloured_folder(tmp_path, 12, bad={7})
    dataset = build_dataset("imagefolder", root=tmp_path, image_size=8)
    loader = build_loader(dataset, 4, shuffle=False, num_workers=2)
    seen = []
    with pytest.raises(BadImageError) as info:
        for images, _ in loader:
            seen += _indices(images)
    assert seen == [0, 1, 2, 3], "the batches before the bad one"
    assert type(info.value) is BadImageError and info.value.path == paths[7]
    assert str(info.value) == str(BadImageError(paths[7], info.value.reason))
    assert "DataLoader" not in str(info.value) and "Traceback" not in str(info.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_fills_each_place_with_the_next_good_image(tmp_path: Path, workers: int) -> None:
    paths = _coloured_folder(tmp_path, 10, bad={3, 4, 9})
    dataset = build_dataset("imagefolder", root=tmp_path, image_size=8)
    loader = build_loader(dataset, 5, shuffle=False, num_workers=workers, skip_bad=True)
    batches = [_indices(images) for images, _ in loader]
    # 3 and 4 take 5's image; 9, the last, wraps around to 0's.
    assert batches == [[0, 1, 2, 5, 5], [5, 6, 7, 8, 0]]
    assert loader.skipped == [str(paths[3]), str(paths[4]), str(paths[9])]
    assert [_indices(images) for images, _ in loader] == batches, "the next epoch, the same"
    assert len(loader.skipped) == 3, "each file listed once"


def test_skip_bad_crops_the_next_image_as_its_own_in_pretraining(tmp_path: Path) -> None:
    for i in range(8):
        _jpeg(tmp_path / f"{i}.jpg", 24, 30, seed=i)
    (tmp_path / "2.jpg").write_bytes(b"")
    dataset = build_dataset("imagefolder", root=tmp_path, views=CropViews(12, seed=5))
    loader = build_loader(dataset, 4, shuffle=False, num_workers=2, skip_bad=True)
    for epoch in range(2):  # fresh crops every epoch, of 3.jpg in the place of 2.jpg
        ((a, b), _), _ = list(loader)
        (want_a, want_b), _ = dataset[(3, epoch)]
        assert torch.equal(a[2], want_a) and torch.equal(b[2], want_b)
    assert loader.skipped == [str(tmp_path / "2.jpg")]


def test_skip_bad_with_no_image_that_decodes_is_one_error(tmp_path: Path) -> None:
    _coloured_folder(tmp_path, 3, bad={0, 1, 2})
    dataset = build_dataset("imagefolder", root=tmp_path, image_size=8)
    loader = build_loader(dataset, 2, shuffle=False, num_workers=0, skip_bad=True)
    with pytest.raises(DatasetNotFoundError, match="none of the 3 images decodes"):
        next(iter(loader))


def test_the_command_line_exits_2_naming_the_bad_image(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    paths = _coloured_folder(tmp_path / "images", 40, bad={13})
    code = main(
        [
            "--config",
            "simclr_lars",
            "model.backbone=timm/test_resnet",
            "method.projector={hidden_dim: 32, out_dim: 16}",
            "data.name=imagefolder",
            f"data.root={tmp_path / 'images'}",
            "data.batch_size=8",
            "data.image_size=16",
            "data.num_workers=2",
            "logging.wandb.mode=disabled",
            "trainer.device=cpu",
            "trainer.max_steps=10",
            f"trainer.output_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err
    assert len(errors) == 1 and errors[0].startswith(
        f"error: cannot decode the image {paths[13]}: "
    )
    assert err.endswith(errors[0] + "\n"), "the last line"


def test_a_file_that_cannot_be_read_is_named_but_a_failing_disk_is_not_blamed_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    locked, flaky = tmp_path / "locked.jpg", tmp_path / "flaky.jpg"
    for seed, path in enumerate((locked, flaky)):
        _jpeg(path, 20, 20, seed=seed)

    def read(path, *args, **kwargs):
        if Path(path) == locked:  # as chmod 000 would, were the tests not run as root
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        if Path(path) == flaky:  # an I/O error of the file system: retrying may succeed
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(folders, "open", read, raising=False)
    dataset = build_dataset("imagefolder", root=tmp_path, image_size=8)
    with pytest.raises(BadImageError) as info:
        dataset[dataset.files.paths.index(str(locked))]
    assert str(info.value).startswith(
        f"cannot decode the image {locked}: it cannot be read (Permission denied)"
    )
    with pytest.raises(OSError) as info:
        dataset[dataset.files.paths.index(str(flaky))]
    assert not isinstance(info.value, BadImageError) and info.value.errno == errno.EIO
