"""Image folders: labelled or not, crops from the full image in workers, exact resume."""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import decode_image
from torchvision.transforms.v2 import functional as TF

from ssl_toolkit.data import (
    CropViews,
    DatasetNotFoundError,
    build_dataset,
    build_loader,
    find_images,
)
from ssl_toolkit.data.folders import (
    IMAGE_SUFFIXES,
    ImageFiles,
    ImageFolderCenter,
    ImageFolderViews,
    StaleIndexError,
)
from ssl_toolkit.data.loader import WorkerBatchLoader


def _pixels(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth random (H, W, 3) uint8 pixels, which lossy formats keep close to."""
    low = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(seed))
    pixels = TF.resize(low, [height, width], antialias=True).mul(255).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(1, 2, 0).numpy()


def _jpeg(path: Path, height: int, width: int, seed: int) -> None:
    """A smooth random RGB image (JPEG compresses it faithfully)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(height, width, seed)).save(path, quality=95)


def unlabelled_folder(root: Path, count: int = 40) -> Path:
    """``count`` JPEGs of mixed sizes directly in ``root``."""
    for i in range(count):
        _jpeg(root / f"img{i:03d}.jpg", 30 + 7 * (i % 5), 40 + 11 * (i % 3), seed=i)
    return root


def test_a_folder_without_class_folders_is_unlabelled(tmp_path: Path) -> None:
    files = find_images(unlabelled_folder(tmp_path, 6))
    assert not files.labelled and files.labels == [-1] * 6
    (tmp_path / "notes.txt").write_text("not an image")
    assert len(find_images(tmp_path).paths) == 6
    dataset = build_dataset("imagefolder", root=tmp_path, image_size=16)
    assert len(dataset) == 6 and (dataset.targets == -1).all()


def test_evaluation_resizes_the_shorter_side_then_crops_the_centre(tmp_path: Path) -> None:
    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    image[0, :, 20:60] = 255  # red in the middle 40 columns, black on both sides
    path = tmp_path / "a" / "x.png"
    path.parent.mkdir()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    dataset = ImageFolderCenter(find_images(tmp_path), size=28)
    out, label = dataset[0]
    assert out.shape == (3, 28, 28) and label == 0
    # 40 -> 32 px high, 80 -> 64 px wide; the centre 28 columns are all inside the red band.
    expected = TF.center_crop(TF.resize(image, [32], antialias=True), [28, 28])
    assert torch.equal(out, expected)
    assert out[0].float().mean() > 250 and out[1:].max() == 0


def test_pretraining_views_are_crops_of_the_full_image(tmp_path: Path) -> None:
    unlabelled_folder(tmp_path, 4)
    views = CropViews(size=24, scale=(0.2, 1.0), seed=3)
    dataset = build_dataset("imagefolder", root=tmp_path, views=views)
    (a, b), label = dataset[(1, 0)]
    assert a.shape == b.shape == (3, 24, 24) and a.dtype == torch.uint8 and label == -1
    assert not torch.equal(a, b), "two independent crops"
    again, _ = dataset[(1, 0)]
    assert torch.equal(again[0], a) and torch.equal(again[1], b)
    later, _ = dataset[(1, 1)]
    assert not torch.equal(later[0], a), "other crops in another epoch"
    # Scale 1 at the image's own aspect ratio: the crop is the whole image, resized.
    aspect = (40 + 11) / (30 + 7)  # image 1 is 37 x 51
    whole = CropViews(size=24, scale=(1.0, 1.0), ratio=(aspect, aspect))
    (c, _), _ = build_dataset("imagefolder", root=tmp_path, views=whole)[(1, 0)]
    original = decode_image(str(find_images(tmp_path).paths[1]))
    assert torch.equal(c, TF.resize(original, [24, 24], antialias=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_loader_resumes_at_any_batch(tmp_path: Path, workers: int) -> None:
    unlabelled_folder(tmp_path, 20)
    dataset = build_dataset("imagefolder", root=tmp_path, views=CropViews(16, seed=1))

    def loader():
        generator = torch.Generator().manual_seed(7)
        return build_loader(dataset, 4, generator=generator, num_workers=workers)

    def stream(source, count):
        batches = []
        while len(batches) < count:
            for (a, _), _ in source:
                batches.append(a)
                if len(batches) == count:
                    break
        return batches

    straight = stream(loader(), 12)  # 5 batches per epoch: into the third epoch
    first = loader()
    head = stream(first, 7)
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)
    assert (first.epoch, first.position) == (1, 2)  # of the batches handed out
    resumed = loader()
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (1, 2)
    tail = stream(resumed, 5)
    for got, want in zip(head + tail, straight, strict=True):
        assert torch.equal(got, want)


# --- one class index for every split -----------------------------------------------------------


def _class_folders(root: Path, counts: dict[str, int]) -> None:
    """``counts[name]`` small JPEGs in ``root / name`` for every class name."""
    for c, (name, count) in enumerate(counts.items()):
        for i in range(count):
            _jpeg(root / name / f"{i}.jpg", 12, 16, seed=100 * c + i)


def test_val_is_numbered_by_the_class_names_of_train(tmp_path: Path) -> None:
    _class_folders(tmp_path / "train", {"cat": 2, "dog": 2, "emu": 2})
    _class_folders(tmp_path / "val", {"dog": 1, "emu": 2})
    train = build_dataset("imagefolder", root=tmp_path, image_size=8)
    val = build_dataset("imagefolder", root=tmp_path, train=False, image_size=8)
    assert train.classes == val.classes == ["cat", "dog", "emu"]
    assert val.targets.tolist() == [1, 2, 2]  # dog is 1 and emu 2, as in train
    for path, label in zip(val.files.paths, val.targets.tolist(), strict=True):
        assert train.classes[label] == Path(path).parent.name


@pytest.mark.parametrize(
    "val, message",
    [
        ({"dog": 1, "yak": 1, "zebu": 1}, "has classes that {train} lacks: yak, zebu"),
        ({"": 2}, "{val} has no class sub-folders, but {train} has 2"),
    ],
)
def test_a_val_split_that_does_not_match_train_is_an_error(
    tmp_path: Path, val: dict[str, int], message: str
) -> None:
    _class_folders(tmp_path / "train", {"cat": 2, "dog": 2})
    _class_folders(tmp_path / "val", val)
    build_dataset("imagefolder", root=tmp_path, image_size=8)  # train alone is fine
    expected = message.format(train=tmp_path / "train", val=tmp_path / "val")
    with pytest.raises(DatasetNotFoundError, match=re.escape(expected)) as info:
        build_dataset("imagefolder", root=tmp_path, train=False, image_size=8)
    assert str(tmp_path / "val") in str(info.value)


def test_train_without_val_is_split_80_20_inside_train(tmp_path: Path) -> None:
    _class_folders(tmp_path / "train", {"cat": 5, "dog": 10})
    train = build_dataset("imagefolder", root=tmp_path, image_size=8)
    val = build_dataset("imagefolder", root=tmp_path, train=False, image_size=8)
    assert train.classes == val.classes == ["cat", "dog"]
    # 80% of 5 and of 10 train, the other 1 and 2 are held out; no image is in both.
    assert sorted(val.targets.tolist()) == [0, 1, 1] and len(train) == 4 + 8
    assert not set(train.files.paths) & set(val.files.paths)
    assert sorted(train.files.paths + val.files.paths) == find_images(tmp_path / "train").paths
    for dataset in (train, val):
        for path, label in zip(dataset.files.paths, dataset.targets.tolist(), strict=True):
            assert dataset.classes[label] == Path(path).parent.name


def test_an_image_outside_its_label_s_class_folder_is_a_stale_listing(tmp_path: Path) -> None:
    """A label is its class folder's name: read against a listing that says otherwise, an
    image is one error naming it (not skipped as a bad image), in a worker as in the main
    process."""
    _class_folders(tmp_path, {"cat": 2, "dog": 2})
    files = find_images(tmp_path)
    assert files.labels == [0, 0, 1, 1]
    ImageFolderCenter(files, 8)[0]
    stale = dataclasses.replace(files, labels=[0, 1, 1, 1])
    expected = f"{tmp_path / 'cat' / '1.jpg'} is listed in the class 'dog', but it is not in "
    with pytest.raises(StaleIndexError, match=re.escape(expected)):
        ImageFolderCenter(stale, 8)[1]
    views = ImageFolderViews(stale, CropViews(size=8))
    loader = WorkerBatchLoader(views, 4, shuffle=False, num_workers=1, skip_bad=True)
    with pytest.raises(StaleIndexError, match=re.escape(expected)) as info:
        list(loader)
    assert "\n" not in str(info.value) and str(info.value).endswith("is stale")


def test_val_without_train_is_an_error_naming_what_is_missing(tmp_path: Path) -> None:
    _class_folders(tmp_path / "val", {"cat": 2, "dog": 2})
    for train in (True, False):
        with pytest.raises(DatasetNotFoundError, match="has no train/ beside it") as info:
            build_dataset("imagefolder", root=tmp_path, train=train, image_size=8)
        assert str(tmp_path / "train") in str(info.value)


# --- nothing unreadable is left out without a word ---------------------------------------------


@pytest.mark.parametrize("dangling", ["emu", "cat/broken.jpg"])
def test_a_symbolic_link_to_nothing_is_an_error_naming_it(tmp_path: Path, dangling: str) -> None:
    _class_folders(tmp_path, {"cat": 3, "dog": 3})
    (tmp_path / dangling).symlink_to(tmp_path / "gone")
    with pytest.raises(OSError, match=re.escape(f"cannot read {tmp_path / dangling}")):
        find_images(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / dangling))):
        build_dataset("imagefolder", root=tmp_path, image_size=8)


def test_a_folder_that_cannot_be_listed_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _class_folders(tmp_path, {"cat": 3, "dog": 3})
    locked, scandir = tmp_path / "dog", os.scandir

    def refuse_dog(path):  # what a folder without read permission does (tests run as root)
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_dog)
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("imagefolder", root=tmp_path, image_size=8)
    assert f"cannot list the folder {locked}: Permission denied" in str(info.value)


def test_a_symbolic_link_loop_is_an_error_naming_it(tmp_path: Path) -> None:
    _class_folders(tmp_path, {"cat": 3, "dog": 3})
    (tmp_path / "dog" / "again").symlink_to(tmp_path / "dog")
    with pytest.raises(OSError, match=re.escape(f"cannot read {tmp_path / 'dog' / 'again'}")):
        find_images(tmp_path)


def test_a_symbolic_link_to_a_folder_is_followed(tmp_path: Path) -> None:
    _class_folders(tmp_path / "elsewhere", {"more": 2})
    _class_folders(tmp_path / "root", {"cat": 1, "dog": 1})
    dog = tmp_path / "root" / "dog"
    (dog / "more").symlink_to(tmp_path / "elsewhere" / "more")
    files = find_images(tmp_path / "root")
    assert files.labels == [0, 1, 1, 1]
    assert files.paths[1:] == [
        str(dog / "0.jpg"),
        str(dog / "more" / "0.jpg"),
        str(dog / "more" / "1.jpg"),
    ]


# --- formats -----------------------------------------------------------------------------------


def _center(path: Path, size: int = 28) -> torch.Tensor:
    """The evaluation crop of the one image ``path``."""
    return ImageFolderCenter(ImageFiles([str(path)], [-1], [], str(path.parent)), size)[0][0]


def _expected_center(pixels: np.ndarray, size: int = 28) -> torch.Tensor:
    """The evaluation crop of (H, W, 3) uint8 ``pixels``, done here on the known pixels."""
    image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
    return TF.center_crop(TF.resize(image, [round(size / 0.875)], antialias=True), [size, size])


def test_every_supported_suffix_is_listed_and_decodes(tmp_path: Path) -> None:
    for i, suffix in enumerate(sorted(IMAGE_SUFFIXES)):
        image = Image.fromarray(_pixels(32, 40, seed=i))
        (image.convert("L") if suffix == ".pgm" else image).save(tmp_path / f"{i}{suffix}")
    files = find_images(tmp_path)
    assert sorted(Path(path).suffix for path in files.paths) == sorted(IMAGE_SUFFIXES)
    for path in map(Path, files.paths):
        with Image.open(path) as image:  # PIL's reading of the file it wrote
            expected = _expected_center(np.array(image.convert("RGB")))
        assert torch.equal(_center(path), expected), path.suffix


def test_files_in_image_formats_not_read_are_counted_in_one_warning(tmp_path: Path) -> None:
    _class_folders(tmp_path, {"cat": 2, "dog": 2})
    for name in ("cat/a.heic", "dog/b.HEIC", "dog/deeper/c.avif"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"\x00" * 16)
    (tmp_path / "dog" / "notes.txt").write_text("not an image, not a word about it")
    with pytest.warns(RuntimeWarning) as record:
        files = find_images(tmp_path)
    assert len(files.paths) == 4
    assert [str(w.message).split(";")[0] for w in record] == [
        f"3 files with unsupported suffixes (.avif, .heic) ignored in {tmp_path}"
    ]


def _png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG of (H, W, 3) uint16 ``pixels``, chunk by chunk (PIL writes 16 bits
    for grayscale only)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, RGB
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_16_bit_images_keep_their_high_byte(tmp_path: Path) -> None:
    values = np.random.default_rng(0).integers(0, 65536, (32, 32, 3)).astype(np.uint16)
    values[0, 0], values[0, 1] = 0, 65535
    high = (values >> 8).astype(np.uint8)  # 65535 -> 255, 256 -> 1, 255 -> 0
    for suffix in (".png", ".tif"):
        Image.fromarray(values[..., 0]).save(tmp_path / f"gray{suffix}")
        with Image.open(tmp_path / f"gray{suffix}") as written:
            assert written.mode == "I;16"
        gray = np.repeat(high[..., :1], 3, axis=2)
        assert torch.equal(_center(tmp_path / f"gray{suffix}"), _expected_center(gray)), suffix
    _png16(tmp_path / "rgb.png", values)
    assert torch.equal(_center(tmp_path / "rgb.png"), _expected_center(high))


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_the_exif_orientation_is_applied(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"turned{suffix}"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(_pixels(32, 48, seed=1)).save(path, exif=exif)
    with Image.open(path) as image:
        upright = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    assert upright.shape == (48, 32, 3)
    assert torch.equal(_center(path), _expected_center(upright))


def test_an_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((200, 40, 40), (20, 20, 220))]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    first = _center(tmp_path / "moving.gif")
    assert first.shape == (3, 28, 28)
    assert first[:, 0, 0].tolist() == [200, 40, 40] and (first == first[:, :1, :1]).all()
