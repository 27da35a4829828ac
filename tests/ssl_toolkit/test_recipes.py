"""The shipped recipes carry their sources' numbers.

The expected values are written here from the papers and the authors' code, independently of
the YAML files; each entry names where it comes from.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from optim import scale_lr, warmup_cosine
from ssl_toolkit.config import load_config
from ssl_toolkit.methods import build_method
from tests.optim.test_schedules import (
    barlow_twins_schedule,
    byol_schedule,
    mocov3_schedule,
    simclr_schedule,
    solo_learn_schedule,
    swav_schedule,
)

EXCLUDED = ["@norm", "@bias"]
ONE_DIM = ["@1d"]  # the authors' `p.ndim == 1` filters

# solo/utils/lars.py: the original ratio, clipped (clip_lr), the lr outside the buffer, 1-d
# tensors excluded (exclude_bias_n_norm); torchvision's ResNet with its default init.
SOLO_LEARN_LARS = {
    "optim.trust_ratio": "original",
    "optim.lr_in_buffer": False,
    "model.zero_init_residual": False,
    "exclude": ONE_DIM,
    # solo/methods/base.py: scheduler.warmup_start_lr 3e-5 and min_lr 0 by default, and
    # LinearWarmupCosineAnnealingLR's warmup, a numpy.linspace to the peak.
    "schedule.warmup_from": 3e-5,
    "schedule.warmup_peak_at": "last_warmup_step",
    "schedule.final_lr": 0.0,
}
# The warmup of model_util.py (SimCLR), schedules.py (BYOL), main.py (Barlow Twins),
# main_vicreg.py and main_moco.py: step / warmup_steps x peak, 0 at the first step.
FROM_ZERO = {"schedule.warmup_from": None, "schedule.warmup_peak_at": "first_cosine_step"}

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
        # google-research/simclr: lars_optimizer.py (classic_momentum), objective.py
        # (loss_a + loss_b), model_util.py (center=False), resnet.py (init_zero=True).
        "optim.trust_ratio": "update",
        "optim.lr_in_buffer": True,
        "method.loss_scale": 2.0,
        "method.projector.last_batch_norm": "scale",
        "model.zero_init_residual": True,
        **FROM_ZERO,
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
        # byol/utils/optimizers.py (scale_by_lars, then optax.scale(-lr)); haiku's ResNet.
        "optim.trust_ratio": "update",
        "optim.lr_in_buffer": False,
        "model.zero_init_residual": True,
        **FROM_ZERO,
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
        "optim.weight_decay": 1e-6,  # main.py's default (the README's best model)
        "schedule.warmup_epochs": 10,
        "schedule.final_lr": 0.2 * 2048 / 256 * 0.001,
        "trainer.epochs": 1000,
        "bias_lr_ratio": 0.0048 / 0.2,
        "exclude": ONE_DIM,
        "optim.trust_ratio": "update",
        "optim.lr_in_buffer": False,
        "model.zero_init_residual": True,
        # The in-place all_reduce of c: 1 / (32 processes, section 4) of the exact gradient.
        "method.gradient_scale": 1 / 32,
        "method.loss_scale": 1.0,
        **FROM_ZERO,
    },
    # facebookresearch/vicreg main_vicreg.py and its README's 1000-epoch command.
    "imagenet/vicreg": {
        "processes": 32,
        "global_batch": 2048,
        "method.projector.hidden_dim": 8192,
        "method.projector.out_dim": 8192,
        "method.projector.num_layers": 3,
        "method.invariance_weight": 25.0,
        "method.variance_weight": 25.0,
        "method.covariance_weight": 1.0,
        "model.backbone": "resnet50",
        "model.zero_init_residual": True,
        "optim.lr": 0.2,
        "optim.weight_decay": 1e-6,
        "optim.eta": 0.001,
        "optim.trust_ratio": "update",
        "optim.lr_in_buffer": False,
        "schedule.lr_scaling": "linear",
        "schedule.warmup_epochs": 10,
        "schedule.final_lr": 0.2 * 2048 / 256 * 0.001,
        "trainer.epochs": 1000,
        "exclude": ONE_DIM,
        "views": {"blur_p": (1.0, 0.1), "solarize_p": (0.0, 0.2)},
        **FROM_ZERO,
    },
    # facebookresearch/moco-v3 CONFIG.md (ResNet-50, 100 / 300 / 1000 epochs), main_moco.py's
    # defaults, moco/builder.py and moco/optimizer.py.
    "imagenet/mocov3": {
        "processes": 16,
        "global_batch": 4096,
        "method.temperature": 1.0,
        "method.tau_base": 0.99,
        "method.tau_final": 1.0,
        "method.projector.hidden_dim": 4096,
        "method.projector.out_dim": 256,
        "method.projector.num_layers": 2,
        "method.projector.last_batch_norm": "plain",
        "method.predictor.hidden_dim": 4096,
        "method.predictor.last_batch_norm": "none",
        "model.backbone": "resnet50",
        "model.zero_init_residual": True,
        "data.crop_min_scale": 0.2,
        "optim.lr": 0.6,
        "optim.weight_decay": 1e-6,
        "optim.trust_ratio": "update",
        "optim.lr_in_buffer": False,
        "schedule.warmup_epochs": 10,
        "schedule.final_lr": 0.0,
        "trainer.epochs": 100,
        "exclude": ONE_DIM,
        "views": {"blur_p": (1.0, 0.1), "solarize_p": (0.0, 0.2)},
        **FROM_ZERO,
    },
    "imagenet/mocov3_300ep": {
        "processes": 16,
        "global_batch": 4096,
        "optim.lr": 0.3,
        "optim.weight_decay": 1e-6,
        "method.tau_base": 0.99,
        "trainer.epochs": 300,
        "exclude": ONE_DIM,
        **FROM_ZERO,
    },
    "imagenet/mocov3_1000ep": {
        "processes": 16,
        "global_batch": 4096,
        "optim.lr": 0.3,
        "optim.weight_decay": 1.5e-6,
        "method.tau_base": 0.996,
        "trainer.epochs": 1000,
        "exclude": ONE_DIM,
        **FROM_ZERO,
    },
    # CONFIG.md's ViT-S command (4 nodes of 8 GPUs): AdamW, no exclusions.
    "imagenet/mocov3_vit_small": {
        "processes": 32,
        "global_batch": 4096,
        "method.temperature": 0.2,
        "method.projector.num_layers": 3,
        "method.predictor.last_batch_norm": "plain",
        "model.backbone": "mocov3_vit_small",  # vits.vit_small
        "model.stop_grad_conv1": True,  # --stop-grad-conv1
        "optim.name": "adamw",
        "optim.lr": 1.5e-4,
        "optim.weight_decay": 0.1,
        "schedule.warmup_epochs": 40,
        "trainer.epochs": 300,
        "data.crop_min_scale": 0.08,
        "exclude": [],
        **FROM_ZERO,
    },
    # facebookresearch/swav scripts/swav_800ep_pretrain.sh (64 GPUs x 64); main_swav.py's
    # LARC(SGD, trust_coefficient=0.001, clip=False) on every parameter.
    "imagenet/swav": {
        "processes": 64,
        "global_batch": 4096,
        "method.prototypes": 3000,
        "method.projector.hidden_dim": 2048,
        "method.projector.out_dim": 128,
        "method.temperature": 0.1,
        "method.epsilon": 0.05,
        "method.sinkhorn_iterations": 3,
        "method.crops_for_assign": [0, 1],
        "method.queue_length": 0,
        "crops": [(2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))],
        "model.backbone": "resnet50",
        "model.sync_bn_group_size": 8,  # --sync_bn apex, --syncbn_process_group_size 8
        "optim.lr": 4.8,
        "optim.weight_decay": 1e-6,
        "optim.eta": 0.001,
        "optim.trust_ratio": "original",
        "optim.lr_in_buffer": False,
        "optim.freeze.steps": 313,
        "schedule.lr_scaling": "none",
        "schedule.warmup_epochs": 10,
        "schedule.warmup_from": 0.3,
        "schedule.warmup_peak_at": "last_warmup_step",
        "schedule.final_lr": 0.0048,
        "trainer.epochs": 800,
        "exclude": [],
    },
    # facebookresearch/dino README (vit_small, 300 epochs, 16 GPUs x 64) and main_dino.py's
    # defaults; the exclusions of pos_embed and cls_token.
    "imagenet/dino_vits16": {
        "processes": 16,
        "global_batch": 1024,
        "method.head.out_dim": 65536,
        "method.head.norm_last_layer": False,
        "method.teacher_temperature": 0.07,
        "method.teacher_temperature_start": 0.04,
        "method.teacher_temperature_warmup_epochs": 30,
        "method.student_temperature": 0.1,
        "method.center_momentum": 0.9,
        "method.tau_base": 0.996,
        "crops": [(2, 224, (0.4, 1.0)), (8, 96, (0.05, 0.4))],
        "model.backbone": "dino_vit_small",  # vision_transformer.vit_small
        "model.drop_path_rate": 0.1,
        "optim.name": "adamw",
        "optim.lr": 0.0005,
        "optim.weight_decay": 0.04,
        "schedule.weight_decay.end": 0.4,
        "optim.clip_grad.max_norm": 3.0,
        "optim.clip_grad.per_parameter": True,
        "optim.freeze.steps": 1281167 // 1024,
        "schedule.lr_scaling": "linear",
        "schedule.warmup_epochs": 10,
        "schedule.warmup_from": 0.0,
        "schedule.warmup_peak_at": "last_warmup_step",
        "schedule.final_lr": 1e-6,
        "trainer.epochs": 300,
        "exclude": ["@norm", "@bias", "*pos_embed", "*cls_token"],
    },
    # facebookresearch/dino README's ResNet-50 command (8 GPUs x 64) and main_dino.py's
    # defaults; get_params_groups: no decay on biases and 1-d tensors.
    "imagenet/dino_resnet50": {
        "processes": 8,
        "global_batch": 512,
        "method.head.out_dim": 65536,
        "method.teacher_temperature": 0.04,
        "method.teacher_temperature_warmup_epochs": 0,
        "crops": [(2, 224, (0.14, 1.0)), (8, 96, (0.05, 0.14))],
        "model.backbone": "resnet50",
        "optim.name": "sgd",
        "optim.lr": 0.03,
        "optim.momentum": 0.9,
        "optim.weight_decay": 1e-4,
        "schedule.weight_decay": None,
        "optim.clip_grad.max_norm": 3.0,
        "optim.freeze.steps": 1281167 // 512,
        "schedule.warmup_epochs": 10,
        "schedule.warmup_from": 0.0,
        "schedule.warmup_peak_at": "last_warmup_step",
        "schedule.final_lr": 1e-6,
        "trainer.epochs": 100,
        "exclude": ONE_DIM,
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
        "optim.trust_ratio": "update",
        "method.loss_scale": 2.0,
        "method.projector.last_batch_norm": "scale",
        "model.zero_init_residual": True,
        **FROM_ZERO,
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
        **SOLO_LEARN_LARS,
    },
    # solo-learn scripts/pretrain/cifar/vicreg.yaml (its variance term is a sum of the two
    # views' hinges, twice main_vicreg.py's mean at the same weight).
    "cifar10/vicreg": {
        "processes": 1,
        "global_batch": 256,
        "method.projector.hidden_dim": 2048,
        "method.projector.out_dim": 2048,
        "method.invariance_weight": 25.0,
        "method.variance_weight": 2 * 25.0,
        "method.covariance_weight": 1.0,
        "model.cifar_stem": True,
        "optim.lr": 0.3,
        "optim.weight_decay": 1e-4,
        "optim.eta": 0.02,
        "optim.trust_clip": True,
        "trainer.epochs": 1000,
        "schedule.warmup_epochs": 10,
        "data.crop_min_scale": 0.2,
        "views": {"blur_p": (0.0, 0.0), "solarize_p": (0.1, 0.1), "flip_p": (0.5, 0.5)},
        **SOLO_LEARN_LARS,
    },
    # solo-learn scripts/pretrain/cifar/mocov3.yaml with augmentations/asymmetric.yaml.
    "cifar10/mocov3": {
        "processes": 1,
        "global_batch": 256,
        "method.temperature": 0.2,
        "method.tau_base": 0.99,
        "method.projector.hidden_dim": 4096,
        "method.projector.out_dim": 256,
        "method.predictor.hidden_dim": 4096,
        "model.cifar_stem": True,
        "optim.lr": 0.3,
        "optim.weight_decay": 1e-6,
        "optim.eta": 0.02,
        "optim.trust_clip": True,
        "trainer.epochs": 1000,
        "data.crop_min_scale": 0.08,
        "views": {"blur_p": (0.0, 0.0), "solarize_p": (0.0, 0.2)},
        **SOLO_LEARN_LARS,
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
    excluded = expected.pop("exclude", EXCLUDED)
    assert cfg.optim.exclude_from_weight_decay == excluded
    if hasattr(cfg.optim, "exclude_from_layer_adaptation"):
        assert cfg.optim.exclude_from_layer_adaptation == excluded
    views = expected.pop("views", {})
    crops = expected.pop("crops", None)
    if crops is not None:
        got = [(g.count, g.size, tuple(g.scale)) for g in cfg.data.crops]
        assert got == crops  # the YAML holds these decimals exactly as written
    ratio = expected.pop("bias_lr_ratio", None)
    for key, value in expected.items():
        if value is None or isinstance(value, str | bool):
            assert _value(cfg, key) == value, key
        else:
            assert _value(cfg, key) == pytest.approx(value), key
    if ratio is not None:
        [rule] = cfg.optim.param_groups
        assert rule.match == excluded and rule.lr_scale == pytest.approx(ratio)
    if views:
        augment = (
            build_method(cfg.method, **cfg.model.backbone_options())
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


# Each recipe's lr per step, as its authors' code gives it (tests/optim/test_schedules.py):
# a function of the peak lr, the warmup epochs, the epochs and the steps per epoch.
AUTHORS_SCHEDULES = {
    "imagenet/simclr": simclr_schedule,
    "cifar10/simclr": simclr_schedule,
    "imagenet/byol": byol_schedule,
    "imagenet/barlow": barlow_twins_schedule,
    "imagenet/vicreg": barlow_twins_schedule,
    **dict.fromkeys(
        ["imagenet/mocov3", "imagenet/mocov3_300ep", "imagenet/mocov3_1000ep"], "mocov3"
    ),
    "imagenet/mocov3_vit_small": "mocov3",
    # scripts/swav_800ep_pretrain.sh: --start_warmup 0.3 --final_lr 0.0048; main_dino.py:
    # cosine_scheduler from 0 (start_warmup_value) to --min_lr 1e-6; solo-learn: from 3e-5 to 0.
    "imagenet/swav": ("linspace", 0.3, 0.0048),
    "imagenet/dino_vits16": ("linspace", 0.0, 1e-6),
    "imagenet/dino_resnet50": ("linspace", 0.0, 1e-6),
    **dict.fromkeys(["cifar10/byol", "cifar10/mocov3", "cifar10/vicreg"], ("solo", 3e-5, 0.0)),
}


def _authors_lrs(name: str, peak: float, warmup_epochs: int, epochs: int, iters: int) -> list:
    schedule = AUTHORS_SCHEDULES[name]
    warmup, total = warmup_epochs * iters, epochs * iters
    if schedule == "mocov3":
        return [mocov3_schedule(s, peak, warmup_epochs, epochs, iters) for s in range(total)]
    if isinstance(schedule, tuple):
        kind, start, final = schedule
        of = swav_schedule if kind == "linspace" else solo_learn_schedule
        return of(peak, start, final, warmup, total)
    return [schedule(s, peak, warmup, total) for s in range(total)]


def test_every_recipe_has_a_schedule_to_check() -> None:
    assert set(AUTHORS_SCHEDULES) == set(RECIPES)


@pytest.mark.parametrize("name", sorted(AUTHORS_SCHEDULES))
def test_recipe_lr_schedule_is_its_authors(name: str) -> None:
    """Step by step, for a few lengths of epoch and of run after the warmup, the recipe's
    schedule keys give the lr its authors' code gives at its peak (from the recipe's lr and
    global batch: the final lr of Barlow Twins and VICReg is a multiple of it)."""
    cfg = load_config(name)
    schedule = cfg.schedule
    warmup_epochs = int(schedule.warmup_epochs)
    assert warmup_epochs == schedule.warmup_epochs
    global_batch = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches
    peak = scale_lr(cfg.optim.lr, global_batch * RECIPES[name]["processes"], schedule.lr_scaling)
    for iters, after in ((1, 1), (3, 5), (4, 2)):
        epochs = warmup_epochs + after
        got = [
            warmup_cosine(
                s,
                total_steps=epochs * iters,
                warmup_steps=warmup_epochs * iters,
                peak_lr=peak,
                final_lr=schedule.final_lr,
                warmup_from=schedule.warmup_from,
                warmup_peak_at=schedule.warmup_peak_at,
            )
            for s in range(epochs * iters)
        ]
        expected = _authors_lrs(name, peak, warmup_epochs, epochs, iters)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), (iters, after)
