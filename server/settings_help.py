"""What `--help` and the README say about one setting, derived from its pydantic field (no import of
server.config, which builds its CLI from these)."""

from __future__ import annotations

import enum
import typing
from pathlib import Path

import annotated_types
from pydantic.fields import FieldInfo

ENV_PREFIX = "LORAPLEX_"


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def default_text(field: FieldInfo) -> str:
    """The field's default as a user would type it: `unset` for None, `~` for the home directory."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Path):
        home = str(Path.home())
        text = str(value)
        return "~" + text[len(home):] if text == home or text.startswith(home + "/") else text
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def choices(field: FieldInfo) -> list[str] | None:
    """The allowed values of a Literal or Enum field, else None."""
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return [str(arg) for arg in typing.get_args(annotation)]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(member.value) for member in annotation]
    return None


def metavar(field: FieldInfo) -> str:
    """What `--help` shows as the flag's value: the choices, or the kind of value."""
    allowed = choices(field)
    if allowed:
        return "{" + ",".join(allowed) + "}"
    kinds = {int: "N", float: "X", str: "TEXT", Path: "PATH"}
    args = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
    return kinds.get(args[0], "VALUE")


def bounds(field: FieldInfo) -> str | None:
    """The numeric range a field accepts, e.g. `>= 1, <= 256`, else None."""
    parts = []
    for item in field.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(item, getattr(annotated_types, attr.capitalize())):
                parts.append(f"{symbol} {getattr(item, attr)}")
    return ", ".join(parts) or None


def help_text(name: str, field: FieldInfo) -> str:
    """`--help` text of one setting: its description, choices, range, default and env variable."""
    details = []
    allowed = choices(field)
    if allowed:
        details.append("choices: " + ", ".join(allowed))
    limits = bounds(field)
    if limits:
        details.append(limits)
    details.append(f"default: {default_text(field)}")
    is_list = typing.get_origin(field.annotation) is list
    details.append(f"env: {env_name(name)}" + (", a JSON list" if is_list else ""))
    text = f"{field.description or ''} ({'; '.join(details)})"
    return text.replace("%", "%%")  # argparse formats help with %
