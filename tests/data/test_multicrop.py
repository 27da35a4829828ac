"""Multi-crop: crops at several sizes, batched per size, each computed as it would be alone."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from optim import ConfigError
from ssl_toolkit.config import ExperimentConfig, load_config
from ssl_toolkit.data import (
    BYOLAugment,
    CropGroup,
    CropViews,
    MultiCropAugment,
    TwoViewAugment,
    ViewPolicy,
    build_dataset,
    crop_sizes,
)
from ssl_toolkit.data import functional as BF

SWAV_CROPS = [
    CropGroup(count=2, size=32, scale=(0.14, 1.0)),
    CropGroup(count=6, size=16, scale=(0.05, 0.14)),
]


def _images(batch: int = 24, size: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _swav_augment() -> MultiCropAugment:
    policy = ViewPolicy(blur_p=0.5, rotation=10.0, solarize_p=0.3)
    return TwoViewAugment(policy, policy).with_crops(SWAV_CROPS)


def test_crop_sizes_and_view_shapes_follow_the_groups() -> None:
    assert crop_sizes(SWAV_CROPS) == [32, 32, 16, 16, 16, 16, 16, 16]
    views = _swav_augment()(_images(), generator=_generator())
    assert [tuple(v.shape) for v in views] == [(24, 3, 32, 32)] * 2 + [(24, 3, 16, 16)] * 6
    assert [p.scale for p in _swav_augment().policies] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6


def test_views_batched_per_size_equal_each_view_augmented_alone() -> None:
    """Grouping the six local crops into one pass changes no pixel of any of them."""
    augment = _swav_augment()
    images = _images()
    params = augment.sample_params(24, (40, 40), _generator(3))
    together = augment.apply(images, params)
    for view, (policy, size) in enumerate(zip(augment.policies, augment.out_sizes, strict=True)):
        alone = MultiCropAugment([policy], out_sizes=size).apply(images, [params[view]])[0]
        torch.testing.assert_close(together[view], alone, rtol=0, atol=1e-6)


def test_cpu_chunks_give_the_views_of_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_toolkit.data import augment as augment_module

    augment = _swav_augment()
    images = _images(batch=40)
    params = augment.sample_params(40, (40, 40), _generator(4))
    whole = augment.apply(images, params)
    monkeypatch.setattr(augment_module, "_CPU_CHUNK_VALUES", 1)  # chunks of _MIN_CHUNK
    chunked = augment.apply(images, params)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_several_crops_in_one_grid_sample_are_each_crop_exactly() -> None:
    x = torch.rand(5, 3, 20, 24, generator=_generator())
    boxes = [torch.tensor([[1.0, 2.0, 10.0, 12.0]]).repeat(5, 1) + i for i in range(3)]
    flips = [torch.tensor([True, False, True, False, True]) ^ bool(i % 2) for i in range(3)]
    joined = BF.resized_crops(x, boxes, flips, (7, 9))
    single = torch.cat([BF.resized_crop(x, b, f, (7, 9)) for b, f in zip(boxes, flips)])
    assert torch.equal(joined, single)


def test_byol_views_are_two_crop_groups_with_their_own_probabilities() -> None:
    """BYOL's asymmetric blur 1.0 / 0.1 and solarisation 0 / 0.2 as crop groups of one each,
    on top of a policy with neither."""
    plain = BYOLAugment(32, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))
    crops = [
        CropGroup(count=1, size=32, scale=(0.08, 1.0), blur_p=1.0, solarize_p=0.0),
        CropGroup(count=1, size=32, scale=(0.08, 1.0), blur_p=0.1, solarize_p=0.2),
    ]
    images = _images(size=32)
    expected = BYOLAugment(32)(images, generator=_generator(5))
    got = plain.with_crops(crops)(images, generator=_generator(5))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_crops_beyond_the_methods_views_take_its_local_policy() -> None:
    local = ViewPolicy(blur_p=0.5)
    augment = MultiCropAugment(
        [ViewPolicy(blur_p=1.0), ViewPolicy(blur_p=0.1, solarize_p=0.2)], local_policy=local
    )
    augment.with_crops(SWAV_CROPS)
    assert [p.blur_p for p in augment.policies] == [1.0, 0.1] + [0.5] * 6
    assert [p.solarize_p for p in augment.policies] == [0.0, 0.2] + [0.0] * 6
    without = TwoViewAugment(ViewPolicy(blur_p=1.0), ViewPolicy(blur_p=0.1)).with_crops(SWAV_CROPS)
    assert [p.blur_p for p in without.policies] == [1.0] + [0.1] * 7


def test_multi_crop_views_are_a_function_of_the_generator_state() -> None:
    augment, images = _swav_augment(), _images()
    generator = _generator(7)
    state = generator.get_state()
    first = augment(images, generator=generator)
    after = generator.get_state()
    generator.set_state(state)
    again = augment(images, generator=generator)
    assert torch.equal(generator.get_state(), after)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[2], first[3])  # two local crops of one image differ


def test_pre_cropped_views_of_two_sizes_keep_their_crops() -> None:
    policy = ViewPolicy(**{"scale": (0.05, 0.1), "flip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0})
    augment = MultiCropAugment([policy, policy], out_sizes=[None, None])
    crops = (_images(8, 32).float() / 255, _images(8, 16, seed=1).float() / 255)
    views = augment(crops, generator=_generator())
    for crop, view in zip(crops, views, strict=True):
        std = augment.std.view(1, 3, 1, 1)
        torch.testing.assert_close(view * std + augment.mean.view(1, 3, 1, 1), crop)


def test_image_folder_workers_cut_every_crop_from_the_full_image(tmp_path) -> None:
    for i in range(3):
        pixels = torch.randint(0, 256, (50, 70, 3), generator=_generator(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / f"{i}.png")
    views = CropViews(size=24, seed=2, crops=tuple(SWAV_CROPS))
    dataset = build_dataset("imagefolder", root=tmp_path, views=views)
    crops, _ = dataset[(1, 0)]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6
    again, _ = dataset[(1, 0)]
    assert all(torch.equal(a, b) for a, b in zip(crops, again, strict=True))
    # Two crops of one group of the default size are the two views of before.
    two = build_dataset("imagefolder", root=tmp_path, views=CropViews(size=24, seed=2))
    same = CropViews(size=24, seed=2, crops=(CropGroup(count=2, size=24, scale=(0.08, 1.0)),))
    listed = build_dataset("imagefolder", root=tmp_path, views=same)
    assert all(torch.equal(a, b) for a, b in zip(two[(2, 1)][0], listed[(2, 1)][0], strict=True))


@pytest.mark.parametrize(
    ("crops", "message"),
    [
        (
            "[{count: 0, size: 32, scale: [0.2, 1.0]}]",
            "data.crops[0].count: Input should be greater than or equal to 1",
        ),
        (
            "[{count: 2, size: 32, scale: [0.6, 0.2]}]",
            "data.crops[0]: scale must satisfy 0 < low <= high <= 1",
        ),
        ("[{count: 2, size: 32, scale: [0.2, 1.0], blur: 0.5}]", "data.crops[0].blur"),
        ("[{count: 2, size: 4, scale: [0.2, 1.0]}]", "data.crops[0].size"),
        ("[]", "crops: an empty list"),
    ],
)
def test_bad_crop_groups_name_their_key(crops: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("swav_lars", [f"data.crops={crops}"])


def test_two_view_methods_refuse_more_crops(tmp_path) -> None:
    from ssl_toolkit.trainer import Trainer

    cfg = load_config(
        "simclr_lars",
        [
            "data.crops=[{count: 2, size: 32, scale: [0.3, 1.0]}, {count: 2, size: 16, "
            "scale: [0.1, 0.3]}]",
            "logging.wandb.mode=disabled",
            "trainer.device=cpu",
            f"trainer.output_dir={tmp_path}",
        ],
    )
    assert isinstance(cfg, ExperimentConfig)
    with pytest.raises(
        ConfigError, match=re.escape("data.crops: SimCLR takes 2 views, got 4 crops")
    ):
        Trainer(cfg)
