"""The contenders of a speedup run, shared by ``infer.eval`` and the tuner (``infer.tune``): the
entries a command line names, their per-drafter options (tuned settings included), the drafters
loaded against one target, and the prompts spread over categories."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from infer.costs import CostModel, device_name, measure_costs
from infer.proposers import FAMILY_SETTINGS, StaticTree, proposer_for
from infer.proposers.prompt_lookup import PromptLookup
from models.sampling import Sampling
from recipes import load_options
from recipes.schema import EvalConfig


@dataclass
class Entry:
    """One contender of a run: a checkpoint (or ``prompt-lookup``), its label in the tables and
    its own ``key=value`` options (only the per-drafter ones, ``PER_DRAFTER``); ``tuned``: a
    tuning record to use instead of the folder's ``tuned.json`` (one just made for a Hub
    drafter or prompt lookup, which have no folder of their own to write it into)."""

    ckpt: str
    label: str = ""
    overrides: list[str] = field(default_factory=list)
    tuned: dict | None = None


PER_DRAFTER = ("proposer", "num_draft", "tree_width", "tuned", "draft_vocab") + tuple(
    sorted({name for names in FAMILY_SETTINGS.values() for name in names})
)
TUNABLE = ("num_draft", "draft_vocab") + tuple(
    sorted({n for names in FAMILY_SETTINGS.values() for n in names})
)


@dataclass
class Contender:
    """A loaded entry: its drafter (None: prompt lookup), options and how to build proposers."""

    label: str
    ckpt: str
    drafter: object
    options: EvalConfig
    tuned: dict  # the drafter folder's tuned.json ({} when untuned or not used)
    costs: object = None  # the device's CostModel when a setting needs it

    @property
    def num_draft(self) -> int:
        if self.options.num_draft:
            return self.options.num_draft
        return self.drafter.config["num_draft"] if self.drafter is not None else 8

    @property
    def family(self) -> str:
        return self.drafter.drafter_type if self.drafter is not None else "prompt_lookup"

    def settings(self) -> dict:
        """The family options (``FAMILY_SETTINGS``) changed from their defaults."""
        defaults = EvalConfig()
        names = FAMILY_SETTINGS.get(self.family, ())  # prompt lookup takes none
        return {
            name: getattr(getattr(self.options, name), "value", getattr(self.options, name))
            for name in sorted(names)
            if getattr(self.options, name) != getattr(defaults, name)
        }

    def describe(self) -> str:
        """The drafting settings in one line (what the tables print)."""
        parts = [f"num_draft={self.num_draft}"]
        parts += [f"{k}={v}" for k, v in self.settings().items()]
        if self.options.draft_vocab:
            parts.append(f"draft_vocab={self.options.draft_vocab}")
        if self.options.proposer.value == "tree":
            parts.append(f"static tree width {self.options.tree_width}")
        return " ".join(parts) + (" (tuned)" if self.tuned else "")

    def proposer(self, sampling: Sampling, seed: int):
        generator = torch.Generator().manual_seed(seed)
        if self.drafter is None:
            base = PromptLookup(self.num_draft)
        else:
            base = proposer_for(self.drafter, self.num_draft, sampling, generator, self.costs,
                                **self.settings())  # fmt: skip
        if self.options.proposer.value == "tree":
            return StaticTree(base, self.options.tree_width)
        return base


def entry_options(options: EvalConfig, entry: Entry, explicit, tuned: dict) -> EvalConfig:
    """``options`` with the entry's own overrides, then the tuned settings for every tunable
    option neither the command line (``explicit``) nor the entry set."""
    keys = [item.split("=", 1)[0] for item in entry.overrides]
    wrong = [k for k in keys if k not in PER_DRAFTER]
    if wrong:
        raise ValueError(
            f"{', '.join(wrong)}: not a per-drafter option (per drafter: {', '.join(PER_DRAFTER)})"
        )
    parsed = load_options(EvalConfig, entry.overrides)
    options = replace(options, **{k: getattr(parsed, k) for k in keys})
    if options.tuned and tuned.get("settings"):
        chosen = {k: v for k, v in tuned["settings"].items()
                  if k in TUNABLE and k not in keys and k not in explicit}  # fmt: skip
        options = replace(options, **{
            k: type(getattr(options, k))(v) for k, v in chosen.items()
        })  # fmt: skip
    return options


def load_contenders(entries: list[Entry], options: EvalConfig, explicit=()):
    """(target, tokenizer, target name, contenders): one target for every drafter in the run
    (the drafters' own, which must agree, or ``target=``); a drafter made for another
    vocabulary, width or tokenizer is refused."""
    from models.drafter import (
        TargetInfo,
        load_drafter,
        read_drafter_config,
        read_tuned,
        resolve_drafter_folder,
    )  # fmt: skip
    from models.target import load_target
    from models.vocab import frequent_ids, read_counts, restrict_vocab
    from recipes.schema import DEFAULT_TARGET

    if not entries:
        raise ValueError("no drafter to evaluate: give one or more CKPT (or prompt-lookup)")
    folders = {e.ckpt: resolve_drafter_folder(e.ckpt) for e in entries if e.ckpt != "prompt-lookup"}
    metas = {ckpt: read_drafter_config(folder) for ckpt, folder in folders.items()}
    named = sorted({meta["target"]["id"] for meta in metas.values()})
    if not options.target and len(named) > 1:
        raise ValueError(
            f"the drafters were trained for different targets ({', '.join(named)}): pass "
            "target=... to compare them on one (drafters made for another vocabulary are refused)"
        )
    families = {meta["drafter_type"] for meta in metas.values()}
    families |= {"prompt_lookup"} if any(e.ckpt == "prompt-lookup" for e in entries) else set()
    for key in sorted(explicit):
        owners = sorted(f for f, names in FAMILY_SETTINGS.items() if key in names)
        if owners and not families & set(owners):
            raise ValueError(
                f"{key}: an option of {', '.join(owners)} drafters, and this run has none "
                f"(drafter types: {', '.join(sorted(families))})"
            )
    if "draft_vocab" in explicit and not folders:
        raise ValueError(
            "draft_vocab: an option of trained drafters (draft_lm, deer, medusa, hydra), and this "
            "run has only prompt lookup"
        )
    name = options.target or (named[0] if named else DEFAULT_TARGET)
    target, tokenizer = load_target(name, options.dtype.value, options.device)
    info = TargetInfo.of(target, tokenizer, name)
    loaded, contenders, labels = {}, [], set()
    for entry in entries:
        drafter, tuned = None, entry.tuned or {}
        if entry.tuned is None and entry.ckpt != "prompt-lookup":
            tuned = read_tuned(folders[entry.ckpt])
        opts = entry_options(options, entry, explicit, tuned)
        if entry.ckpt != "prompt-lookup":
            key = (entry.ckpt, opts.draft_vocab)  # a reduced vocabulary is a drafter of its own
            if key not in loaded:
                loaded[key] = load_drafter(entry.ckpt, info).to(target.device, target.dtype)
                if opts.draft_vocab:
                    ids = frequent_ids(read_counts(folders[entry.ckpt]), opts.draft_vocab)
                    restrict_vocab(loaded[key], ids)
            drafter = loaded[key]
        label = entry.label or " ".join([entry.ckpt, *entry.overrides])
        if label in labels:
            raise ValueError(f"two contenders are both labelled '{label}': label them apart")
        labels.add(label)
        contenders.append(Contender(label, entry.ckpt, drafter, opts, tuned if opts.tuned else {}))
    return target, tokenizer, name, contenders


def spread(prompts: list, limit: int) -> list:
    """The first ``limit`` prompts taken round-robin over categories (0 = all)."""
    if not limit or limit >= len(prompts):
        return prompts
    queues: dict[str, list] = {}
    for p in prompts:
        queues.setdefault(p.category, []).append(p)
    picked, turn = [], 0
    while len(picked) < limit:
        queue = list(queues.values())[turn % len(queues)]
        if queue:
            picked.append(queue.pop(0))
        turn += 1
    return picked


def costs_for(contender: Contender, target):
    """The cost curve a setting needs: the tuned one measured on this device, else measured
    now."""
    saved = contender.tuned.get("costs")
    if saved and saved.get("device") == device_name(target):
        return CostModel.from_json(saved)
    print(f"{contender.label}: measuring this device's verification cost curve", flush=True)
    return measure_costs(target)
