"""Multi-view augmentations (SimCLR's and BYOL's two views, multi-crop) that run on whole
batches, on any device.

Per-image augmentation pipelines in DataLoader workers are the bottleneck of contrastive
pretraining on small images. Here a (B, 3, H, W) batch is augmented with a fixed number of
tensor ops, each sample with its own random parameters. Parameters are drawn in
:meth:`MultiCropAugment.sample_params` and applied in :meth:`MultiCropAugment.apply`;
``forward`` does both. Randomness comes only from an explicit ``torch.Generator``, so the same
generator state gives the same views and a run resumes exactly once the trainer restores the
generator (``generator.get_state()`` / ``generator.set_state()``).

Pipeline per view, in this order: random resized crop and horizontal flip (one
``grid_sample``), colour jitter applied with probability ``jitter_p`` (brightness, contrast,
saturation and hue in a random order per image, as torchvision's ``ColorJitter``), grayscale,
Gaussian blur, solarize, normalisation. The views of one output size (both views of SimCLR,
the six local crops of SwAV) go through these steps together, as one batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch import Tensor

from ssl_toolkit.data import functional as BF

if TYPE_CHECKING:
    from ssl_toolkit.data.crops import CropGroup

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Candidate boxes per sample for the random resized crop, as torchvision tries 10 times.
_CROP_TRIES = 10
CROP_UNIFORMS = 2 * _CROP_TRIES + 2
"""Uniform draws one crop box takes (:func:`sample_crop_boxes`)."""
# On CPU, views are computed in chunks of about this many output values (8 MiB of float32):
# the ~40 passes over a chunk then mostly hit cache. At 96 px this measured 1.6x faster than
# whole batches of 256; a batch of 256 at 32 px is a single chunk. Chunks keep at least
# _MIN_CHUNK samples to bound the Python overhead for large images.
_CPU_CHUNK_VALUES = 1 << 21
_MIN_CHUNK = 16


@dataclass(frozen=True)
class ViewPolicy:
    """Augmentation strengths and probabilities for one view.

    ``jitter`` is (brightness, contrast, saturation, hue): factors are drawn uniformly from
    [max(0, 1 - v), 1 + v] for the first three and the hue shift from [-v, v] turns, as in
    torchvision's ColorJitter. Blur is skipped for outputs smaller than ``blur_min_size`` pixels
    (SimCLR does not blur CIFAR-sized images); its kernel is 10% of the output side, made odd.
    ``rotation`` turns each crop by an angle uniform in [-rotation, rotation] degrees (0: none,
    the papers' setting; small angles suit data such as handwritten digits).
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_min_size: int = 0
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    rotation: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"{name} must be a probability in [0, 1], got {getattr(self, name)}"
                )
        if not 0.0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must satisfy 0 < low <= high, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")
        if min(self.jitter) < 0.0 or self.jitter[3] > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 with hue <= 0.5, got {self.jitter}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        if not 0.0 <= self.rotation <= 180.0:
            raise ValueError(f"rotation must be in [0, 180] degrees, got {self.rotation}")


@dataclass(frozen=True)
class ViewParams:
    """Random parameters drawn for one view of a batch; every field has the batch size first.

    ``boxes`` is (B, 4) as (x0, y0, width, height) in input pixels; boolean fields say whether a
    step is applied to a sample; ``brightness``, ``contrast``, ``saturation`` and ``hue`` are the
    jitter factors, drawn for every sample and used only where ``jitter`` is set;
    ``jitter_order`` (B, 4) is a permutation of (brightness, contrast, saturation, hue) per
    sample: the order its jitter operations run in.
    """

    boxes: Tensor
    flip: Tensor
    jitter: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    jitter_order: Tensor
    angle: Tensor
    gray: Tensor
    blur: Tensor
    blur_sigma: Tensor
    solarize: Tensor

    def to(self, device: torch.device | str) -> ViewParams:
        """Copy every field to ``device``."""
        return ViewParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @staticmethod
    def cat(params: Sequence[ViewParams]) -> ViewParams:
        """The parameters of several views, one after the other along the batch."""
        if len(params) == 1:
            return params[0]
        return ViewParams(
            **{f.name: torch.cat([getattr(p, f.name) for p in params]) for f in fields(ViewParams)}
        )

    def __getitem__(self, index: slice) -> ViewParams:
        """The parameters of a slice of the batch."""
        return ViewParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def whole_image(self, image_size: tuple[int, int]) -> ViewParams:
        """The same parameters with every crop box covering the whole (H, W) image."""
        height, width = image_size
        boxes = torch.zeros_like(self.boxes)
        boxes[:, 2], boxes[:, 3] = width, height
        return replace(self, boxes=boxes)


class MultiCropAugment(nn.Module):
    """Produce independently augmented, normalised float views of an image batch, one per
    policy, each at its own size (multi-crop: two global crops and several local ones).

    Accepts uint8 (0..255) or float (0..1) batches of shape (B, 3, H, W) on any device and
    returns one float32 batch per view, of ``out_sizes[v]`` (default: the input size; an int or
    pair applies to every view). Views of one size are computed together: their crops are one
    ``grid_sample`` and every later step one pass over all of them. ``generator`` is used when
    ``forward`` is not given one; one of the two is required. ``local_policy`` is the policy
    :meth:`with_crops` gives the crops beyond ``policies`` (default: the last policy).
    """

    def __init__(
        self,
        policies: Sequence[ViewPolicy],
        *,
        out_sizes: Sequence[int | tuple[int, int] | None] | int | tuple[int, int] | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        generator: torch.Generator | None = None,
        local_policy: ViewPolicy | None = None,
    ) -> None:
        super().__init__()
        self.local_policy = local_policy
        if not policies:
            raise ValueError("an augmentation needs at least one view policy")
        self.policies = tuple(policies)
        if out_sizes is None or isinstance(out_sizes, int) or _is_pair(out_sizes):
            out_sizes = [out_sizes] * len(self.policies)
        if len(out_sizes) != len(self.policies):
            raise ValueError(
                f"{len(self.policies)} view policies but {len(out_sizes)} output sizes"
            )
        self.out_sizes = tuple(_pair(size) for size in out_sizes)
        self.generator = generator
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def with_overrides(self, **changes: Any) -> MultiCropAugment:
        """Replace policy fields (``flip_p=0.0``, ``rotation=15.0``...) in every view, in
        place; returns ``self``. Unknown or out-of-range values raise
        ``ValueError``/``TypeError``."""
        self.policies = tuple(replace(policy, **changes) for policy in self.policies)
        if self.local_policy is not None:
            self.local_policy = replace(self.local_policy, **changes)
        return self

    def with_crops(self, crops: Sequence[CropGroup]) -> MultiCropAugment:
        """The views of ``crops`` (``data.crops``), in place; returns ``self``.

        Crop ``v`` (counted over the groups) starts from this augmentation's policy ``v``
        (:attr:`local_policy` for the crops beyond, by default the last policy), takes its
        group's size and area range, and its
        group's ``blur_p`` / ``solarize_p`` where given. Two groups of one crop each at this
        augmentation's size and scale therefore give back the two views it had (BYOL's
        asymmetric views are the case ``blur_p`` 1.0 / 0.1 and ``solarize_p`` 0 / 0.2).
        """
        policies, sizes = [], []
        for group in crops:
            probabilities = {
                key: getattr(group, key)
                for key in ("blur_p", "solarize_p")
                if getattr(group, key) is not None
            }
            for _ in range(group.count):
                if len(policies) < len(self.policies):
                    base = self.policies[len(policies)]
                else:
                    base = self.local_policy or self.policies[-1]
                policies.append(replace(base, scale=tuple(group.scale), **probabilities))
                sizes.append((group.size, group.size))
        self.policies, self.out_sizes = tuple(policies), tuple(sizes)
        self.local_policy = None
        return self

    def forward(
        self, x: Tensor | Sequence[Tensor], generator: torch.Generator | None = None
    ) -> tuple[Tensor, ...]:
        """Augment a batch ``x`` once per view, or a tuple of batches already cropped (one
        per view, as image folders' workers cut them), with parameters drawn from
        ``generator`` (or the module's). Pre-cropped views keep their crops and get
        everything else."""
        generator = generator if generator is not None else self.generator
        if generator is None:
            raise ValueError("no random generator: pass generator= to the constructor or forward")
        if isinstance(x, Tensor):
            params = self.sample_params(x.shape[0], (x.shape[-2], x.shape[-1]), generator)
            return self.apply(x, params)
        x = tuple(x)
        self._check_view_count(len(x))
        params = []
        for i, (policy, view) in enumerate(zip(self.policies, x, strict=True)):
            size = view.shape[-2:]
            drawn = _sample_view(policy, view.shape[0], size, self._out_size(i, size), generator)
            params.append(drawn.whole_image(size))
        return self.apply(x, params)

    def sample_params(
        self, batch_size: int, image_size: tuple[int, int], generator: torch.Generator
    ) -> tuple[ViewParams, ...]:
        """Draw every view's parameters for a batch of ``image_size`` (H, W) images, view
        after view.

        Random numbers are drawn on the generator's device only, a fixed amount per call, so
        the generator state alone determines the result.
        """
        return tuple(
            _sample_view(policy, batch_size, image_size, self._out_size(i, image_size), generator)
            for i, policy in enumerate(self.policies)
        )

    @torch.no_grad()
    def apply(
        self, x: Tensor | Sequence[Tensor], params: Sequence[ViewParams]
    ) -> tuple[Tensor, ...]:
        """Apply previously drawn parameters to a batch (or a tuple of batches, one per view);
        deterministic, never tracks gradients."""
        inputs = (x,) * len(self.policies) if isinstance(x, Tensor) else tuple(x)
        self._check_view_count(len(inputs))
        for images in inputs:
            _check_images(images)
        outputs: list[Tensor | None] = [None] * len(inputs)
        for views in self._same_size_groups(inputs):
            group = self._apply_group(
                [inputs[v] for v in views], [params[v].to(inputs[v].device) for v in views], views
            )
            for view, output in zip(views, group, strict=True):
                outputs[view] = output
        return tuple(outputs)

    def _check_view_count(self, count: int) -> None:
        if count != len(self.policies):
            raise ValueError(f"{len(self.policies)} views, got {count} batches of crops")

    def _same_size_groups(self, inputs: Sequence[Tensor]) -> list[list[int]]:
        """The views computed together: those of one output size whose policies differ only
        in what was drawn already (probabilities, crop ranges), in order of first view."""
        groups: dict[Any, list[int]] = {}
        for view, policy in enumerate(self.policies):
            key = (
                self._out_size(view, inputs[view].shape[-2:]),
                policy.jitter,
                policy.blur_min_size,
                policy.solarize_threshold,
                policy.rotation > 0,
            )
            groups.setdefault(key, []).append(view)
        return list(groups.values())

    def _apply_group(
        self, inputs: list[Tensor], params: list[ViewParams], views: list[int]
    ) -> list[Tensor]:
        """The views ``views`` of one size, chunked over the batch on CPU (see
        ``_CPU_CHUNK_VALUES``)."""
        out_size = self._out_size(views[0], inputs[0].shape[-2:])
        policies = [self.policies[v] for v in views]
        policy = replace(
            policies[0],
            **{
                key: max(getattr(p, key) for p in policies)
                for key in ("jitter_p", "gray_p", "blur_p", "solarize_p", "rotation")
            },
        )
        batch = inputs[0].shape[0]
        chunk = max(_MIN_CHUNK, _CPU_CHUNK_VALUES // (3 * out_size[0] * out_size[1] * len(views)))
        if inputs[0].device.type != "cpu" or chunk >= batch:
            return self._apply_views(inputs, params, policy, out_size)
        parts = [
            self._apply_views(
                _rows(inputs, i, chunk), [p[i : i + chunk] for p in params], policy, out_size
            )
            for i in range(0, batch, chunk)
        ]
        return [torch.cat(part) for part in zip(*parts, strict=True)]

    def _apply_views(
        self,
        inputs: list[Tensor],
        params: list[ViewParams],
        policy: ViewPolicy,
        out_size: tuple[int, int],
    ) -> list[Tensor]:
        """Crop every view (one ``grid_sample`` per distinct input), then run the remaining
        steps once over all of them."""
        p = ViewParams.cat(params)
        angles = [q.angle for q in params] if policy.rotation > 0 else None
        crops: list[Tensor] = []
        start = 0
        while start < len(inputs):  # runs of views cut from one input batch
            stop = start + 1
            while stop < len(inputs) and inputs[stop] is inputs[start]:
                stop += 1
            crops.append(
                BF.resized_crops(
                    _to_float(inputs[start]),
                    [q.boxes for q in params[start:stop]],
                    [q.flip for q in params[start:stop]],
                    out_size,
                    angles[start:stop] if angles is not None else None,
                )
            )
            start = stop
        x = crops[0] if len(crops) == 1 else torch.cat(crops)  # new; modified in place below
        if policy.jitter_p > 0:
            _color_jitter_(x, p, policy)
        if policy.gray_p > 0:
            BF.to_grayscale_(x, p.gray)
        if policy.blur_p > 0 and min(out_size) >= policy.blur_min_size:
            x = _blur_selected(x, p, BF.blur_kernel_size(out_size))
        if policy.solarize_p > 0:
            BF.solarize_(x, p.solarize, policy.solarize_threshold)
        return list(BF.normalize_(x, self.mean, self.std).chunk(len(params)))

    def _out_size(self, view: int, image_size: tuple[int, int]) -> tuple[int, int]:
        size = self.out_sizes[view]
        return size if size is not None else (int(image_size[0]), int(image_size[1]))


class TwoViewAugment(MultiCropAugment):
    """Two views of one size, with a policy each (SimCLR, BYOL and the methods after them)."""

    def __init__(
        self,
        view1: ViewPolicy,
        view2: ViewPolicy,
        *,
        out_size: int | tuple[int, int] | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            (view1, view2), out_sizes=out_size, mean=mean, std=std, generator=generator
        )


class SimCLRAugment(TwoViewAugment):
    """SimCLR augmentation (Chen et al. 2020): both views share one policy.

    Colour jitter strengths are (0.8 s, 0.8 s, 0.8 s, 0.2 s) with ``jitter_strength`` s; blur
    (p = ``blur_p``) is only used for outputs of at least ``blur_min_size`` = 96 pixels, as the
    paper does not blur CIFAR images.
    """

    def __init__(
        self,
        out_size: int | tuple[int, int] | None = None,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter_strength: float = 1.0,
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_min_size: int = 96,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        generator: torch.Generator | None = None,
    ) -> None:
        s = jitter_strength
        policy = ViewPolicy(
            scale=scale,
            ratio=ratio,
            flip_p=flip_p,
            jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
            jitter_p=jitter_p,
            gray_p=gray_p,
            blur_p=blur_p,
            blur_sigma=blur_sigma,
            blur_min_size=blur_min_size,
        )
        super().__init__(policy, policy, out_size=out_size, mean=mean, std=std, generator=generator)


class BYOLAugment(TwoViewAugment):
    """BYOL augmentation (Grill et al. 2020): asymmetric blur and solarisation between views.

    Pairs such as ``blur_p=(1.0, 0.1)`` give the value for view 1 and view 2.
    """

    def __init__(
        self,
        out_size: int | tuple[int, int] | None = None,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: tuple[float, float] = (1.0, 0.1),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_min_size: int = 0,
        solarize_p: tuple[float, float] = (0.0, 0.2),
        solarize_threshold: float = 0.5,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        generator: torch.Generator | None = None,
    ) -> None:
        view1, view2 = (
            ViewPolicy(
                scale=scale,
                ratio=ratio,
                flip_p=flip_p,
                jitter=jitter,
                jitter_p=jitter_p,
                gray_p=gray_p,
                blur_p=blur_p[i],
                blur_sigma=blur_sigma,
                blur_min_size=blur_min_size,
                solarize_p=solarize_p[i],
                solarize_threshold=solarize_threshold,
            )
            for i in range(2)
        )
        super().__init__(view1, view2, out_size=out_size, mean=mean, std=std, generator=generator)


def _check_images(x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise TypeError(f"expected uint8 or floating point images, got {x.dtype}")


def _uniform(u: Tensor, low: float, high: float) -> Tensor:
    return low + (high - low) * u


def _sample_view(
    policy: ViewPolicy,
    batch_size: int,
    image_size: tuple[int, int],
    out_size: tuple[int, int],
    generator: torch.Generator,
) -> ViewParams:
    # One draw of uniforms per call: 2 x tries for the crop candidates, then 12 scalars.
    u = torch.rand(batch_size, CROP_UNIFORMS + 10, generator=generator, device=generator.device)
    boxes = sample_crop_boxes(u[:, :CROP_UNIFORMS], image_size, policy.scale, policy.ratio)
    u = u[:, 2 * _CROP_TRIES :].unbind(1)  # u[0] and u[1] placed the box
    b, c, s, h = policy.jitter
    blur_enabled = min(out_size) >= policy.blur_min_size
    # Drawn after the uniforms above, so that the other parameters do not depend on it.
    order_u = torch.rand(batch_size, 4, generator=generator, device=generator.device)
    if policy.rotation > 0:
        turn = torch.rand(batch_size, generator=generator, device=generator.device)
        angle = _uniform(turn, -1.0, 1.0) * math.radians(policy.rotation)
    else:
        angle = torch.zeros(batch_size, device=generator.device)
    return ViewParams(
        boxes=boxes,
        flip=u[2] < policy.flip_p,
        jitter=u[3] < policy.jitter_p,
        brightness=_uniform(u[4], max(0.0, 1.0 - b), 1.0 + b),
        contrast=_uniform(u[5], max(0.0, 1.0 - c), 1.0 + c),
        saturation=_uniform(u[6], max(0.0, 1.0 - s), 1.0 + s),
        hue=_uniform(u[7], -h, h),
        jitter_order=order_u.argsort(dim=1),
        angle=angle,
        gray=u[8] < policy.gray_p,
        blur=(u[9] < policy.blur_p) & blur_enabled,
        blur_sigma=_uniform(u[10], *policy.blur_sigma),
        solarize=u[11] < policy.solarize_p,
    )


def sample_crop_boxes(
    uniforms: Tensor,
    image_size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> Tensor:
    """Random resized crop boxes as torchvision draws them, batched: (B, 4) (x0, y0, w, h).

    ``uniforms`` is (B, :data:`CROP_UNIFORMS`) of uniform [0, 1) draws. Each sample gets
    ``_CROP_TRIES`` candidates with area fraction uniform in ``scale`` and log-uniform aspect
    ratio in ``ratio``; the first that fits in the image is used, else the largest centred box
    with a clamped ratio (torchvision's fallback). The last two uniforms place the box. Boxes
    are continuous.
    """
    crop_u, u_x, u_y = uniforms[:, : 2 * _CROP_TRIES], *uniforms[:, 2 * _CROP_TRIES :].unbind(1)
    height, width = image_size
    area_u, ratio_u = crop_u.chunk(2, dim=1)
    area = _uniform(area_u, *scale) * (height * width)
    aspect = torch.exp(_uniform(ratio_u, math.log(ratio[0]), math.log(ratio[1])))
    w = torch.sqrt(area * aspect)
    h = torch.sqrt(area / aspect)
    fits = (w <= width) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback = (width, width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback = (height * ratio[1], height)
    else:
        fallback = (width, height)
    found = fits.any(dim=1)
    w = torch.where(found, w, fallback[0])
    h = torch.where(found, h, fallback[1])
    x0 = torch.where(found, u_x, 0.5) * (width - w)
    y0 = torch.where(found, u_y, 0.5) * (height - h)
    return torch.stack([x0, y0, w, h], dim=1)


def _color_jitter_(x: Tensor, p: ViewParams, policy: ViewPolicy) -> None:
    """In place, where ``p.jitter`` is set: brightness, contrast, saturation and hue, each
    sample in its own order ``p.jitter_order``.

    Without a per-sample loop or data-dependent indexing. Brightness, contrast and saturation
    are one blend (:func:`~ssl_toolkit.data.functional.blend_`) that can apply a different one
    to each sample, so each order position before a sample's hue is one blend pass, the costly
    hue rotation runs once for the whole batch, and each position after the hue is one more
    blend pass. Identity factors leave a sample exactly unchanged.
    """
    hue_position = p.jitter_order.argmax(dim=1)  # where op 3, the hue, sits in the order
    brightness, contrast, saturation, hue = (
        p.jitter & (strength > 0) for strength in policy.jitter
    )  # per op: the samples it applies to
    one, zero = torch.ones_like(p.brightness), torch.zeros_like(p.brightness)

    def blend_positions(positions: range, before_hue: bool) -> None:
        for position in positions:
            due = p.jitter_order[:, position]
            side = position < hue_position if before_hue else position > hue_position
            b, c, s = (
                side & (due == i) & mask
                for i, mask in enumerate((brightness, contrast, saturation))
            )
            scale = torch.where(b, p.brightness, torch.where(c, p.contrast, one))
            scale = torch.where(s, p.saturation, scale)
            BF.blend_(
                x,
                scale,
                torch.where(c, 1 - p.contrast, zero),
                torch.where(s, 1 - p.saturation, zero),
            )

    if policy.jitter[:3] != (0.0, 0.0, 0.0):
        blend_positions(range(3), before_hue=True)
    if policy.jitter[3] > 0:
        BF.adjust_hue_(x, torch.where(hue, p.hue, 0.0))
    if policy.jitter[:3] != (0.0, 0.0, 0.0):
        blend_positions(range(1, 4), before_hue=False)


def _rows(inputs: list[Tensor], start: int, size: int) -> list[Tensor]:
    """Rows ``start:start + size`` of every view's input; views of one input batch keep
    sharing one slice."""
    slices: dict[int, Tensor] = {}
    return [slices.setdefault(id(x), x[start : start + size]) for x in inputs]


def _is_pair(size: Any) -> bool:
    return isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) for v in size)


def _pair(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    return (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)


def _to_float(images: Tensor) -> Tensor:
    """Images as floats in [0, 1] (uint8 is scaled)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def _blur_selected(x: Tensor, p: ViewParams, kernel_size: int) -> Tensor:
    """Blur the samples drawn for blurring; the others pass through exactly, with no host
    sync to find them."""
    return BF.gaussian_blur(x, p.blur_sigma, kernel_size, apply=p.blur)
