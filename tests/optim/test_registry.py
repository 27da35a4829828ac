"""The registry: lookup, registration, entry points, config validation and errors."""

from __future__ import annotations

import sys
import textwrap
from typing import Literal

import pytest
import torch
from conftest import SmallResNet
from timm.optim import Lamb

from optim import (
    LARS,
    ConfigError,
    LARSConfig,
    OptimizerConfig,
    build_optimizer,
    get_optimizer_config,
    list_optimizers,
    parse_optimizer_config,
    register_optimizer,
)
from optim.registry import OPTIMIZERS


def test_builtins_are_listed() -> None:
    assert {"lars", "sgd", "adamw", "lamb"} <= set(list_optimizers())
    assert get_optimizer_config("lars") is LARSConfig


@pytest.mark.parametrize(
    "cfg, cls",
    [
        ({"name": "lars", "lr": 0.1}, LARS),
        ({"name": "sgd", "lr": 0.1, "weight_decay": 1e-4}, torch.optim.SGD),
        ({"name": "adamw", "lr": 1e-3}, torch.optim.AdamW),
        ({"name": "lamb", "lr": 1e-3}, Lamb),
    ],
)
def test_build_each_builtin_and_step(cfg: dict, cls: type, small_resnet: SmallResNet) -> None:
    opt = build_optimizer(cfg, small_resnet)
    assert isinstance(opt, cls)
    before = small_resnet.conv1.weight.detach().clone()
    small_resnet(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert not torch.equal(before, small_resnet.conv1.weight)
    assert all(p.param_name == n for n, p in small_resnet.named_parameters())


def test_decay_exclusion_reaches_torch_groups(small_resnet: SmallResNet) -> None:
    opt = build_optimizer(
        {
            "name": "sgd",
            "lr": 0.1,
            "weight_decay": 1e-4,
            "exclude_from_weight_decay": ["@norm", "@bias"],
        },
        small_resnet,
    )
    decay_of = {p.param_name: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay_of["conv1.weight"] == 1e-4
    assert decay_of["downsample.1.weight"] == 0.0  # a BatchNorm found by type, not by name
    assert decay_of["fc.bias"] == 0.0
    assert len(opt.param_groups) == 2


def test_lars_groups_carry_rules(small_resnet: SmallResNet) -> None:
    opt = build_optimizer(
        {
            "name": "lars",
            "lr": 0.2,
            "exclude_from_layer_adaptation": ["@norm", "@bias"],
            "exclude_from_weight_decay": ["@norm", "@bias"],
            "param_groups": [{"match": ["fc.*"], "lr_scale": 0.5}],
        },
        small_resnet,
    )
    by_name = {p.param_name: g for g in opt.param_groups for p in g["params"]}
    assert opt.exclude_set == opt.exclude_from_weight_decay
    assert "bn1.weight" in opt.exclude_set and "conv1.weight" not in opt.exclude_set
    assert len(opt.param_groups) == 2  # exclusions do not split groups; the lr scale does
    assert by_name["fc.weight"]["lr"] == pytest.approx(0.1)
    assert opt.exclude_from_weight_decay == {
        n for n in by_name if n.startswith(("bn", "downsample.1")) or n == "fc.bias"
    }


def test_registering_a_taken_name_fails() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("lars", LARSConfig, lambda cfg, model: None)


def test_register_as_decorator_and_unregister(
    monkeypatch: pytest.MonkeyPatch, small_resnet
) -> None:
    monkeypatch.setattr(OPTIMIZERS, "_entries", dict(OPTIMIZERS._entries))

    class PlainConfig(OptimizerConfig):
        name: Literal["plain"] = "plain"

    @register_optimizer("plain", PlainConfig)
    def build_plain(config: PlainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=config.lr)

    assert "plain" in list_optimizers()
    assert isinstance(build_optimizer({"name": "plain", "lr": 0.5}, small_resnet), torch.optim.SGD)
    with pytest.raises(ValueError, match="must default to 'other'"):
        register_optimizer("other", PlainConfig, build_plain)


def test_optimizer_from_a_real_entry_point(
    tmp_path, monkeypatch: pytest.MonkeyPatch, small_resnet
) -> None:
    """A package installed with an ``ssl_toolkit.optimizers`` entry point is found lazily."""
    (tmp_path / "extra_optim.py").write_text(
        textwrap.dedent(
            """
            from typing import Literal
            import torch
            from optim import OptimizerConfig, register_optimizer

            class RMSConfig(OptimizerConfig):
                name: Literal["rms_plugin"] = "rms_plugin"

            def register():
                register_optimizer(
                    "rms_plugin", RMSConfig,
                    lambda cfg, model: torch.optim.RMSprop(model.parameters(), lr=cfg.lr),
                )
            """
        )
    )
    dist_info = tmp_path / "extra_optim-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-optim\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[ssl_toolkit.optimizers]\nrms_plugin = extra_optim:register\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(OPTIMIZERS, "_entries", dict(OPTIMIZERS._entries))
    monkeypatch.setattr(OPTIMIZERS, "_entry_points_loaded", False)
    monkeypatch.delitem(sys.modules, "extra_optim", raising=False)
    assert "rms_plugin" in list_optimizers()
    opt = build_optimizer({"name": "rms_plugin", "lr": 0.01}, small_resnet)
    assert isinstance(opt, torch.optim.RMSprop)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        ({"name": "lars", "lr": -0.1}, "optim.lr: Input should be greater than or equal to 0"),
        (
            {"name": "lars", "lr": 0.1, "momentum": 1.0},
            "optim.momentum: Input should be less than 1",
        ),
        ({"name": "lars", "lr": 0.1, "momentum": -0.1}, "optim.momentum: Input should be greater"),
        (
            {"name": "lars", "lr": 0.1, "weight_decay": -1},
            "optim.weight_decay: Input should be greater",
        ),
        ({"name": "lars", "lr": 0.1, "eta": 0}, "optim.eta: Input should be greater than 0"),
        ({"name": "lars", "lr": 0.1, "epsilon": -1e-9}, "optim.epsilon: Input should be greater"),
        ({"name": "lars", "lr": "fast"}, "optim.lr: Input should be a valid number"),
        (
            {"name": "lars", "lr": 0.1, "trust_clip": "maybe"},
            "optim.trust_clip: Input should be a valid boolean",
        ),
        ({"name": "lars"}, "optim.lr: required value is missing"),
        (
            {"name": "lars", "lr": 0.1, "momentun": 0.9},
            "optim.momentun: unknown key; did you mean 'momentum'?",
        ),
        ({"name": "sgd", "lr": 0.1, "eta": 0.001}, "optim.eta: unknown key"),
        (
            {"name": "adamw", "lr": 0.1, "betas": [0.9, 1.5]},
            "optim.betas[1]: Input should be less than 1",
        ),
        ({"name": "lamb", "lr": 0.1, "eps": 0}, "optim.eps: Input should be greater than 0"),
        (
            {"name": "lars", "lr": 0.1, "param_groups": [{"match": ["*"], "lr_scal": 2}]},
            "optim.param_groups[0].lr_scal: unknown key; did you mean 'lr_scale'?",
        ),
        (
            {"name": "lars", "lr": 0.1, "param_groups": [{"match": []}]},
            "optim.param_groups[0].match: List should have at least 1 item",
        ),
        ({"lr": 0.1}, "optim.name: required; one of adamw, lamb, lars, sgd"),
        ({"name": "lasr", "lr": 0.1}, "optim.name: unknown optimizer 'lasr'; did you mean 'lars'?"),
    ],
)
def test_each_invalid_field_names_its_dotted_key(cfg: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_optimizer_config(cfg)
    assert expected in str(info.value)
    assert len(info.value.problems) == 1


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        parse_optimizer_config({"name": "lars", "lr": -1, "eta": 0, "bogus": 1})
    keys = sorted(problem.split(":")[0] for problem in info.value.problems)
    assert keys == ["optim.bogus", "optim.eta", "optim.lr"]


def test_inconsistent_options_are_rejected() -> None:
    with pytest.raises(ConfigError, match="nesterov needs momentum > 0"):
        parse_optimizer_config({"name": "lars", "lr": 0.1, "momentum": 0.0, "nesterov": True})


def test_config_object_is_accepted_as_is(small_resnet: SmallResNet) -> None:
    opt = build_optimizer(LARSConfig(lr=0.3, eta=0.02), small_resnet)
    assert opt.param_groups[0]["eta"] == 0.02


@pytest.mark.parametrize(
    "cfg, expected",
    [
        ({"name": "lars", "lr": float("inf")}, "optim.lr: Input should be a finite number"),
        ({"name": "sgd", "lr": float("nan")}, "optim.lr: Input should be a finite number"),
        ({"name": "lars", "lr": "inf"}, "optim.lr: Input should be a finite number"),
        (
            {"name": "lars", "lr": 0.1, "eta": True},
            "optim.eta: a boolean is not a number (got True)",
        ),
        (
            {"name": "lamb", "lr": 0.1, "weight_decay": float("inf")},
            "optim.weight_decay: Input should be a finite number",
        ),
        (
            {"name": "adamw", "lr": 0.1, "betas": [False, 0.9]},
            "optim.betas: a boolean is not a number (got [False, 0.9])",
        ),
        (
            {"name": "lars", "lr": 0.1, "param_groups": [{"match": ["*"], "lr_scale": True}]},
            "optim.param_groups[0].lr_scale: a boolean is not a number (got True)",
        ),
        (
            {"name": "sgd", "lr": 0.1, "param_groups": [{"match": ["*"], "weight_decay": 1e999}]},
            "optim.param_groups[0].weight_decay: Input should be a finite number",
        ),
    ],
)
def test_non_finite_and_boolean_numbers_are_refused(
    cfg: dict, expected: str, small_resnet: SmallResNet
) -> None:
    with pytest.raises(ConfigError) as info:
        build_optimizer(cfg, small_resnet)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(expected)


def test_a_boolean_is_not_a_number_but_an_integer_is(small_resnet: SmallResNet) -> None:
    opt = build_optimizer({"name": "lars", "lr": 1, "eta": 2, "weight_decay": 0}, small_resnet)
    assert (opt.defaults["lr"], opt.defaults["eta"], opt.defaults["weight_decay"]) == (1, 2, 0)
    with pytest.raises(ConfigError) as info:
        build_optimizer({"name": "lars", "lr": True}, small_resnet)
    assert info.value.problems == ["optim.lr: a boolean is not a number (got True)"]


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_a_model_without_trainable_parameters_is_a_config_error(
    name: str, small_resnet: SmallResNet
) -> None:
    with pytest.raises(ConfigError) as info:
        build_optimizer({"name": name, "lr": 0.1}, torch.nn.Module())
    assert info.value.problems == ["optim: the model has no parameters"]
    small_resnet.requires_grad_(False)
    with pytest.raises(ConfigError) as info:
        build_optimizer({"name": name, "lr": 0.1}, small_resnet)
    count = len(list(small_resnet.parameters()))
    assert info.value.problems == [
        f"optim: the model has no trainable parameters (all {count} are frozen)"
    ]
