"""Turning pydantic validation errors into messages a person can act on."""

from __future__ import annotations

from pydantic import ValidationError

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


def problems(exc: ValidationError, prefix: str = "", field_word: str = "") -> list[str]:
    """One ``[prefix][field_word]field: what is wrong (how to fix it)`` line per error; an
    error of the whole object (a cross-field check) names no field."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        where = f"{field_word}{loc}: " if loc else ""
        hint = HINTS.get(err["type"], "")
        msg = str(err["msg"]).removeprefix("Value error, ")
        out.append(f"{prefix}{where}{msg}" + (f" ({hint})" if hint else ""))
    return out
