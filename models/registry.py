"""Registry of drafter families: ``drafter.type`` in a recipe names one of these."""

from __future__ import annotations

from collections.abc import Callable

DRAFTERS: dict[str, type] = {}
# imported by load_families(); each registers its types
FAMILY_MODULES = (
    "models.draft_lm",
    "models.dflash",
    "models.deer",
    "models.d2sd",
    "models.heads",
    "models.hidden_transfer",
    "models.falcon",
    "models.eagle3",
)


def load_families() -> dict[str, type]:
    """Import every drafter family module (registration happens at class definition)."""
    import importlib

    for module in FAMILY_MODULES:
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
