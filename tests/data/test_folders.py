"""Image folders: labelled or not, crops from the full image in workers, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.io import decode_image
from torchvision.transforms.v2 import functional as TF

from ssl_toolkit.data import CropViews, build_dataset, build_loader, find_images
from ssl_toolkit.data.folders import ImageFolderCenter


def _jpeg(path: Path, height: int, width: int, seed: int) -> None:
    """A smooth random RGB image (JPEG compresses it faithfully)."""
    low = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(seed))
    pixels = TF.resize(low, [height, width], antialias=True).mul(255).round().clamp(0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.to(torch.uint8).permute(1, 2, 0).numpy()).save(path, quality=95)


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
    resumed = loader()
    resumed.load_state_dict(state)
    tail = stream(resumed, 5)
    for got, want in zip(head + tail, straight, strict=True):
        assert torch.equal(got, want)
