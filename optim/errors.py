"""One error type for invalid configuration, with every problem named by its dotted key."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["ConfigError", "closest", "from_validation_error", "one_line", "short_repr"]


class ConfigError(ValueError):
    """Invalid configuration: one line per problem, each starting with its dotted key."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def closest(word: str, candidates: Iterable[str], n: int = 1) -> list[str]:
    """The ``n`` candidates most similar to ``word``, best first."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.0)


class _ShortRepr(reprlib.Repr):
    """``reprlib`` with small limits, and an integer too long to print by its size.

    (``repr`` refuses integers of more than 4300 digits; reprlib would call it and fail.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 2
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 4
        self.maxdict = 3
        self.maxstring = 80
        self.maxother = self.maxlong = 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() <= 1024:
            return super().repr_int(x, level)
        return f"<an integer of {x.bit_length()} bits>"


_SHORT = _ShortRepr()
_MAX_REPR = 100


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to at most 100 characters with an ellipsis, in bounded time.

    Error messages echo what the user wrote, which may be huge (a list of a million items, a
    billion values reached through YAML aliases): the echo only has to identify it.
    """
    text = _SHORT.repr(value)
    return text if len(text) <= _MAX_REPR else f"{text[: _MAX_REPR - 3]}..."


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error's text as one line of at most ``limit`` characters (whitespace collapsed, an
    ellipsis where it is cut; the exception's type name when it has no text), for messages
    that must stay one line whatever a library's own message holds."""
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The Pydantic models inside an annotation (through Optional, Union, list, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _tag(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("name")
    return field.default if field is not None else None


def _walk(
    model: type[BaseModel], loc: Sequence[str | int]
) -> tuple[list[str | int], list[type[BaseModel]]]:
    """Follow ``loc`` through nested models: the key as a user writes it, and the models there.

    Discriminated unions put their tag in ``loc`` (``method.byol.tau``): the tag picks the
    member and is left out of the key (``method.tau``).
    """
    key: list[str | int] = []
    candidates = [model]
    for part in loc:
        if isinstance(part, int):
            key.append(part)
            continue
        tagged = [m for m in candidates if _tag(m) == part]
        if tagged and part not in candidates[0].model_fields:
            candidates = tagged
            continue
        key.append(part)
        field = candidates[0].model_fields.get(part) if candidates else None
        candidates = _models_in(field.annotation) if field is not None else []
    return key, candidates


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
        key = _dotted(prefix, _walk(model, loc)[0])
        nested = item.get("ctx", {}).get("error")
        if isinstance(nested, ConfigError):
            problems.extend(nested.problems)
        elif item["type"] == "extra_forbidden":
            owners = _walk(model, loc[:-1])[1]
            allowed = list(owners[0].model_fields) if owners else []
            hint = closest(str(loc[-1]), allowed)
            guess = f"did you mean '{hint[0]}'? " if hint else ""
            problems.append(f"{key}: unknown key; {guess}allowed keys: {', '.join(allowed)}")
        elif item["type"] == "missing":
            problems.append(f"{key}: required value is missing")
        elif item["type"] == "value_error":
            problems.append(f"{key}: {nested}")
        elif item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            problems.append(f"{key}.name: {item['msg']}")
        else:
            problems.append(f"{key}: {item['msg']} (got {short_repr(item['input'])})")
    return ConfigError(problems)
