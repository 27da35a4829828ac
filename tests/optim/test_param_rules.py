"""Parameter rules: properties over generated module trees, and the documented cases."""

from __future__ import annotations

import fnmatch
import re

import pytest
import torch
import torchvision
from conftest import SmallResNet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from optim import (
    ConfigError,
    build_optimizer,
    parse_optimizer_config,
    render_param_table,
    resolve_params,
)

LEAVES = {
    "linear": lambda: nn.Linear(3, 2),
    "linear_nobias": lambda: nn.Linear(3, 2, bias=False),
    "batchnorm": lambda: nn.BatchNorm1d(2),
    "layernorm": lambda: nn.LayerNorm(2),
    "groupnorm": lambda: nn.GroupNorm(1, 2),
    "conv": lambda: nn.Conv1d(2, 2, 1),
}
CHILD_NAMES = ["a", "b", "0", "1", "head", "proj"]


@st.composite
def module_trees(draw: st.DrawFn, depth: int = 0) -> nn.Module:
    """A random tree of containers (numeric names included) over linear, conv and norm leaves."""
    module = nn.Module()
    for name in draw(st.lists(st.sampled_from(CHILD_NAMES), min_size=1, max_size=3, unique=True)):
        if depth < 2 and draw(st.booleans()):
            module.add_module(name, draw(module_trees(depth + 1)))
        else:
            module.add_module(name, LEAVES[draw(st.sampled_from(sorted(LEAVES)))]())
    return module


@st.composite
def models_and_rules(draw: st.DrawFn) -> tuple[nn.Module, list[dict]]:
    model = draw(module_trees())
    params = list(model.named_parameters())
    for _, p in params:
        p.requires_grad_(draw(st.integers(0, 9)) > 0)  # about one in ten frozen
    names = [n for n, _ in params]
    pattern = st.one_of(
        st.sampled_from(names),
        st.sampled_from(names).map(lambda n: n.rsplit(".", 1)[0] + ".*"),
        st.sampled_from(names).map(lambda n: "re:" + re.escape(n.split(".")[0]) + r"\..*"),
        st.sampled_from(["@norm", "@bias", "@1d", "*.weight", "*.bias"]),
    )
    rules = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "match": st.lists(pattern, min_size=1, max_size=2),
                    "lr_scale": st.floats(0.1, 4.0),
                }
            ),
            max_size=3,
        )
    )
    return model, rules


def expected_match(pattern: str, name: str, param: nn.Parameter, owner: nn.Module) -> bool:
    """The rule syntax of docs/param_rules.md, re-derived for the test."""
    if pattern == "@norm":
        return isinstance(owner, (nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm))
    if pattern == "@bias":
        return name.split(".")[-1] == "bias"
    if pattern == "@1d":
        return param.dim() <= 1
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models_and_rules())
def test_every_parameter_once_first_match_wins(case: tuple[nn.Module, list[dict]]) -> None:
    model, rules = case
    params = dict(model.named_parameters())
    owners = {n: model.get_submodule(n.rpartition(".")[0]) for n in params}

    def hits(pattern: str) -> list[str]:
        return [n for n, p in params.items() if expected_match(pattern, n, p, owners[n])]

    cfg = {"name": "sgd", "lr": 1.0, "param_groups": rules}
    unmatched = [pat for rule in rules for pat in rule["match"] if not hits(pat)]
    if unmatched:
        with pytest.raises(ConfigError) as info:
            build_optimizer(cfg, model)
        assert all(repr(pat) in str(info.value) for pat in unmatched)
        return
    trainable = [n for n, p in params.items() if p.requires_grad]
    if not trainable:
        return
    opt = build_optimizer(cfg, model)
    seen = [p.param_name for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(trainable)  # each trainable parameter exactly once
    scale_of = {p.param_name: g["lr"] for g in opt.param_groups for p in g["params"]}
    for name in trainable:
        first = next(
            (r for r in rules if any(name in hits(pat) for pat in r["match"])), {"lr_scale": 1.0}
        )
        assert scale_of[name] == pytest.approx(first["lr_scale"])
    settings_seen = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
    assert len(settings_seen) == len(set(settings_seen))  # identical settings share one group


@settings(max_examples=30, deadline=None)
@given(module_trees(), st.text(alphabet="xyz#", min_size=1, max_size=6))
def test_patterns_matching_nothing_are_rejected(model: nn.Module, junk: str) -> None:
    pattern = "#" + junk  # no parameter name contains '#'
    with pytest.raises(ConfigError, match=re.escape(repr(pattern))):
        build_optimizer({"name": "sgd", "lr": 1.0, "exclude_from_weight_decay": [pattern]}, model)


def test_norm_selector_finds_torchvision_downsample_batchnorm() -> None:
    model = torchvision.models.resnet18()
    rows = resolve_params(
        model,
        parse_optimizer_config(
            {"name": "lars", "lr": 1.0, "exclude_from_layer_adaptation": ["@norm"]}
        ),
    )
    not_adapted = {row.name for row in rows if not row.adapted}
    assert "layer2.0.downsample.1.weight" in not_adapted
    assert "layer2.0.downsample.0.weight" not in not_adapted
    expected = {
        f"{m}.{k}"
        for m, mod in model.named_modules()
        if isinstance(mod, nn.BatchNorm2d)
        for k in ("weight", "bias")
    }
    assert not_adapted == expected


def test_unmatched_pattern_lists_close_names(small_resnet: SmallResNet) -> None:
    with pytest.raises(ConfigError) as info:
        build_optimizer(
            {"name": "lars", "lr": 1.0, "exclude_from_weight_decay": ["fc.bais"]}, small_resnet
        )
    message = str(info.value)
    assert message.startswith(
        "optim.exclude_from_weight_decay[0]: pattern 'fc.bais' matches no parameter"
    )
    assert "fc.bias" in message
    assert message.count(",") <= 4  # at most 5 names


@pytest.mark.parametrize(
    "pattern, message",
    [("@nrom", "unknown selector '@nrom'"), ("re:(", "invalid regular expression")],
)
def test_bad_patterns(pattern: str, message: str, small_resnet: SmallResNet) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_optimizer(
            {"name": "lars", "lr": 1.0, "exclude_from_layer_adaptation": [pattern]}, small_resnet
        )


def test_tied_parameters_count_once_and_frozen_are_skipped() -> None:
    model = nn.Module()
    model.encoder = nn.Linear(4, 4)
    model.decoder = nn.Linear(4, 4)
    model.decoder.weight = model.encoder.weight
    model.frozen = nn.Linear(4, 4)
    model.frozen.requires_grad_(False)
    opt = build_optimizer({"name": "lars", "lr": 1.0}, model)
    names = [p.param_name for g in opt.param_groups for p in g["params"]]
    assert names == ["encoder.weight", "encoder.bias", "decoder.bias"]
    assert model.frozen.weight.param_name == "frozen.weight"  # named although frozen


def test_substring_rules_do_not_match_too_much() -> None:
    """``*.bn*`` would be a substring trap; globs are full-name matches."""
    model = nn.Sequential()
    model.add_module("bn", nn.BatchNorm1d(2))
    model.add_module("bnorm_proj", nn.Linear(2, 2))
    rows = resolve_params(
        model,
        parse_optimizer_config(
            {"name": "lars", "lr": 1.0, "exclude_from_layer_adaptation": ["bn.*"]}
        ),
    )
    assert [r.name for r in rows if not r.adapted] == ["bn.weight", "bn.bias"]


def test_table_renders_every_parameter(small_resnet: SmallResNet) -> None:
    from rich.console import Console

    cfg = parse_optimizer_config(
        {
            "name": "lars",
            "lr": 1.0,
            "weight_decay": 1e-6,
            "exclude_from_layer_adaptation": ["@norm"],
            "exclude_from_weight_decay": ["@bias"],
        }
    )
    rows = resolve_params(small_resnet, cfg)
    console = Console(width=200, record=True)
    console.print(render_param_table(rows))
    text = console.export_text()
    for name, _ in small_resnet.named_parameters():
        assert name in text
    fc_bias = next(r for r in rows if r.name == "fc.bias")
    assert (fc_bias.weight_decay, fc_bias.adapted, fc_bias.rule) == (0.0, True, "no decay: @bias")
    bn = next(r for r in rows if r.name == "bn1.weight")
    assert (bn.weight_decay, bn.adapted) == (1e-6, False)
    assert torch.Size(bn.shape) == small_resnet.bn1.weight.shape
