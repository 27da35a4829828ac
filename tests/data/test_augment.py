"""Two-view augmentations: shapes, ranges, probabilities, determinism, hand-checked outputs."""

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from ssl_toolkit.data import BYOLAugment, SimCLRAugment, TwoViewAugment, ViewPolicy
from ssl_toolkit.data import augment as augment_module
from ssl_toolkit.data.augment import IMAGENET_MEAN, IMAGENET_STD

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
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
# Everything off: a full-image crop, no flip, no colour change.
IDENTITY = {
    "scale": (1.0, 1.0),
    "ratio": (1.0, 1.0),
    "flip_p": 0.0,
    "jitter_p": 0.0,
    "gray_p": 0.0,
}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def _generator(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


def _images(device, batch=16, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=generator, dtype=torch.uint8)
    return images.to(device)


def _normalize(x):
    return (x - MEAN.to(x.device)) / STD.to(x.device)


@pytest.mark.parametrize("augment_cls", [SimCLRAugment, BYOLAugment])
def test_shapes_dtypes_and_value_range(device, augment_cls):
    augment = augment_cls(generator=_generator(device))
    views = augment(_images(device))
    assert len(views) == 2
    low, high = _normalize(torch.zeros(1, 3, 1, 1)), _normalize(torch.ones(1, 3, 1, 1))
    for view in views:
        assert view.shape == (16, 3, 32, 32)
        assert view.dtype == torch.float32
        assert view.device == device
        assert torch.all(view.cpu() >= low - 1e-5)
        assert torch.all(view.cpu() <= high + 1e-5)
    assert not torch.allclose(views[0], views[1])


def test_out_size_and_float_input(device):
    augment = BYOLAugment(out_size=24)
    images = _images(device, batch=4, size=40)
    from_uint8 = augment(images, generator=_generator(device))
    from_float = augment(images.float() / 255, generator=_generator(device))
    assert from_uint8[0].shape == (4, 3, 24, 24)
    for a, b in zip(from_uint8, from_float, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_same_seed_same_views_different_seed_different_views(device):
    images = _images(device)
    augment = SimCLRAugment(out_size=96)
    first = augment(images, generator=_generator(device, 3))
    again = augment(images, generator=_generator(device, 3))
    other = augment(images, generator=_generator(device, 4))
    for a, b, c in zip(first, again, other, strict=True):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_generator_state_resumes_the_stream(device):
    images = _images(device, batch=4)
    augment = SimCLRAugment()
    generator = _generator(device, 9)
    augment(images, generator=generator)
    saved = generator.get_state()
    expected = augment(images, generator=generator)
    generator.set_state(saved)
    for a, b in zip(augment(images, generator=generator), expected, strict=True):
        assert torch.equal(a, b)


def test_a_generator_is_required():
    with pytest.raises(ValueError, match="generator"):
        SimCLRAugment()(_images("cpu", batch=2))


def _frequency(mask):
    return mask.float().mean().item()


def test_simclr_probabilities_over_4096_samples(device):
    augment = SimCLRAugment()
    for size, blur in ((32, 0.0), (96, 0.5)):
        views = augment.sample_params(4096, (size, size), _generator(device, size))
        for params in views:
            assert _frequency(params.flip) == pytest.approx(0.5, abs=0.03)
            assert _frequency(params.jitter) == pytest.approx(0.8, abs=0.03)
            assert _frequency(params.gray) == pytest.approx(0.2, abs=0.03)
            assert _frequency(params.blur) == pytest.approx(blur, abs=0.03)
            assert _frequency(params.solarize) == 0.0
        assert not torch.equal(views[0].flip, views[1].flip)


def test_byol_asymmetric_probabilities_over_4096_samples(device):
    view1, view2 = BYOLAugment().sample_params(4096, (32, 32), _generator(device))
    assert _frequency(view1.blur) == 1.0
    assert _frequency(view2.blur) == pytest.approx(0.1, abs=0.03)
    assert _frequency(view1.solarize) == 0.0
    assert _frequency(view2.solarize) == pytest.approx(0.2, abs=0.03)
    for params in (view1, view2):
        assert _frequency(params.flip) == pytest.approx(0.5, abs=0.03)
        assert _frequency(params.jitter) == pytest.approx(0.8, abs=0.03)
        assert _frequency(params.gray) == pytest.approx(0.2, abs=0.03)


@pytest.mark.parametrize(
    ("augment", "strengths"),
    [(SimCLRAugment(), (0.8, 0.8, 0.8, 0.2)), (BYOLAugment(), (0.4, 0.4, 0.2, 0.1))],
)
def test_jitter_factors_are_uniform_per_sample(device, augment, strengths):
    params, _ = augment.sample_params(4096, (32, 32), _generator(device))
    factors = (params.brightness, params.contrast, params.saturation)
    for values, strength in zip(factors, strengths, strict=False):
        assert values.min() >= 1 - strength
        assert values.max() <= 1 + strength
        assert values.mean().item() == pytest.approx(1.0, abs=0.02)
        assert values.std().item() == pytest.approx(2 * strength / math.sqrt(12), rel=0.05)
    hue = strengths[3]
    assert params.hue.abs().max() <= hue
    assert params.hue.std().item() == pytest.approx(2 * hue / math.sqrt(12), rel=0.05)
    assert params.blur_sigma.min() >= 0.1
    assert params.blur_sigma.max() <= 2.0


@pytest.mark.parametrize("image_size", [(32, 32), (24, 64), (64, 20)])
def test_crop_boxes_respect_scale_ratio_and_image(device, image_size):
    params, _ = SimCLRAugment().sample_params(4096, image_size, _generator(device))
    height, width = image_size
    x0, y0, w, h = params.boxes.cpu().unbind(1)
    assert torch.all(x0 >= 0) and torch.all(y0 >= 0)
    assert torch.all(x0 + w <= width + 1e-4) and torch.all(y0 + h <= height + 1e-4)
    area = w * h / (height * width)
    aspect = w / h
    # Up to the fallback box (the largest centred box with a clamped ratio).
    assert area.min() >= 0.08 - 1e-5
    assert area.max() <= 1 + 1e-5
    assert aspect.min() >= 3 / 4 - 1e-5
    assert aspect.max() <= 4 / 3 + 1e-5
    assert area.std() > 0.05  # boxes differ per sample
    assert torch.unique(params.boxes, dim=0).shape[0] > 3000


def test_identity_policy_reproduces_the_normalized_input(device):
    policy = ViewPolicy(**IDENTITY)
    images = _images(device)
    view1, view2 = TwoViewAugment(policy, policy)(images, generator=_generator(device))
    expected = _normalize(images.float() / 255)
    torch.testing.assert_close(view1, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(view2, expected, atol=1e-5, rtol=0)


def test_flip_only_mirrors_the_image(device):
    policy = ViewPolicy(**(IDENTITY | {"flip_p": 1.0}))
    images = _images(device)
    view, _ = TwoViewAugment(policy, policy)(images, generator=_generator(device))
    torch.testing.assert_close(view, _normalize(images.flip(-1).float() / 255), atol=1e-5, rtol=0)


def test_grayscale_of_a_known_colour(device):
    policy = ViewPolicy(**(IDENTITY | {"gray_p": 1.0}))
    colour = torch.tensor([200, 100, 50], dtype=torch.uint8, device=device)
    images = colour.view(1, 3, 1, 1).expand(2, 3, 8, 8).contiguous()
    view, _ = TwoViewAugment(policy, policy)(images, generator=_generator(device))
    grey = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255
    expected = _normalize(torch.full((2, 3, 8, 8), grey))
    torch.testing.assert_close(view.cpu(), expected, atol=1e-5, rtol=0)


def test_solarize_inverts_bright_pixels(device):
    policy = ViewPolicy(**(IDENTITY | {"solarize_p": 1.0}))
    images = torch.tensor([0, 64, 127, 128, 200, 255], dtype=torch.uint8, device=device)
    images = images.view(1, 1, 1, 6).expand(1, 3, 6, 6).contiguous()
    view, _ = TwoViewAugment(policy, policy)(images, generator=_generator(device))
    values = torch.tensor([0, 64, 127, 255 - 128, 255 - 200, 0]) / 255
    torch.testing.assert_close(view.cpu(), _normalize(values.expand(1, 3, 6, 6)))


def test_blur_changes_only_the_selected_samples(device):
    images = _images(device, batch=32, size=96)
    blurred = SimCLRAugment(blur_p=0.5)
    plain = SimCLRAugment(blur_p=0.0)
    params = blurred.sample_params(32, (96, 96), _generator(device))
    for with_blur, without, p in zip(
        blurred.apply(images, params), plain.apply(images, params), params, strict=True
    ):
        same = (with_blur == without).flatten(1).all(1).cpu()
        assert torch.equal(same, ~p.blur.cpu())


def test_cpu_and_device_agree_on_the_same_parameters(device):
    images = _images("cpu", batch=8, size=96)
    augment = BYOLAugment(solarize_p=(0.5, 0.5), blur_p=(0.5, 0.5))
    params = augment.sample_params(8, (96, 96), _generator("cpu"))
    on_cpu = augment.apply(images, params)
    on_device = augment.to(device).apply(images.to(device), params)
    for a, b in zip(on_cpu, on_device, strict=True):
        # Solarisation can flip pixels within rounding of the threshold, hence the mean check.
        assert (a - b.cpu()).abs().mean() < 1e-4


def test_chunked_cpu_path_matches_whole_batches(monkeypatch):
    images = _images("cpu", batch=12)
    augment = BYOLAugment(solarize_p=(0.5, 0.5), blur_p=(0.5, 0.5))
    params = augment.sample_params(12, (32, 32), _generator("cpu"))
    monkeypatch.setattr(augment_module, "_CPU_CHUNK_VALUES", 1 << 30)
    whole = augment.apply(images, params)
    monkeypatch.setattr(augment_module, "_CPU_CHUNK_VALUES", 1)
    monkeypatch.setattr(augment_module, "_MIN_CHUNK", 5)  # chunks of 5, 5 and 2 samples
    chunked = augment.apply(images, params)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_invalid_policy_values():
    with pytest.raises(ValueError, match="gray_p"):
        ViewPolicy(gray_p=1.5)
    with pytest.raises(ValueError, match="scale"):
        ViewPolicy(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="hue"):
        ViewPolicy(jitter=(0.4, 0.4, 0.4, 0.6))


def test_rejects_non_image_batches():
    with pytest.raises(ValueError, match="B, 3, H, W"):
        SimCLRAugment()(torch.zeros(2, 1, 8, 8), generator=_generator("cpu"))
    with pytest.raises(TypeError, match="uint8"):
        SimCLRAugment()(torch.zeros(2, 3, 8, 8, dtype=torch.int32), generator=_generator("cpu"))


def test_colour_jitter_runs_in_each_images_own_random_order():
    """Every sample against torchvision's ops applied one by one in that sample's order."""
    policy = ViewPolicy(jitter=(0.6, 0.6, 0.6, 0.2), jitter_p=0.75)
    params = augment_module._sample_view(policy, 64, (12, 12), (12, 12), _generator("cpu", 3))
    images = torch.rand(64, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    out = images.clone()
    augment_module._color_jitter_(out, params, policy)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(64):
        expected = images[i]
        if params.jitter[i]:
            factors = (params.brightness, params.contrast, params.saturation, params.hue)
            for op in params.jitter_order[i].tolist():
                expected = ops[op](expected, factors[op][i].item())
        torch.testing.assert_close(out[i], expected, atol=5e-4, rtol=0, msg=str(i))
    assert not params.jitter.all() and params.jitter.any()


def test_jitter_orders_are_uniform_permutations():
    params, _ = SimCLRAugment().sample_params(4800, (32, 32), _generator("cpu"))
    orders = params.jitter_order
    assert torch.equal(orders.sort(dim=1).values, torch.arange(4).expand(4800, 4))
    counts = torch.unique(orders, dim=0, return_counts=True)[1]
    assert len(counts) == 24  # every permutation occurs, each about 200 times
    assert counts.min() > 140 and counts.max() < 260


def test_overrides_change_both_views_and_rotation_draws_angles():
    augment = BYOLAugment(32).with_overrides(flip_p=0.0, jitter_p=0.0, rotation=15.0)
    assert [p.flip_p for p in augment.policies] == [0.0, 0.0]
    assert [p.blur_p for p in augment.policies] == [1.0, 0.1]  # untouched
    params, _ = augment.sample_params(2048, (32, 32), _generator("cpu"))
    degrees = params.angle * 180 / math.pi
    assert degrees.abs().max() <= 15.0 and degrees.std().item() == pytest.approx(
        30 / math.sqrt(12), rel=0.05
    )
    assert not params.flip.any() and not params.jitter.any()
    with pytest.raises(ValueError, match="rotation"):
        BYOLAugment(32).with_overrides(rotation=200.0)
