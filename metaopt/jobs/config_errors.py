"""Validation errors of a job's config: made at a field, and shown one line per problem.

The schema (``metaopt.jobs.schema``) raises its own problems as pydantic ``ValidationError`` s
at the field they concern (`field_error`), moves a nested model's under its field
(`nested_errors`), and reports several together (`joined_errors`). `format_validation_error`
turns one into the lines ``metaopt run`` prints: the field's dotted path, the optimizer's name,
the message and the value given, with a did-you-mean for a misspelt name (`did_you_mean`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError


def did_you_mean(word: str, choices: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to ``word``, or "" where none is close."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def field_error(loc: tuple, message: str, value: Any) -> ValidationError:
    """A ValidationError with one entry at ``loc``.

    ``loc`` is relative to the model being validated; pydantic prefixes the location of the
    enclosing fields.
    """
    details: InitErrorDetails = {"type": PydanticCustomError("invalid", message), "loc": loc, "input": value}
    return ValidationError.from_exception_data("config", [details])


def nested_errors(prefix: tuple, err: ValidationError) -> ValidationError:
    """``err``'s entries moved under ``prefix`` (e.g. a family's options under ``options``)."""
    details: list[InitErrorDetails] = [
        {
            "type": PydanticCustomError(
                "invalid", "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
            ),
            "loc": prefix + tuple(e["loc"]),
            "input": e.get("input"),
        }
        for e in err.errors()
    ]
    return ValidationError.from_exception_data("config", details)


def joined_errors(errors: list[ValidationError]) -> ValidationError:
    """One ValidationError holding the entries of ``errors``, in order."""
    details: list[InitErrorDetails] = [
        {"type": PydanticCustomError("invalid", e["msg"]), "loc": tuple(e["loc"]), "input": e.get("input")}
        for err in errors for e in err.errors()
    ]
    return ValidationError.from_exception_data("config", details)


def format_validation_error(err: ValidationError, raw: Mapping[str, Any] | None = None, *, model: type[BaseModel]) -> str:
    """One line per problem.

    Each line gives the field's dotted path (with the optimizer's name where known), the message,
    and the value given; an unknown field, the closest field of its model or the known ones.

    Args:
        err: the error of validating ``raw``.
        raw: the mapping validated (it names the optimizers of ``optimizers.<i>``), if at hand.
        model: the model ``raw`` was validated against (``JobConfig``), whose fields the hint
            for a misspelt one walks.
    """
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        where = ".".join(loc) or "(config)"
        if raw is not None and len(e["loc"]) >= 2 and e["loc"][0] == "optimizers" and isinstance(e["loc"][1], int):
            items = raw.get("optimizers")
            if isinstance(items, list) and e["loc"][1] < len(items) and isinstance(items[e["loc"][1]], dict):
                label = items[e["loc"][1]].get("name") or items[e["loc"][1]].get("kind")
                if label:
                    where += f" (optimizer {label!r})"
        msg = e["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if e["type"] == "extra_forbidden":
            msg = "unknown field" + unknown_field_hint(e["loc"], model)
        elif e["type"] != "invalid" and "input" in e and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def unknown_field_hint(loc: tuple, model: type[BaseModel]) -> str:
    """'; did you mean ...' for a misspelt field at ``loc`` of ``model``, from the model the field sits in."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann  # type: ignore[assignment]
        elif inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
            model = inner[0]
        else:
            return ""
    fields = list(getattr(model, "model_fields", {}))
    hint = did_you_mean(str(loc[-1]), fields)
    return hint or (f"; known fields: {', '.join(fields)}" if fields else "")
