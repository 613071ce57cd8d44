"""Launch choices overridden from a setting's "name=value,..." text, for engine A/B timing of kernel launches whose
micro-benchmarks run on inputs warmer than a step's (LORAPLEX_DECODE_TUNING, LORAPLEX_LORA_SHRINK_TUNING)."""

from __future__ import annotations


def launch_overrides(text: str, known: dict, setting: str, nullable: tuple[str, ...] = ()) -> dict:
    """{name: value} from "name=value,..." for names of `known`: true or false where known's value is a bool, a
    positive integer otherwise, or none for the names in `nullable`. A ValueError names the setting and the item."""
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in known or not value:
            raise ValueError(f"{setting}: {item!r} is not name=value of {sorted(known)}")
        if isinstance(known[name], bool):
            if value not in ("true", "false"):
                raise ValueError(f"{setting}: {item!r} needs true or false")
            overrides[name] = value == "true"
        elif value == "none" and name in nullable:
            overrides[name] = None
        elif value.isdigit() and int(value) > 0:
            overrides[name] = int(value)
        else:
            raise ValueError(f"{setting}: {item!r} needs a positive integer")
    return overrides
