"""Backbones: image encoders that map (B, 3, H, W) images to (B, D) features.

Self-supervised methods attach their own heads, so every backbone is returned without its
classifier and carries ``num_features = D`` for sizing those heads. Weights are always randomly
initialised: pretraining from scratch is the point, and nothing is downloaded at run time.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch.nn as nn
import torchvision.models as tvm

from models import vit_dino, vit_mocov3

TIMM_PREFIX = "timm/"

_TORCHVISION: dict[str, Callable[..., nn.Module]] = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
    "wide_resnet50_2": tvm.wide_resnet50_2,
}

# The authors' ViTs, built on timm's VisionTransformer as their code builds them.
_AUTHORS_VITS: dict[str, Callable[..., nn.Module]] = {
    "mocov3_vit_small": vit_mocov3.mocov3_vit_small,
    "mocov3_vit_base": vit_mocov3.mocov3_vit_base,
    "dino_vit_tiny": vit_dino.dino_vit_tiny,
    "dino_vit_small": vit_dino.dino_vit_small,
    "dino_vit_base": vit_dino.dino_vit_base,
}


def list_backbones(include_timm: bool = False) -> list[str]:
    """Names accepted by :func:`build_backbone`.

    The torchvision names and the authors' ViTs are always listed; ``include_timm=True`` adds
    every timm architecture as ``timm/<name>`` (over a thousand, hence off by default).
    """
    names = sorted([*_TORCHVISION, *_AUTHORS_VITS])
    if include_timm:
        import timm

        names += [TIMM_PREFIX + name for name in timm.list_models()]
    return names


def check_backbone_name(name: str) -> str:
    """``name`` if :func:`build_backbone` knows it, else ``ValueError`` listing close names.

    Cheap: nothing is built (timm names are checked against timm's registry).
    """
    if name in _TORCHVISION or name in _AUTHORS_VITS:
        return name
    if name.startswith(TIMM_PREFIX):
        import timm

        if timm.is_model(name.removeprefix(TIMM_PREFIX)):
            return name
    raise ValueError(_unknown_name_message(name))


def uses_timm(name: str) -> bool:
    """Whether ``name`` is built by timm (``timm/<name>`` or one of the authors' ViTs), and so
    takes timm's options such as ``drop_path_rate``."""
    return name.startswith(TIMM_PREFIX) or name in _AUTHORS_VITS


def build_backbone(
    name: str,
    *,
    cifar_stem: bool = False,
    zero_init_residual: bool = False,
    stop_grad_conv1: bool = False,
    **kwargs: object,
) -> nn.Module:
    """Build a randomly initialised backbone whose forward returns pooled (B, D) features.

    ``name`` is a torchvision ResNet (``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``,
    ``wide_resnet50_2``), any timm architecture as ``timm/<name>``, or one of the authors' ViTs
    on timm's: ``mocov3_vit_small`` / ``_base`` (MoCo v3's ``vits.py``: 12 heads, a fixed
    sin-cos position embedding, their init; :mod:`models.vit_mocov3`) and ``dino_vit_tiny`` /
    ``_small`` / ``_base`` (DINO's, which resizes its position embedding for crops of another
    size as DINO does; :mod:`models.vit_dino`). ``cifar_stem=True`` swaps
    the 7x7 stride-2 stem convolution and max-pool for one 3x3 stride-1 convolution, the usual
    choice for 32-px images where the ImageNet stem would discard most of the resolution; it is
    supported for ResNets only. ``zero_init_residual=True`` starts the last BatchNorm of every
    residual block at γ = 0, so that each block starts as the identity (the SimCLR, Barlow Twins,
    VICReg and MoCo v3 code do); torchvision ResNets only, since timm's ResNets do it by default
    (``zero_init_last``). ``stop_grad_conv1=True`` keeps a ViT's patch projection at its random
    init (``requires_grad`` off, MoCo v3's ``--stop-grad-conv1``). Extra ``kwargs`` go to the
    model constructor. The returned module has ``num_features`` set to D. Unknown names raise
    ``ValueError`` listing close names.
    """
    check_backbone_name(name)
    if zero_init_residual and uses_timm(name):
        raise ValueError(
            "zero_init_residual is for torchvision ResNets; timm's ResNets start their "
            "blocks' last BatchNorm at zero by default (zero_init_last)"
        )
    if name in _AUTHORS_VITS:
        model = _AUTHORS_VITS[name](**kwargs)
    elif name.startswith(TIMM_PREFIX):
        model = _build_timm(name.removeprefix(TIMM_PREFIX), **kwargs)
    else:
        model = _TORCHVISION[name](weights=None, zero_init_residual=zero_init_residual, **kwargs)
        model.num_features = model.fc.in_features
        model.fc = nn.Identity()
    if cifar_stem:
        _use_cifar_stem(model, name)
    if stop_grad_conv1:
        _stop_grad_patch_embed(model, name)
    return model


def _build_timm(arch: str, **kwargs: object) -> nn.Module:
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    if not isinstance(getattr(model, "num_features", None), int):
        raise ValueError(f"timm model {arch!r} does not report num_features")
    return model


def _use_cifar_stem(model: nn.Module, name: str) -> None:
    """Replace a ResNet stem (conv1 + maxpool) by a 3x3 stride-1 convolution, in place."""
    bn1 = getattr(model, "bn1", None)
    if not (hasattr(model, "conv1") and hasattr(model, "maxpool") and isinstance(bn1, nn.Module)):
        raise ValueError(
            f"cifar_stem=True is only supported for ResNet-style backbones "
            f"(conv1, bn1, maxpool); {name!r} has no such stem"
        )
    stem_channels = bn1.num_features
    conv = nn.Conv2d(3, stem_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = conv
    model.maxpool = nn.Identity()


def _stop_grad_patch_embed(model: nn.Module, name: str) -> None:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Module):
        raise ValueError(f"stop_grad_conv1 is for ViTs (patch_embed.proj); {name!r} has none")
    proj.requires_grad_(False)


def _unknown_name_message(name: str) -> str:
    if name.startswith(TIMM_PREFIX):
        import timm

        arch = name.removeprefix(TIMM_PREFIX)
        close = [TIMM_PREFIX + n for n in difflib.get_close_matches(arch, timm.list_models(), 5)]
    else:
        close = difflib.get_close_matches(name, [*_TORCHVISION, *_AUTHORS_VITS], 5)
        import timm

        if timm.is_model(name):
            close.insert(0, TIMM_PREFIX + name)
    hint = f" Close names: {', '.join(close)}." if close else ""
    return (
        f"Unknown backbone {name!r}.{hint} Valid names: {', '.join(list_backbones())}, "
        f"or any timm model as '{TIMM_PREFIX}<name>'."
    )
