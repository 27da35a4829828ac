"""``freeze``: named parameters stay untouched, optimizer state included, for the first steps,
as DINO's ``cancel_gradients_last_layer`` leaves its last layer; the count survives a resume."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import nn

from optim import (
    ConfigError,
    OptimizerConfig,
    build_optimizer,
    register_optimizer,
    resolve_params,
)
from optim.registry import OPTIMIZERS, parse_optimizer_config
from tests.optim.conftest import SmallResNet, make_batch

CONFIGS = {
    "sgd": {"name": "sgd", "lr": 0.1, "weight_decay": 0.01},
    "adamw": {"name": "adamw", "lr": 0.01},
    "lars": {"name": "lars", "lr": 0.5, "exclude_from_layer_adaptation": ["@bias"]},
}


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, cancel=()) -> None:
    """Steps of cross-entropy on the deterministic batches; ``cancel`` names the parameters
    whose gradients are dropped before each step (the reference for freezing)."""
    for step in steps:
        images, labels = make_batch(step)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        for name, p in model.named_parameters():
            if name in cancel:
                p.grad = None
        optimizer.step()


def fresh() -> SmallResNet:
    torch.manual_seed(0)
    return SmallResNet()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_frozen_parameters_match_dropping_their_gradients(name: str) -> None:
    config = CONFIGS[name]
    ours = fresh()
    optimizer = build_optimizer({**config, "freeze": {"params": ["fc.*"], "steps": 3}}, ours)
    start = {n: p.detach().clone() for n, p in ours.named_parameters()}
    train(ours, optimizer, range(3))
    for n, p in ours.named_parameters():
        assert torch.equal(p, start[n]) == n.startswith("fc."), n
        assert (optimizer.state[p] == {}) == n.startswith("fc."), n  # state untouched
    train(ours, optimizer, range(3, 6))

    reference = fresh()
    ref_optimizer = build_optimizer(config, reference)
    train(reference, ref_optimizer, range(3), cancel={"fc.weight", "fc.bias"})
    train(reference, ref_optimizer, range(3, 6))
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(ours.fc.weight, start["fc.weight"])  # unfrozen at step 4


def test_the_steps_left_are_saved_with_the_optimizer_state() -> None:
    config = {**CONFIGS["sgd"], "freeze": {"params": ["fc.weight"], "steps": 3}}
    model = fresh()
    optimizer = build_optimizer(config, model)
    train(model, optimizer, range(1))
    state = optimizer.state_dict()
    resumed = fresh()
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = build_optimizer(config, resumed)
    resumed_optimizer.load_state_dict(state)
    frozen = resumed.fc.weight.detach().clone()
    train(resumed, resumed_optimizer, range(1, 3))
    assert torch.equal(resumed.fc.weight, frozen)  # steps 2 and 3 are still frozen
    train(resumed, resumed_optimizer, range(3, 4))
    assert not torch.equal(resumed.fc.weight, frozen)


def test_the_rules_table_names_the_frozen_parameters() -> None:
    config = parse_optimizer_config(
        {"name": "sgd", "lr": 0.1, "freeze": {"params": ["fc.*"], "steps": 5}}
    )
    rows = {row.name: row for row in resolve_params(fresh(), config)}
    assert rows["fc.bias"].frozen_steps == 5
    assert rows["fc.bias"].rule == "frozen 5 steps: fc.*"
    assert rows["conv1.weight"].frozen_steps == 0


def test_a_freeze_pattern_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"optim\.freeze\.params\[0\]: pattern 'head\.\*'"):
        build_optimizer(
            {"name": "sgd", "lr": 0.1, "freeze": {"params": ["head.*"], "steps": 1}}, fresh()
        )


class _PlainConfig(OptimizerConfig):
    name: Literal["plain"] = "plain"


def test_an_optimizer_whose_groups_cannot_freeze_says_so(monkeypatch) -> None:
    monkeypatch.setattr(OPTIMIZERS, "_entries", dict(OPTIMIZERS._entries))  # undone after

    @register_optimizer("plain", _PlainConfig)
    def build_plain(config: _PlainConfig, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=config.lr)  # no counted groups

    freeze = {"params": ["fc.*"], "steps": 1}
    with pytest.raises(ConfigError, match=r"optim\.freeze: optimizer 'plain' builds its"):
        build_optimizer({"name": "plain", "lr": 0.1, "freeze": freeze}, fresh())
