"""Proposers, one module per drafter family (named like its ``models/`` twin), each registering
itself with ``base.serves``; ``proposer_for`` finds a trained drafter's by its type. Every module
of this package is imported here, so a new family's proposer needs no edit of this file.

``propose(context)`` gets every token so far (prompt + emitted; the last one is the root) and
returns a ``DraftTree``. Proposers conditioned on the target's hidden states also declare
``target_layers`` and take ``begin(target)`` / ``observe(features)`` from the loop
(``infer/decode.py``). ``candidates(context, width)`` returns several candidate continuations,
which ``StaticTree`` merges into a prefix tree. Proposers keep their own state (e.g. the draft
LM's KV cache) and resynchronise from ``context`` on every call, so rollback needs no extra call.
"""

import importlib
import pkgutil

from infer.proposers.base import (
    FAMILY_PROPOSERS,
    FAMILY_SETTINGS,
    NEEDS_COSTS,
    StaticTree,
    proposer_for,
    serves,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FAMILY_PROPOSERS", "FAMILY_SETTINGS", "NEEDS_COSTS", "StaticTree", "proposer_for",
           "serves"]  # fmt: skip
