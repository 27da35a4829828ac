"""The shipped recipes carry their sources' numbers.

The expected values are written here from the papers and the authors' code, independently of
the YAML files; each entry names where it comes from.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ssl_toolkit.config import load_config
from ssl_toolkit.methods import build_method

EXCLUDED = ["@norm", "@bias"]

RECIPES: dict[str, dict[str, Any]] = {
    # Chen et al. 2020 (arXiv:2002.05709), section 2.3, appendix A, table 5.
    "imagenet/simclr": {
        "processes": 32,
        "global_batch": 4096,
        "method.temperature": 0.1,
        "method.projector.out_dim": 128,
        "method.projector.num_layers": 2,
        "model.backbone": "resnet50",
        "optim.lr": 0.3,
        "optim.weight_decay": 1e-6,
        "schedule.lr_scaling": "linear",
        "schedule.warmup_epochs": 10,
        "trainer.epochs": 100,
        "data.color_strength": 1.0,
        "data.crop_min_scale": 0.08,
        "views": {"jitter_p": (0.8, 0.8), "gray_p": (0.2, 0.2), "blur_p": (0.5, 0.5)},
    },
    # Grill et al. 2020 (arXiv:2006.07733), section 5 and appendix F (300 epochs), table 6.
    "imagenet/byol": {
        "processes": 32,
        "global_batch": 4096,
        "method.tau_base": 0.99,
        "method.projector.hidden_dim": 4096,
        "method.projector.out_dim": 256,
        "method.predictor.hidden_dim": 4096,
        "model.backbone": "resnet50",
        "optim.lr": 0.3,
        "optim.weight_decay": 1e-6,
        "schedule.warmup_epochs": 10,
        "trainer.epochs": 300,
        "views": {"blur_p": (1.0, 0.1), "solarize_p": (0.0, 0.2), "jitter": [(0.4, 0.4, 0.2, 0.1)]},
    },
    # Zbontar et al. 2021 (arXiv:2103.03230), section 2; facebookresearch/barlowtwins main.py.
    "imagenet/barlow": {
        "processes": 32,
        "global_batch": 2048,
        "method.off_diagonal_weight": 0.0051,
        "method.projector.hidden_dim": 8192,
        "method.projector.out_dim": 8192,
        "method.projector.num_layers": 3,
        "optim.lr": 0.2,
        "optim.weight_decay": 1.5e-6,
        "schedule.warmup_epochs": 10,
        "schedule.final_lr": 0.2 * 2048 / 256 * 0.001,
        "trainer.epochs": 1000,
        "bias_lr_ratio": 0.0048 / 0.2,
    },
    # google-research/simclr README (v1) CIFAR-10 command; appendix B.9 of Chen et al. 2020.
    "cifar10/simclr": {
        "processes": 1,
        "global_batch": 512,
        "method.temperature": 0.5,
        "method.projector.hidden_dim": 512,
        "model.backbone": "resnet18",
        "model.cifar_stem": True,
        "optim.lr": 1.0,
        "optim.weight_decay": 1e-6,
        "schedule.lr_scaling": "linear",
        "trainer.epochs": 1000,
        "data.color_strength": 0.5,
        "views": {"blur_p": (0.0, 0.0)},
    },
    # solo-learn scripts/pretrain/cifar/byol.yaml with augmentations/asymmetric.yaml.
    "cifar10/byol": {
        "processes": 1,
        "global_batch": 256,
        "method.tau_base": 0.99,
        "model.cifar_stem": True,
        "optim.lr": 1.0,
        "optim.weight_decay": 1e-5,
        "optim.eta": 0.02,
        "optim.trust_clip": True,
        "trainer.epochs": 1000,
        "views": {"blur_p": (0.0, 0.0), "solarize_p": (0.0, 0.2), "jitter_p": (0.8, 0.8)},
    },
}


def _value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_matches_its_source(name: str) -> None:
    expected = dict(RECIPES[name])
    cfg = load_config(name)
    processes = expected.pop("processes")
    global_batch = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * processes
    assert global_batch == expected.pop("global_batch")
    assert cfg.optim.exclude_from_layer_adaptation == EXCLUDED
    assert cfg.optim.exclude_from_weight_decay == EXCLUDED
    views = expected.pop("views", {})
    ratio = expected.pop("bias_lr_ratio", None)
    for key, value in expected.items():
        assert _value(cfg, key) == pytest.approx(value), key
    if ratio is not None:
        [rule] = cfg.optim.param_groups
        assert rule.match == EXCLUDED and rule.lr_scale == pytest.approx(ratio)
    if views:
        augment = (
            build_method(cfg.method, cfg.model.backbone, cifar_stem=cfg.model.cifar_stem)
            .augmentation(
                cfg.data.image_size,
                crop_scale=(cfg.data.crop_min_scale, 1.0),
                color_strength=cfg.data.color_strength,
                generator=torch.Generator(),
            )
            .with_overrides(**cfg.data.augment.model_dump(exclude_none=True))
        )
        for field, value in views.items():
            got = tuple(getattr(p, field) for p in augment.policies)
            if field == "jitter":
                assert set(got) == set(value), field
            elif field == "blur_p" and cfg.data.image_size < min(
                p.blur_min_size for p in augment.policies
            ):
                assert value == (0.0, 0.0), "no blur below blur_min_size"
            else:
                assert got == pytest.approx(value), field
