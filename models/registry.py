"""Registry of drafter families: ``drafter.type`` in a recipe names one of these."""

from __future__ import annotations

from collections.abc import Callable

DRAFTERS: dict[str, type] = {}


def register_drafter(name: str) -> Callable[[type], type]:
    """Class decorator: make a drafter family selectable as ``drafter.type=<name>``."""

    def add(cls: type) -> type:
        if name in DRAFTERS:
            raise ValueError(f"drafter type '{name}' is registered twice")
        DRAFTERS[name] = cls
        return cls

    return add
