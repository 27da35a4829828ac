"""The README's config-key tables, generated from the config schema.

Every key's default, allowed values and description come from the Pydantic models (the
experiment sections, the built-in methods' and optimizers' configs), so the tables cannot drift
from the code: a test fails when the README differs from what this module renders.

    python -m ssl_toolkit.config_reference README.md          # rewrite the tables in place
    python -m ssl_toolkit.config_reference README.md --check  # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from optim import OptimizerConfig
from optim.registry import OPTIMIZERS
from ssl_toolkit.config import ConfigSection, ExperimentConfig
from ssl_toolkit.methods import METHODS, MethodConfig

__all__ = ["TABLES", "method_rows", "render_table", "update_readme"]


def _builtin(registry: Any, package: str) -> dict[str, type[BaseModel]]:
    """The registry's entries defined in ``package`` (not test or plugin registrations)."""
    return {
        name: registry.entry(name).config_cls
        for name in registry.names()
        if registry.entry(name).config_cls.__module__.split(".")[0] == package
    }


def _code(value: Any) -> str:
    return f"`{value}`"


def _value(value: Any) -> str:
    """A default as YAML would spell it."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float):
        return repr(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1000, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    default = field.get_default(call_default_factory=True)
    return _code(_value(default))


def _bounds(metadata: list[Any]) -> str:
    """``>= 0``, ``(0, 1]`` and the like from annotated-types constraints."""
    low = next(
        (m for m in metadata if isinstance(m, (annotated_types.Ge, annotated_types.Gt))), None
    )
    high = next(
        (m for m in metadata if isinstance(m, (annotated_types.Le, annotated_types.Lt))), None
    )
    if low is not None and high is not None:
        left = "[" if isinstance(low, annotated_types.Ge) else "("
        right = "]" if isinstance(high, annotated_types.Le) else ")"
        return f"{left}{_limit(low)}, {_limit(high)}{right}"
    if low is not None:
        return f"{'>=' if isinstance(low, annotated_types.Ge) else '>'} {_limit(low)}"
    if high is not None:
        return f"{'<=' if isinstance(high, annotated_types.Le) else '<'} {_limit(high)}"
    return ""


def _limit(constraint: Any) -> str:
    value = next(getattr(constraint, a) for a in ("ge", "gt", "le", "lt") if hasattr(constraint, a))
    return f"{value:g}"


def _allowed(annotation: Any, metadata: list[Any]) -> str:
    """What a user may write for a key of this type, in words."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _allowed(args[0], [*metadata, *args[1:]])
    if origin is Literal:
        return ", ".join(_code(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("`null`" if a is type(None) else _allowed(a, metadata) for a in args)
    if origin is list:
        inner = args[0]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return f"list of `{{{', '.join(inner.model_fields)}}}`"
        return "list of strings" if inner is str else "list"
    if origin is tuple:
        inner = get_args(args[0])
        return f"{len(args)} numbers in {_bounds(list(inner[1].metadata))}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"`{{{', '.join(annotation.model_fields)}}}`"
    if annotation is bool:
        return "`true`, `false`"
    if annotation in (int, float):
        bounds = _bounds(metadata)
        kind = "integer" if annotation is int else "number"
        return f"{kind} {bounds}" if bounds else kind
    if annotation is str:
        return "text"
    raise TypeError(f"no wording for {annotation!r}")


def _field_row(key: str, field: FieldInfo, prefix: str = "") -> list[str]:
    if not field.description:
        raise ValueError(f"{key}: the field has no description")
    allowed = _allowed(field.annotation, list(field.metadata))
    return [_code(key), _default(field), allowed, prefix + field.description]


def _optional_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a ``Model | None`` key (``clip_grad``, ``schedule.weight_decay``), whose
    own keys get rows below the key's."""
    if get_origin(annotation) not in (Union, types.UnionType):
        return None
    models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 and type(None) in get_args(annotation) else None


def _nested_rows(key: str, field: FieldInfo) -> Iterator[list[str]]:
    """The row of ``key``, then, for an optional section, a row for each of its keys."""
    yield _field_row(key, field)
    model = _optional_model(field.annotation)
    if model is not None:
        for name, inner in model.model_fields.items():
            yield _field_row(f"{key}.{name}", inner)


def _section_rows(prefix: str, model: type[BaseModel]) -> Iterator[list[str]]:
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, ConfigSection):
            yield from _section_rows(key, annotation)
        else:
            yield from _nested_rows(key, field)


def method_rows() -> Iterator[list[str]]:
    """``method.name``, then every built-in method's own keys, prefixed by the method."""
    methods = _builtin(METHODS, "ssl_toolkit")
    yield [
        "`method.name`",
        _code(
            _value(
                ExperimentConfig.model_fields["method"].get_default(call_default_factory=True).name
            )
        ),
        ", ".join(_code(name) for name in methods) + ", or a registered plugin",
        "the SSL method; its keys follow",
    ]
    shared = MethodConfig.model_fields
    for key, field in shared.items():
        if key != "name":
            yield _field_row(f"method.{key}", field, prefix="every method: ")
    for name, config in methods.items():
        for key, field in config.model_fields.items():
            if key not in shared:
                yield _field_row(f"method.{key}", field, prefix=f"{name}: ")


def experiment_rows() -> Iterator[list[str]]:
    """Every key of the experiment config, section by section."""
    yield from method_rows()
    for section, field in ExperimentConfig.model_fields.items():
        if section == "method":
            continue
        if section == "optim":
            yield ["`optim.*`", "", "see the optimizer keys", field.description or ""]
            continue
        yield from _section_rows(section, field.annotation)


def optimizer_rows() -> Iterator[list[str]]:
    """Every key of the built-in optimizers, with the optimizers that take it."""
    builtin = _builtin(OPTIMIZERS, "optim")
    configs = {name: builtin[name] for name in sorted(builtin, key=lambda n: n != "lars")}
    keys: dict[str, list[str]] = {}
    for name, config in configs.items():
        for key in config.model_fields:
            keys.setdefault(key, []).append(name)
    yield [
        "`name`",
        "all",
        "required",
        ", ".join(_code(n) for n in configs) + ", or a registered plugin",
        OptimizerConfig.model_fields["name"].description or "",
    ]
    keys.pop("name")
    for key, names in keys.items():
        fields = [configs[name].model_fields[key] for name in names]
        defaults: dict[str, list[str]] = {}
        for name, field in zip(names, fields, strict=True):
            defaults.setdefault(_default(field), []).append(name)
        default = (
            next(iter(defaults))
            if len(defaults) == 1
            else ", ".join(f"{'/'.join(n)} {d}" for d, n in defaults.items())
        )
        where = "all" if len(names) == len(configs) else ", ".join(names)
        rows = list(_nested_rows(key, fields[0]))
        yield [rows[0][0], where, default, rows[0][2], rows[0][3]]
        for row in rows[1:]:
            yield [row[0], where, row[1], row[2], row[3]]


def render_table(header: list[str], rows: Iterator[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {
    "experiment-keys": lambda: render_table(
        ["key", "default", "allowed", "meaning"], experiment_rows()
    ),
    "optimizer-keys": lambda: render_table(
        ["key", "optimizers", "default", "allowed", "meaning"], optimizer_rows()
    ),
}
"""The generated regions of the README, by marker name."""


def _region(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- generated: {name} -->\n)(?:.*?\n)?(<!-- end generated: {name} -->)", re.DOTALL
    )


def update_readme(text: str) -> str:
    """``text`` with every generated region replaced by what the schema renders now."""
    for name, render in TABLES.items():
        match = _region(name).search(text)
        if match is None:
            raise ValueError(f"the README has no region <!-- generated: {name} -->")
        text = f"{text[: match.end(1)]}{render()}\n{text[match.start(2) :]}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Rewrite the tables of a README, or with ``--check`` say whether they are current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readme", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 if the tables are stale")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    updated = update_readme(text)
    if args.check:
        if updated != text:
            print(f"{args.readme}: config tables are stale; run make docs", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
