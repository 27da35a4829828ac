"""Batched image operations with one parameter per sample, for float images in [0, 1].

Every function takes a (B, 3, H, W) float batch and per-sample parameters of shape (B,), and runs
as a handful of tensor ops on the batch's device: no Python loop over samples, so augmenting a
batch costs about as much as augmenting one large image. The formulas follow
``torchvision.transforms.v2.functional`` (which takes one factor per call), so results match it
sample by sample.

Colour operations work in place (trailing underscore) on a batch the caller owns: on CPU the
cost of this code is dominated by memory traffic and by fresh allocations of whole batches,
not by arithmetic. For the same reason per-sample selections use ``lerp_`` with 0/1 weights,
which is exact and several times cheaper than ``torch.where`` with a broadcast boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601-2 luma weights.
_LUMA = (0.299, 0.587, 0.114)
# HSV -> RGB: channel n of the output uses k = (n + 6 h) mod 6 with n = 5, 3, 1 for R, G, B.
_HSV_OFFSETS = (5.0, 3.0, 1.0)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """A (B,) tensor as (B, 1, 1, 1) in ``like``'s dtype, to broadcast over an image batch."""
    return values.to(dtype=like.dtype).view(-1, 1, 1, 1)


def grayscale(x: Tensor) -> Tensor:
    """Luma 0.299 R + 0.587 G + 0.114 B, as a (B, 1, H, W) tensor."""
    r, g, b = x.unbind(1)
    return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def to_grayscale_(x: Tensor, apply: Tensor) -> Tensor:
    """In place: replace the samples where ``apply`` is set by their luma, on all 3 channels."""
    return x.lerp_(grayscale(x).expand_as(x), _per_sample(apply, x))


def resized_crop(
    x: Tensor,
    boxes: Tensor,
    flip: Tensor,
    out_size: tuple[int, int],
    angle: Tensor | None = None,
) -> Tensor:
    """Crop a box per sample, optionally mirror and rotate it, and resize it to ``out_size``,
    bilinearly.

    ``boxes`` is (B, 4) as (x0, y0, width, height) in input pixels (fractional values allowed);
    ``flip`` is a (B,) bool; ``angle`` (B,) rotates the box about its centre, in radians
    (positive angles turn the content clockwise as displayed). Crop, flip, rotation and
    resize are one ``grid_sample``; the flip is the sign of the horizontal scale. Without
    rotation the sampling grid is an outer sum of a per-sample column ramp and row ramp (no
    ``affine_grid`` matrix product). Points outside the image take the nearest border pixel.
    """
    grid = _crop_grid(x, boxes, flip, out_size, angle)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resized_crops(
    x: Tensor,
    boxes: list[Tensor],
    flips: list[Tensor],
    out_size: tuple[int, int],
    angles: list[Tensor] | None = None,
) -> Tensor:
    """Several crops of every sample, as :func:`resized_crop` cuts each, in one
    ``grid_sample``: ``(V·B, 3, out_h, out_w)``, crop ``v`` of every sample before crop
    ``v + 1``.

    The V sampling grids of a sample are laid side by side, so the input batch is read once
    and never repeated; every output pixel is the one :func:`resized_crop` computes.
    """
    if len(boxes) == 1:
        return resized_crop(x, boxes[0], flips[0], out_size, angles[0] if angles else None)
    grids = [
        _crop_grid(x, b, f, out_size, angles[v] if angles is not None else None)
        for v, (b, f) in enumerate(zip(boxes, flips, strict=True))
    ]
    out = F.grid_sample(
        x, torch.cat(grids, dim=2), mode="bilinear", padding_mode="border", align_corners=False
    )
    batch, channels, out_h, _ = out.shape
    out = out.view(batch, channels, out_h, len(grids), out_size[1]).permute(3, 0, 1, 2, 4)
    return out.reshape(len(grids) * batch, channels, out_h, out_size[1])


def _crop_grid(
    x: Tensor,
    boxes: Tensor,
    flip: Tensor,
    out_size: tuple[int, int],
    angle: Tensor | None,
) -> Tensor:
    """The (B, out_h, out_w, 2) ``grid_sample`` grid of :func:`resized_crop`."""
    height, width = x.shape[-2:]
    out_h, out_w = out_size
    x0, y0, w, h = boxes.to(device=x.device, dtype=x.dtype).unbind(1)
    sign = 1.0 - 2.0 * flip.to(device=x.device, dtype=x.dtype)
    # Output pixel centres in [-1, 1], then mapped into the box, in grid_sample's coordinates.
    cols = torch.linspace(1 / out_w - 1, 1 - 1 / out_w, out_w, device=x.device, dtype=x.dtype)
    rows = torch.linspace(1 / out_h - 1, 1 - 1 / out_h, out_h, device=x.device, dtype=x.dtype)
    if angle is None:
        grid_x = cols * (sign * w / width).view(-1, 1) + ((2 * x0 + w) / width - 1).view(-1, 1)
        grid_y = rows * (h / height).view(-1, 1) + ((2 * y0 + h) / height - 1).view(-1, 1)
        grid_x, grid_y = grid_x.unsqueeze(1).expand(-1, out_h, -1), grid_y.unsqueeze(2)
    else:
        # Offsets from the box centre in input pixels, rotated, then normalised.
        du = cols.view(1, 1, -1) * (sign * w / 2).view(-1, 1, 1)
        dv = rows.view(1, -1, 1) * (h / 2).view(-1, 1, 1)
        cos = angle.to(device=x.device, dtype=x.dtype).cos().view(-1, 1, 1)
        sin = angle.to(device=x.device, dtype=x.dtype).sin().view(-1, 1, 1)
        grid_x = (2 * (x0 + w / 2).view(-1, 1, 1) + 2 * (cos * du + sin * dv)) / width - 1
        grid_y = (2 * (y0 + h / 2).view(-1, 1, 1) + 2 * (cos * dv - sin * du)) / height - 1
    return torch.stack(torch.broadcast_tensors(grid_x, grid_y), dim=-1)


def blend_(x: Tensor, scale: Tensor, toward_mean: Tensor, toward_gray: Tensor) -> Tensor:
    """In place: ``clamp(scale·x + toward_mean·mean_grey + toward_gray·grey, 0, 1)`` per sample.

    Brightness, contrast and saturation are all this blend, as torchvision computes them:
    brightness ``f`` is ``(f, 0, 0)``, contrast ``f`` is ``(f, 1 - f, 0)`` (toward the image's
    mean grey level) and saturation ``f`` is ``(f, 0, 1 - f)`` (toward its grayscale version).
    ``(1, 0, 0)`` leaves a sample exactly unchanged, so one pass can apply a different one of
    the three to every sample.
    """
    gray = grayscale(x)
    mean = gray.mean(dim=(2, 3), keepdim=True)
    x.mul_(_per_sample(scale, x))
    x.add_(mean * _per_sample(toward_mean, x)).add_(gray * _per_sample(toward_gray, x))
    return x.clamp_(0.0, 1.0)


def adjust_hue_(x: Tensor, shift: Tensor) -> Tensor:
    """In place: rotate the hue by ``shift`` (turns, in [-0.5, 0.5]) per sample, through HSV.

    Value (max) and chroma (max - min) are kept; only the hue changes. The hue is computed in
    sixths of a turn, ``h6``, from whichever channel is the maximum, and converted back with
    the closed form ``max - chroma * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + h6) mod 6``, for
    n = 5, 3, 1 (R, G, B). Ties between maximal channels give the same hue either way. Samples
    with a zero shift are left exactly unchanged (the HSV round trip is exact only to rounding).
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    is_r = (maxc == r).to(x.dtype)
    is_g = (maxc == g).to(x.dtype).mul_(1.0 - is_r)
    # h6 * chroma when blue, red or green is the maximum; grey pixels get 0 from each.
    from_b = (r - g).add_(chroma, alpha=4.0)
    from_r = (g - b).sub_(from_b).mul_(is_r)
    from_g = (b - r).add_(chroma, alpha=2.0).sub_(from_b).mul_(is_g)
    h6 = from_b.add_(from_r).add_(from_g).div_(chroma.clamp(min=1e-12))
    h6.add_(shift.to(dtype=x.dtype).view(-1, 1, 1), alpha=6.0)
    k = h6.unsqueeze(1) + x.new_tensor(_HSV_OFFSETS).view(1, 3, 1, 1)
    wraps = torch.mul(k, 1.0 / 6.0).floor_()
    k.sub_(wraps.mul_(6.0))
    ramp = torch.minimum(k, torch.sub(4.0, k, out=wraps), out=k).clamp_(0.0, 1.0)
    rgb = ramp.mul_(chroma.unsqueeze(1)).neg_().add_(maxc.unsqueeze(1))
    return x.lerp_(rgb, _per_sample(shift != 0, x))


def blur_kernel_size(image_size: tuple[int, int]) -> int:
    """SimCLR's blur kernel: 10% of the smaller image side, rounded down to odd, at least 3."""
    return max(3, int(0.1 * min(image_size)) // 2 * 2 + 1)


def gaussian_blur(
    x: Tensor, sigma: Tensor, kernel_size: int, apply: Tensor | None = None
) -> Tensor:
    """Separable Gaussian blur with one ``sigma`` per sample and reflect padding.

    ``kernel_size`` must be odd and is shared by the batch (see :func:`blur_kernel_size`).
    Samples and channels are folded into the channel dimension of one depthwise convolution,
    so every (sample, channel) pair gets its own kernel in a single call per direction.
    Samples where the bool ``apply`` is False get the identity kernel (a one at the centre),
    which returns them exactly; picking the others out instead would need a host sync.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    batch, channels, height, width = x.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sigma = sigma.to(device=x.device, dtype=x.dtype).view(-1, 1)
    kernels = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    if apply is not None:
        identity = (offsets == 0).to(x.dtype)
        kernels = torch.where(apply.to(x.device).view(-1, 1), kernels, identity)
    kernels = kernels.repeat_interleave(channels, dim=0)
    groups = batch * channels
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    padded = padded.view(1, groups, height + 2 * radius, width + 2 * radius)
    rows = F.conv2d(padded, kernels.view(groups, 1, 1, kernel_size), groups=groups)
    out = F.conv2d(rows, kernels.view(groups, 1, kernel_size, 1), groups=groups)
    return out.view(batch, channels, height, width)


def solarize_(x: Tensor, apply: Tensor, threshold: float) -> Tensor:
    """In place: invert pixels at or above ``threshold`` in the samples where ``apply`` is set."""
    invert = (x >= threshold).to(x.dtype).mul_(_per_sample(apply, x))
    return x.addcmul_(invert, torch.mul(x, -2.0).add_(1.0))


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Standardise each channel: ``(x - mean) / std`` with (3,) ``mean`` and ``std``."""
    return normalize_(x.clone(), mean, std)


def normalize_(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """In place: standardise each channel, ``(x - mean) / std`` with (3,) ``mean`` and ``std``."""
    mean = mean.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1))
