"""Parameter rules: which parameters get weight decay, layer adaptation and which lr scale.

Patterns are matched against full names from ``model.named_parameters()``:

* ``*.bias``, ``projector.*``: glob (``fnmatch``, case-sensitive);
* ``re:^layer[34]\\..*``: regular expression, full match;
* ``@norm``: parameters owned by a normalization module, found by type, so a torchvision
  ResNet's ``downsample.1`` counts although no name says "bn";
* ``@bias``: parameters whose attribute name is ``bias``;
* ``@1d``: parameters with at most one dimension.

A pattern that matches no parameter is an error listing close names. Like torchtitan's ordered
rules, the first ``param_groups`` entry that matches decides a parameter's lr scale and decay.
``freeze.params`` takes the same patterns.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.table import Table
from torch import nn

from .configs import OptimizerConfig
from .errors import ConfigError, closest

__all__ = [
    "NORM_TYPES",
    "ParamRow",
    "compile_pattern",
    "group_params",
    "name_parameters",
    "render_param_table",
    "resolve_params",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
"""Module types whose parameters ``@norm`` selects (batch, instance, group, layer, RMS norms)."""

_Predicate = Callable[[str, nn.Parameter, nn.Module], bool]

_SELECTORS: dict[str, _Predicate] = {
    "@norm": lambda name, p, owner: isinstance(owner, NORM_TYPES),
    "@bias": lambda name, p, owner: name.rsplit(".", 1)[-1] == "bias",
    "@1d": lambda name, p, owner: p.ndim <= 1,
}


@dataclass(frozen=True)
class ParamRow:
    """How one trainable parameter is optimized, and which rule decided it."""

    name: str
    shape: tuple[int, ...]
    rule: str
    weight_decay: float
    adapted: bool
    lr_scale: float
    group_weight_decay: float
    decay_scale: float | None = 1.0
    """``group_weight_decay`` over the optimizer's ``weight_decay``, which a weight-decay
    schedule multiplies (``None``: a rule's decay that no schedule can scale, since the
    optimizer's is 0)."""
    decayed: bool = True
    """False when an exclusion takes the decay term away (``weight_decay`` is then 0)."""
    frozen_steps: int = 0
    """Optimizer steps during which the parameter is frozen (``freeze``)."""

    @property
    def weight_decay_scale(self) -> float | None:
        """What a weight-decay schedule multiplies for this parameter's own decay."""
        return self.decay_scale if self.decayed else 0.0


def compile_pattern(pattern: str, key: str) -> _Predicate:
    """Turn one pattern into a predicate; ``key`` names it in errors."""
    if pattern.startswith("@"):
        if pattern not in _SELECTORS:
            raise ConfigError(
                [f"{key}: unknown selector {pattern!r}; selectors: {', '.join(_SELECTORS)}"]
            )
        return _SELECTORS[pattern]
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as err:
            raise ConfigError([f"{key}: invalid regular expression {pattern!r}: {err}"]) from None
        return lambda name, p, owner: regex.fullmatch(name) is not None
    return lambda name, p, owner: fnmatch.fnmatchcase(name, pattern)


def name_parameters(model: nn.Module) -> None:
    """Set ``param.param_name`` to its full name on every parameter, frozen ones included."""
    for name, param in model.named_parameters():
        param.param_name = name


def _owner(model: nn.Module, name: str) -> nn.Module:
    prefix, _, _ = name.rpartition(".")
    return model.get_submodule(prefix) if prefix else model


class _Rules:
    """Compiled patterns of one config, each remembering whether it matched anything."""

    def __init__(self, patterns: Sequence[str], key: str) -> None:
        self.key = key
        self.patterns = list(patterns)
        self.predicates = [compile_pattern(p, f"{key}[{i}]") for i, p in enumerate(self.patterns)]
        self.matched = [False] * len(self.patterns)

    def first_match(self, name: str, param: nn.Parameter, owner: nn.Module) -> int | None:
        hit = None
        for i, predicate in enumerate(self.predicates):
            if predicate(name, param, owner):
                self.matched[i] = True
                hit = i if hit is None else hit
        return hit

    def unmatched(self, names: list[str]) -> list[str]:
        problems = []
        for i, pattern in enumerate(self.patterns):
            if not self.matched[i]:
                near = closest(pattern.removeprefix("re:"), names, n=5)
                problems.append(
                    f"{self.key}[{i}]: pattern {pattern!r} matches no parameter; "
                    f"close names: {', '.join(near) or '(model has no parameters)'}"
                )
        return problems


def resolve_params(
    model: nn.Module, config: OptimizerConfig, prefix: str = "optim"
) -> list[ParamRow]:
    """Resolve ``config``'s rules for every trainable parameter of ``model`` (tied ones once).

    Raises ConfigError naming each pattern that matches no parameter.
    """
    no_decay = _Rules(config.exclude_from_weight_decay, f"{prefix}.exclude_from_weight_decay")
    no_adapt = _Rules(
        getattr(config, "exclude_from_layer_adaptation", ()),
        f"{prefix}.exclude_from_layer_adaptation",
    )
    has_adaptation = hasattr(config, "exclude_from_layer_adaptation")
    group_rules = [
        _Rules(rule.match, f"{prefix}.param_groups[{i}].match")
        for i, rule in enumerate(config.param_groups)
    ]
    freeze = config.freeze
    frozen = _Rules(freeze.params if freeze else (), f"{prefix}.freeze.params")
    rows = []
    names = []
    for name, param in model.named_parameters():
        names.append(name)
        owner = _owner(model, name)
        reasons = []
        # Every rule sees every parameter, so a rule shadowed by earlier ones is not reported
        # as matching nothing; the first match decides.
        group_hits = [rules.first_match(name, param, owner) for rules in group_rules]
        group_index = next((i for i, hit in enumerate(group_hits) if hit is not None), None)
        lr_scale, group_decay, decay_scale = 1.0, config.weight_decay, 1.0
        if group_index is not None:
            rule = config.param_groups[group_index]
            lr_scale = rule.lr_scale
            if rule.weight_decay is not None:
                group_decay = rule.weight_decay
                decay_scale = _decay_scale(rule.weight_decay, config.weight_decay)
            reasons.append(f"param_groups[{group_index}]")
        decay_hit = no_decay.first_match(name, param, owner)
        if decay_hit is not None:
            reasons.append(f"no decay: {no_decay.patterns[decay_hit]}")
        adapt_hit = no_adapt.first_match(name, param, owner)
        if adapt_hit is not None:
            reasons.append(f"no adaptation: {no_adapt.patterns[adapt_hit]}")
        frozen_hit = frozen.first_match(name, param, owner)
        if frozen_hit is not None:
            reasons.append(f"frozen {freeze.steps} steps: {frozen.patterns[frozen_hit]}")
        if not param.requires_grad:
            continue
        rows.append(
            ParamRow(
                name=name,
                shape=tuple(param.shape),
                rule="; ".join(reasons) or "default",
                weight_decay=0.0 if decay_hit is not None else group_decay,
                adapted=has_adaptation and adapt_hit is None,
                lr_scale=lr_scale,
                group_weight_decay=group_decay,
                decay_scale=decay_scale,
                decayed=decay_hit is None,
                frozen_steps=freeze.steps if frozen_hit is not None else 0,
            )
        )
    problems = no_decay.unmatched(names) + no_adapt.unmatched(names) + frozen.unmatched(names)
    for rules in group_rules:
        problems += rules.unmatched(names)
    if problems:
        raise ConfigError(problems)
    return rows


def _decay_scale(rule_decay: float, decay: float) -> float | None:
    """A rule's decay as a multiple of the optimizer's (``None`` when that is 0 and the rule's
    is not: no multiple of 0 gives it)."""
    if decay > 0:
        return rule_decay / decay
    return 0.0 if rule_decay == 0 else None


def group_params(
    model: nn.Module,
    rows: Sequence[ParamRow],
    lr: float,
    key: Callable[[ParamRow], dict[str, object]],
) -> list[dict[str, object]]:
    """Torch param groups: parameters whose ``key(row)`` settings are equal share one group.

    Long groups let the multi-tensor paths see long lists. Each group gets ``lr`` times its
    ``lr_scale`` and keeps ``lr_scale`` so that a schedule can rescale it
    (:func:`~optim.schedules.set_hyperparameter`). Frozen parameters get groups of their own,
    whose ``frozen_steps`` counts down the steps left (saved with the optimizer's state).
    """
    params = dict(model.named_parameters())
    groups: dict[tuple, dict[str, object]] = {}
    for row in rows:
        settings = {"lr_scale": row.lr_scale, **key(row)}
        if row.frozen_steps:
            settings["frozen_steps"] = row.frozen_steps
        group = groups.setdefault(
            tuple(sorted(settings.items())),
            {"params": [], "lr": lr * row.lr_scale, **settings},
        )
        group["params"].append(params[row.name])
    return list(groups.values())


def render_param_table(rows: Sequence[ParamRow], title: str = "Parameter rules") -> Table:
    """A rich table: parameter, shape, rule, weight decay, adapted, lr scale."""
    table = Table(title=title)
    for column in ("parameter", "shape", "rule", "weight decay", "adapted", "lr scale"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.name,
            "x".join(map(str, row.shape)) or "scalar",
            row.rule,
            f"{row.weight_decay:g}",
            "yes" if row.adapted else "no",
            f"{row.lr_scale:g}",
        )
    return table
