"""Batched per-sample image ops against torchvision's single-image functional ops."""

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from optim.op_count import count_ops
from ssl_toolkit.data import functional as BF

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def images():
    return torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(0))


FACTORS = [0.2, 0.5, 0.9, 1.0, 1.3, 1.8]


def _blend(scale, toward_mean, toward_gray):
    def run(x, factors):
        f = torch.as_tensor(factors, device=x.device)
        return BF.blend_(x, scale(f), toward_mean(f), toward_gray(f))

    return run


ZERO = torch.zeros_like


# torchvision's luma uses 0.2989 for red, ours the ITU-R 601 0.299: a 1e-4 relative difference.
@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (_blend(lambda f: f, ZERO, ZERO), TF.adjust_brightness, [0.2, 0.5, 0.9, 1.0, 1.3, 1.8]),
        (
            _blend(lambda f: f, lambda f: 1 - f, ZERO),
            TF.adjust_contrast,
            [0.2, 0.5, 1, 1.3, 1.8, 0],
        ),
        (
            _blend(lambda f: f, ZERO, lambda f: 1 - f),
            TF.adjust_saturation,
            [0, 0.5, 0.9, 1, 1.3, 1.8],
        ),
        (BF.adjust_hue_, TF.adjust_hue, [-0.5, -0.2, -0.01, 0.0, 0.1, 0.45]),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_colour_ops_match_torchvision_per_sample(device, images, ours, theirs, factors):
    batch = images.to(device).clone()
    out = ours(batch, torch.tensor(factors, device=device))
    assert out.data_ptr() == batch.data_ptr()  # in place
    out = out.cpu()
    expected = torch.stack([theirs(img, f) for img, f in zip(images, factors, strict=True)])
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=0)


def test_one_blend_applies_a_different_operation_to_each_sample(images):
    """Per sample: brightness 1.3, contrast 0.5, saturation 0.2, and the identity."""
    batch = images[:4]
    scale = torch.tensor([1.3, 0.5, 0.2, 1.0])
    out = BF.blend_(
        batch.clone(), scale, torch.tensor([0.0, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.8, 0.0])
    )
    expected = [
        TF.adjust_brightness(batch[0], 1.3),
        TF.adjust_contrast(batch[1], 0.5),
        TF.adjust_saturation(batch[2], 0.2),
    ]
    torch.testing.assert_close(out[:3], torch.stack(expected), atol=2e-4, rtol=0)
    assert torch.equal(out[3], batch[3])


def test_zero_hue_shift_leaves_samples_exactly_unchanged(images):
    out = BF.adjust_hue_(images.clone(), torch.tensor([0.0, 0.1, 0.0, -0.1, 0.0, 0.2]))
    unchanged = (out == images).flatten(1).all(1)
    assert unchanged.tolist() == [True, False, True, False, True, False]


def test_grayscale_only_where_applied(images):
    apply = torch.tensor([True, False, True, False, False, True])
    out = BF.to_grayscale_(images.clone(), apply)
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    for channel in range(3):
        torch.testing.assert_close(out[apply, channel], luma[apply])
    assert torch.equal(out[~apply], images[~apply])


def test_normalize_per_channel(images):
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.25, 2.0])
    out = BF.normalize(images, mean, std)
    torch.testing.assert_close(out[:, 1], (images[:, 1] - 0.2) / 0.25)
    torch.testing.assert_close(BF.normalize_(images.clone(), mean, std), out)


def test_hue_of_pure_colours():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(3, 3, 2, 2)
    out = BF.adjust_hue_(red.clone(), torch.tensor([1 / 3, -1 / 3, 0.5]))
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    torch.testing.assert_close(out[:, :, 0, 0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 9])
def test_gaussian_blur_matches_torchvision_per_sample(device, images, kernel_size):
    sigmas = [0.1, 0.5, 1.0, 1.5, 2.0, 0.3]
    out = BF.gaussian_blur(images.to(device), torch.tensor(sigmas, device=device), kernel_size)
    expected = torch.stack(
        [
            TF.gaussian_blur(img, [kernel_size, kernel_size], [s, s])
            for img, s in zip(images, sigmas, strict=True)
        ]
    )
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=0)


def test_gaussian_blur_leaves_unselected_samples_exactly_as_they_were(device, images):
    """Identity kernels instead of a gather of the selected samples: no host sync, and the
    others come back bit for bit."""
    images = images.to(device)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.3], device=device)
    apply = torch.tensor([True, False, True, False, False, True], device=device)
    out = BF.gaussian_blur(images, sigma, 9, apply=apply)
    assert torch.equal(out[~apply], images[~apply])
    torch.testing.assert_close(out[apply], BF.gaussian_blur(images[apply], sigma[apply], 9))
    assert count_ops(lambda: BF.gaussian_blur(images, sigma, 9, apply=apply)).syncs == 0


def test_gaussian_blur_needs_an_odd_kernel(images):
    with pytest.raises(ValueError, match="odd"):
        BF.gaussian_blur(images, torch.ones(6), 4)


def test_resized_crop_samples_the_box_bilinearly(device):
    # A horizontal ramp whose value is the column index: bilinear resampling of a linear
    # function is exact, so output column j must equal x0 + (j + 0.5) * w / out_w - 0.5.
    ramp = torch.arange(32.0).expand(2, 3, 32, 32).to(device)
    boxes = torch.tensor([[8.0, 4.0, 16.0, 16.0], [8.0, 4.0, 16.0, 16.0]], device=device)
    flip = torch.tensor([False, True], device=device)
    out = BF.resized_crop(ramp, boxes, flip, (16, 32)).cpu()
    columns = 8 + (torch.arange(32.0) + 0.5) * 16 / 32 - 0.5
    torch.testing.assert_close(out[0], columns.expand(3, 16, 32), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], columns.flip(0).expand(3, 16, 32), atol=1e-4, rtol=0)


def test_resized_crop_rows_follow_the_box(device):
    ramp = torch.arange(32.0).view(32, 1).expand(1, 3, 32, 32).to(device)
    boxes = torch.tensor([[0.0, 10.0, 32.0, 8.0]], device=device)
    out = BF.resized_crop(ramp, boxes, torch.tensor([False], device=device), (8, 8)).cpu()
    torch.testing.assert_close(out[0, 0, :, 0], torch.arange(10.0, 18.0), atol=1e-4, rtol=0)


def test_solarize_only_where_applied():
    x = torch.tensor([0.2, 0.5, 0.9]).view(1, 1, 1, 3).expand(2, 3, 1, 3)
    out = BF.solarize_(x.clone(), torch.tensor([True, False]), threshold=0.5)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.2, 0.5, 0.1]))
    torch.testing.assert_close(out[1], x[1])


@pytest.mark.parametrize("size, kernel", [(8, 3), (32, 3), (50, 5), (96, 9), (224, 23)])
def test_blur_kernel_is_a_tenth_of_the_side_rounded_down_to_odd(size, kernel):
    assert BF.blur_kernel_size((size, size + 10)) == kernel


def test_resized_crop_rotation_turns_the_content():
    images = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(5))
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0]] * 2)
    no_flip = torch.tensor([False, False])
    plain = BF.resized_crop(images, boxes, no_flip, (9, 9))
    torch.testing.assert_close(
        BF.resized_crop(images, boxes, no_flip, (9, 9), torch.zeros(2)), plain
    )
    quarter = BF.resized_crop(images, boxes, no_flip, (9, 9), torch.tensor([math.pi / 2] * 2))
    torch.testing.assert_close(quarter, images.rot90(-1, dims=(-2, -1)), atol=1e-5, rtol=0)
