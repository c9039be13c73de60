"""Turning pydantic validation errors into messages a person can act on."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

HINTS = {
    "extra_forbidden": "remove it, or check its spelling against the documented fields",
    "literal_error": "use one of the values listed",
    "greater_than_equal": "use a larger number",
    "greater_than": "use a larger number",
    "less_than_equal": "use a smaller number",
    "int_parsing": "use a whole number",
    "float_parsing": "use a number",
    "list_type": "use a YAML list, e.g. [a, b]",
    "dict_type": "use a YAML mapping",
    "bool_parsing": "use true or false",
    "missing": "add it",
    "string_pattern_mismatch": "use letters, digits, '_', '-' and '.' only",
    "too_short": "give at least one",
}


def problems(
    exc: ValidationError,
    prefix: str = "",
    field_word: str = "",
    model: type[BaseModel] | None = None,
) -> list[str]:
    """One ``[prefix][field_word]field: what is wrong (how to fix it)`` line per error; an
    error of the whole object (a cross-field check) names no field, and one whose message
    holds several problems (one per line) gives a line each. With ``model``, an unknown
    field says so in plain words with the closest known field ("did you mean ...?")."""
    return error_lines(exc.errors(), prefix, field_word, model)


def error_lines(
    errors: Sequence[Any],
    prefix: str = "",
    field_word: str = "",
    model: type[BaseModel] | None = None,
) -> list[str]:
    """:func:`problems` of pydantic error entries (``ValidationError.errors()``)."""
    out = []
    for err in errors:
        loc = ".".join(str(x) for x in err["loc"])
        where = f"{field_word}{loc}: " if loc else ""
        hint = HINTS.get(err["type"], "")
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and model is not None and err["loc"]:
            known = fields_at(model, err["loc"][:-1])
            msg, hint = "unknown field", did_you_mean(str(err["loc"][-1]), known) or hint
        for line in msg.splitlines() or [msg]:
            out.append(f"{prefix}{where}{line}" + (f" ({hint})" if hint else ""))
    return out


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """``did you mean `x`?`` for the known name closest to a misspelled one, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    return f"known fields: {', '.join(sorted(known))}" if known else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (itself, or inside Optional/list/dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict, tuple):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The field names a mapping at ``loc`` of ``model`` may hold (list indexes and
    dictionary keys on the way are stepped over)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return []
        info = current.model_fields.get(str(part))
        if info is None:
            continue  # an index or a key of a dict of models: same model further down
        current = _model_in(info.annotation)
    return list(current.model_fields) if current is not None else []


def yaml_line(text: str, loc: Sequence[Any]) -> int | None:
    """The 1-based line of the YAML node at ``loc`` (keys and list indexes), or of the
    deepest node on the way that exists; None when the text does not parse."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if str(key.value) == str(part):
                    # an unknown key is reported at the key itself
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def located_problems(
    exc: ValidationError, text: str, source: str, model: type[BaseModel]
) -> list[str]:
    """Every error of a YAML file validated as ``model``, one line each:
    ``file:line: field: what is wrong (how to fix it / did you mean ...?)``."""
    found: list[tuple[int, str]] = []
    for err in exc.errors():
        line = yaml_line(text, err["loc"])
        for problem in error_lines([err], model=model):
            found.append(
                (line or 0, f"{source}:{line}: {problem}" if line else f"{source}: {problem}")
            )
    return [text_ for _, text_ in sorted(found, key=lambda item: item[0])]  # in file order
