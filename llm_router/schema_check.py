"""A decoded table checked against a msgspec ``Struct`` field by field, every problem kept.

``msgspec.convert`` stops at the first error and words it for a programmer (``Object contains
unknown field `colour` - at `$.models[0]```). ``config check`` must list every mistake of a
file at once, each at its field, with a suggestion for a misspelt name and the valid values of
an enumerated one; this walk does that for any struct (tables within tables, arrays of tables),
converting one field at a time so that a bad field never hides the next one. It never decides
differently from ``msgspec.convert``: a value is refused here exactly when converting it alone
to its field's type fails (plus unknown and missing fields, which ``forbid_unknown_fields`` and
required fields refuse anyway).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
from llm_lab_router.toml_text import TablePath

# (table, key in that table, detail after the key such as "[2]", message)
Report = Callable[[TablePath, str, str, str], None]
_AT = re.compile(r"^(.*?)(?: - at `\$(.*)`)?$", re.DOTALL)


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_table(raw: dict[str, Any], struct: type[msgspec.Struct], at: TablePath, report: Report) -> None:
    """Report every missing, unknown or invalid field of ``raw`` (a table at ``at``)."""
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    for name, f in fields.items():
        if f.required and name not in raw:
            report(at, name, "", "required")
    for key, value in raw.items():
        if key in fields:
            check_value(value, fields[key].type, at, key, report)
        else:
            report(at, key, "", "unknown field" + did_you_mean(key, list(fields)))


def check_value(value: Any, hint: Any, at: TablePath, key: str, report: Report) -> None:
    """Report what is wrong with ``value`` for a field of type ``hint``; tables of a struct type
    (one, or an array of them) are walked field by field."""
    bare = get_args(hint)[0] if get_origin(hint) is Annotated else hint
    element = get_args(bare)[0] if get_origin(bare) is list and get_args(bare) else None
    if _is_struct(bare) and isinstance(value, dict):
        return check_table(value, bare, (*at, key), report)
    if _is_struct(element):
        if isinstance(value, dict):
            header = ".".join(str(p) for p in (*at, key) if isinstance(p, str))
            return report(at, key, "", f"expected an array of tables: write [[{header}]] (two brackets) for each entry")
        if isinstance(value, list):
            for j, item in enumerate(value):
                if isinstance(item, dict):
                    check_table(item, element, (*at, key, j), report)
                else:
                    report(at, key, f"[{j}]", f"expected a table, got {type(item).__name__}")
            return None
    if get_origin(bare) is dict and isinstance(value, dict) and len(get_args(bare)) == 2:
        for name, item in value.items():  # each entry at its own key (env.PATH), not "env[...]"
            check_value(item, get_args(bare)[1], (*at, key), str(name), report)
        return None
    if get_origin(bare) is Literal and isinstance(value, str) and value not in get_args(bare):
        valid = [str(v) for v in get_args(bare)]
        return report(at, key, "", f"{value!r} is not valid; valid values: {', '.join(valid)}"
                                   + did_you_mean(value, valid))
    try:
        msgspec.convert(value, hint)
    except msgspec.ValidationError as exc:
        message, detail = _AT.match(str(exc)).groups()  # type: ignore[union-attr]
        report(at, key, detail or "", message[:1].lower() + message[1:])
    return None


def _is_struct(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, msgspec.Struct)
