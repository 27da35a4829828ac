"""Decoding on the device (``data.decode: cuda``): the workers read bytes, the main process
decodes and crops; on CPU the very crops the workers cut, on CUDA within the JPEG decoders'
rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from ssl_toolkit.cli import main
from ssl_toolkit.data import BadImageError, CropGroup, CropViews, build_dataset, build_loader
from ssl_toolkit.data.device_decode import DeviceViews, orient
from tests.data.test_folders import _jpeg, _pixels

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _exif_jpeg(path: Path, orientation: int, seed: int) -> None:
    image = Image.fromarray(_pixels(24, 40, seed))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_an_image_as_the_cpu_decoder_does(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "x.jpg"
    _exif_jpeg(path, orientation, seed=orientation)
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    upright = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    plain = decode_jpeg(data, mode=ImageReadMode.RGB)
    assert torch.equal(orient(plain, orientation), upright)
    assert (upright.shape == plain.shape) == (orientation <= 4)


def _folder(root: Path) -> Path:
    """An unlabelled folder of JPEGs (two with an EXIF turn) and a PNG."""
    for i in range(5):
        _jpeg(root / f"{i}.jpg", 30 + 3 * i, 40, seed=i)
    _exif_jpeg(root / "turned6.jpg", 6, seed=10)
    _exif_jpeg(root / "turned3.jpg", 3, seed=11)
    Image.fromarray(_pixels(36, 28, 12)).save(root / "flat.png")
    return root


def _batches(root: Path, decode: str, crops=None) -> list:
    views = CropViews(size=16, seed=2, decode=decode, crops=crops)
    dataset = build_dataset("imagefolder", root=root, views=views)
    loader = build_loader(dataset, 4, generator=torch.Generator().manual_seed(0), num_workers=2)
    return [images for images, _ in loader], views


@pytest.mark.parametrize(
    "crops",
    [
        None,
        (CropGroup(count=2, size=16, scale=(0.3, 1)), CropGroup(count=3, size=8, scale=(0.1, 0.4))),
    ],
)
def test_decoding_in_the_main_process_cuts_the_crops_the_workers_cut(tmp_path: Path, crops) -> None:
    root = _folder(tmp_path / "data")
    in_workers, _ = _batches(root, "cpu", crops)
    encoded, views = _batches(root, "cuda", crops)  # only the bytes are read in the workers
    assert isinstance(encoded[0].data[0], bytes) and encoded[0].uniforms.shape[0] == 4
    on_cpu = DeviceViews(views, "cpu")  # the main-process path, on the CPU
    assert len(in_workers) == len(encoded) == 2
    for expected, batch in zip(in_workers, encoded, strict=True):
        got = on_cpu(batch)
        assert len(got) == len(expected) == (2 if crops is None else 5)
        for a, b in zip(expected, got, strict=True):
            assert torch.equal(a, b)


def test_a_batch_without_a_jpeg_decodes_too(tmp_path: Path) -> None:
    for i in range(4):
        Image.fromarray(_pixels(20 + i, 30, seed=i)).save(tmp_path / f"{i}.png")
    in_workers, _ = _batches(tmp_path, "cpu")
    encoded, views = _batches(tmp_path, "cuda")
    for expected, got in zip(in_workers[0], DeviceViews(views, "cpu")(encoded[0]), strict=True):
        assert torch.equal(expected, got)


def test_a_broken_jpeg_is_named(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    (root / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    encoded, views = _batches(root, "cuda")
    with pytest.raises(BadImageError, match=r"cannot decode the image .*3\.jpg: "):
        for batch in encoded:
            DeviceViews(views, "cpu")(batch)


@pytest.mark.cuda
@CUDA
def test_cuda_decoding_matches_cpu_decoding_within_jpeg_rounding(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    in_workers, _ = _batches(root, "cpu")
    encoded, views = _batches(root, "cuda")
    on_gpu = DeviceViews(views, "cuda")
    for expected, batch in zip(in_workers, encoded, strict=True):
        for a, b in zip(expected, on_gpu(batch), strict=True):
            assert b.device.type == "cuda" and b.shape == a.shape
            difference = (a.int() - b.cpu().int()).abs()
            # nvjpeg and libjpeg-turbo round their IDCT and chroma upsampling differently.
            assert difference.float().mean() < 2.0 and difference.max() <= 24


def _run(tmp_path: Path, *overrides: str) -> int:
    return main(
        [
            "--config",
            "simclr_lars",
            "model.backbone=timm/test_resnet",
            "logging.wandb.mode=disabled",
            "trainer.max_steps=1",
            f"trainer.output_dir={tmp_path / 'run'}",
            *overrides,
        ]
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
def test_cuda_decoding_without_cuda_is_a_config_error(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "data")
    code = _run(tmp_path, "data.name=imagefolder", f"data.root={root}", "data.decode=cuda")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "data.decode: cuda needs the run on a CUDA device; it runs on cpu" in err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.decode=cuda"], "'digits' is held in memory"),
        (
            ["data.name=imagefolder", "data.root=x", "data.decode=cuda", "data.skip_bad=true"],
            "skip_bad needs decode: cpu",
        ),
        (["data.decode=gpu"], "data.decode"),
    ],
)
def test_decoding_keys_that_cannot_work_are_config_errors(
    tmp_path: Path, capsys, overrides, message
) -> None:
    assert _run(tmp_path, *overrides) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
