"""What every proposer shares: the registry (``serves``, ``proposer_for``; the package imports
each family's module, which registers itself) and ``StaticTree``. The proposer contract is in
the package's docstring (``infer/proposers/__init__.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from infer.tree import DraftTree
from models.sampling import Sampling

# drafter type -> (drafter, num_draft, sampling, generator) -> proposer; filled by ``serves``
FAMILY_PROPOSERS: dict[str, Callable] = {}
# settings only some families take (infer.eval flags): family -> names
FAMILY_SETTINGS: dict[str, tuple[str, ...]] = {}
NEEDS_COSTS = ("cost_cut",)  # settings that take the device's cost curve (``costs=``)


def serves(*drafter_types: str, settings: tuple[str, ...] = ()):
    """Register a proposer (a class or a builder taking ``(drafter, num_draft, sampling,
    generator)`` and, for ``cost_cut``, ``costs``) for ``drafter_types``, with the family options
    it takes (``infer.eval`` flags)."""

    def add(build):
        for name in drafter_types:
            if name in FAMILY_PROPOSERS:
                raise ValueError(f"drafter type '{name}' has two proposers")
            FAMILY_PROPOSERS[name] = build
            if settings:
                FAMILY_SETTINGS[name] = tuple(settings)
        return build

    return add


class StaticTree:
    """Several candidates per position from any proposer with ``candidates``, verified as one
    prefix tree (e.g. the draft LM's greedy chain plus its top-``width`` alternatives at every
    depth, or several prompt-lookup matches). Candidates are deterministic, so sampling verifies
    them by token matching."""

    def __init__(self, proposer, width: int = 2):
        if width < 1:
            raise ValueError(f"tree width {width}: must be >= 1")
        self.proposer, self.width = proposer, width
        self.target_layers = getattr(proposer, "target_layers", None)  # feature proposers

    def begin(self, target) -> None:
        self.proposer.begin(target)

    def observe(self, features: torch.Tensor) -> None:
        self.proposer.observe(features)

    def propose(self, context: list[int]) -> DraftTree:
        return DraftTree.trie(self.proposer.candidates(context, self.width))


def proposer_for(
    drafter, num_draft: int, sampling: Sampling, generator=None, costs=None, **settings
):  # fmt: skip
    """The proposer serving a trained drafter (``num_draft`` 0: the drafter's own default);
    ``settings`` are family options (``FAMILY_SETTINGS``), refused for other families;
    ``costs`` the device's ``CostModel`` for the settings that need it."""
    build = FAMILY_PROPOSERS.get(drafter.drafter_type)
    if build is None:
        raise ValueError(
            f"drafter type '{drafter.drafter_type}' has no proposer in infer/ yet "
            f"(served types: {', '.join(sorted(FAMILY_PROPOSERS))})"
        )
    takes = FAMILY_SETTINGS.get(drafter.drafter_type, ())
    wrong = sorted(set(settings) - set(takes))
    if wrong:
        owners = sorted(f for f, names in FAMILY_SETTINGS.items() if set(wrong) & set(names))
        raise ValueError(
            f"{', '.join(wrong)}: option(s) of {', '.join(owners) or 'no'} drafters, not of "
            f"drafter type '{drafter.drafter_type}'"
        )
    if costs is not None and any(settings.get(name) for name in NEEDS_COSTS):
        settings["costs"] = costs
    return build(drafter, num_draft or drafter.config["num_draft"], sampling, generator, **settings)
