"""Registry of drafter families: ``drafter.type`` in a recipe names one of these."""

from __future__ import annotations

from collections.abc import Callable

DRAFTERS: dict[str, type] = {}


def family_modules() -> list[str]:
    """The modules of ``models/`` that register a drafter family (``@register_drafter(...)`` in
    their source): a new family's module is found without editing a list."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    return [f"models.{path.stem}" for path in sorted(here.glob("*.py"))
            if path.stem != "registry" and "@register_drafter(" in path.read_text()]  # fmt: skip


def load_families() -> dict[str, type]:
    """Import every drafter family module (registration happens at class definition)."""
    import importlib

    for module in family_modules():
        importlib.import_module(module)
    return DRAFTERS


def register_drafter(name: str) -> Callable[[type], type]:
    """Class decorator: make a drafter family selectable as ``drafter.type=<name>``."""

    def add(cls: type) -> type:
        if name in DRAFTERS:
            raise ValueError(f"drafter type '{name}' is registered twice")
        DRAFTERS[name] = cls
        cls.drafter_type = name
        return cls

    return add
