"""One error type for invalid configuration, with every problem named by its dotted key."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ValidationError

__all__ = ["ConfigError", "closest", "from_validation_error"]


class ConfigError(ValueError):
    """Invalid configuration: one line per problem, each starting with its dotted key."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def closest(word: str, candidates: Iterable[str], n: int = 1) -> list[str]:
    """The ``n`` candidates most similar to ``word``, best first."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.0)


def _fields_at(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """Field names of the (nested) model that owns the key at ``loc``."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        inner = [annotation, *getattr(annotation, "__args__", ())]
        nested = [t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _dotted(prefix: str, loc: Sequence[str | int]) -> str:
    """``optim`` + ("param_groups", 0, "match") -> ``optim.param_groups[0].match``."""
    key = prefix
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key


def from_validation_error(
    error: ValidationError, model: type[BaseModel], prefix: str
) -> ConfigError:
    """Turn pydantic's report into one line per problem: key, bad value, what is allowed."""
    problems = []
    for item in error.errors():
        loc = item["loc"]
        key = _dotted(prefix, loc)
        if item["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc)
            hint = closest(str(loc[-1]), allowed)
            guess = f"did you mean '{hint[0]}'? " if hint else ""
            problems.append(f"{key}: unknown key; {guess}allowed keys: {', '.join(allowed)}")
        elif item["type"] == "missing":
            problems.append(f"{key}: required value is missing")
        else:
            problems.append(f"{key}: {item['msg']} (got {item['input']!r})")
    return ConfigError(problems)
