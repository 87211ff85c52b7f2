"""The drafter interface every family implements, and its Hugging Face-format save and load.

A drafter family is a ``Drafter`` subclass registered with ``@register_drafter(name)``. It owns
its weights and its objective; the training engine, checkpoints, logging and publishing are
shared. What flows between the engine and a family:

- ``Batch``: token ids and masks of one micro-batch, plus any teacher signals cached offline.
- ``Teacher``: what the frozen target computed for that batch online (its logits, and the hidden
  states of the layers the drafter asked for through ``target_layers``).
- ``LossOutput``: the loss, how many positions it averages over, and summed metrics.

A saved drafter is a folder with ``config.json`` (drafter type, family config, and the target it
was trained for: id, vocab size, hidden size, tokenizer and config hashes) and
``model.safetensors``. No pickle is written or read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file

from models.registry import DRAFTERS, load_families

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TUNED_NAME = "tuned.json"  # drafting settings tuned to a device (infer/tune.py)
COUNTS_NAME = "vocab_counts.safetensors"  # response-token counts (models/vocab.py)


@dataclass(frozen=True)
class TargetInfo:
    """What a drafter must match in its target."""

    id: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    tokenizer_sha256: str
    config_sha256: str

    @classmethod
    def of(cls, model, tokenizer, name: str) -> TargetInfo:
        from models.target import config_hash, tokenizer_hash

        config = model.config
        return cls(
            id=name,
            vocab_size=model.get_output_embeddings().weight.shape[0],
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            tokenizer_sha256=tokenizer_hash(tokenizer),
            config_sha256=config_hash(config),
        )

    def check(self, other: TargetInfo, drafter: str) -> None:
        """Refuse a target whose vocabulary, width or tokenizer differ, naming both sides."""
        for key in ("vocab_size", "hidden_size", "tokenizer_sha256"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                raise ValueError(
                    f"drafter {drafter} was trained for target {self.id} with {key} {mine}, "
                    f"but the target given is {other.id} with {key} {theirs}; "
                    "use the drafter's own target or train one for this target"
                )


@dataclass
class Batch:
    """One micro-batch, right-padded.

    Attributes:
        input_ids: (B, T) prompt + response tokens.
        attention_mask: (B, T) 1 on real tokens.
        loss_mask: (B, T) 1 where position t predicts a response token t + 1.
        topk_ids, topk_logprobs: (B, T, K) cached target top-k at predicting positions, or None.
        hidden_states: layer -> (B, T, H) cached target hidden states, empty when not cached.
        anchors: (B, N) block-drafter anchor positions (-1 = none), set by ``prepare_batch``.
        step: the optimiser step this micro-batch belongs to (for staged objectives).
        extra: other family-specific tensors set by ``prepare_batch`` (e.g. visible prefixes).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)
    anchors: torch.Tensor | None = None
    step: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.loss_mask.to(device),
            move(self.topk_ids),
            move(self.topk_logprobs),
            {k: v.to(device) for k, v in self.hidden_states.items()},
            move(self.anchors),
            self.step,
            {k: v.to(device) for k, v in self.extra.items()},
        )


@dataclass
class Teacher:
    """The frozen target's signals for a batch (computed online, or taken from the cache).

    Attributes:
        logits: (B, T, V) target logits (position t predicts token t + 1), or None.
        hidden_states: layer index (as in HF ``hidden_states``, 0 = embeddings) -> (B, T, H).
        topk_ids, topk_logprobs: (B, T, K) target top-k, when only the top-k is known.
    """

    logits: torch.Tensor | None = None
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None


@dataclass
class Stage:
    """One training stage: ``module`` (a Drafter) is trained for ``steps`` optimiser steps
    (0: ``train.steps``); ``name`` names its checkpoints and log records ("" for a one-stage
    run)."""

    name: str
    module: torch.nn.Module
    steps: int = 0


@dataclass
class LossOutput:
    """``loss`` averages over ``n_positions`` (this process's share); ``metrics`` are sums over
    the same positions, reduced across processes and divided by the global position count."""

    loss: torch.Tensor
    n_positions: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Drafter(torch.nn.Module):
    """Base class of every drafter family.

    Subclasses set ``drafter_type`` (via ``@register_drafter``), build themselves from the recipe
    in ``from_recipe``, and rebuild from ``self.config`` (JSON-able) in ``__init__`` so that
    ``load_drafter`` can restore them.
    """

    drafter_type: ClassVar[str] = ""
    windowed: ClassVar[bool] = False  # takes drafter.attention_window (``models/window.py``)

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__()
        self.config = config
        self.target = target

    @classmethod
    def from_recipe(cls, cfg, target_model, target: TargetInfo, tokenizer=None) -> Drafter:
        """A new drafter for ``target_model`` from the recipe's ``drafter`` section
        (``tokenizer``: the target's, for families that need to know its ids)."""
        raise NotImplementedError

    def stages(self) -> list[Stage]:
        """What the training run trains, in order: one stage training the whole drafter, unless
        a family trains its parts one after the other (each stage a ``Drafter`` of its own with
        its own optimiser, schedule and checkpoints; the run resumes across the switch)."""
        return [Stage("", self)]

    def heldout_rows(self) -> int:
        """Rows of the dataset kept out of training and handed to ``after_stage``."""
        return 0

    def fit_data(self, counts: torch.Tensor) -> None:
        """Called once before training with how often each token id is a response token in the
        training rows (e.g. EAGLE-3 picks its draft vocabulary from them)."""

    def after_stage(self, name: str, heldout) -> dict:
        """Called when stage ``name`` finished (also on a resumed run), with the full weights
        of that stage and ``heldout``: an iterable of (Batch, Teacher) over the held-out rows.
        Returns figures for ``training.json`` (e.g. calibration)."""
        return {}

    def eval_variants(self) -> dict[str, list[str]]:
        """Ablations worth evaluating beside the drafter itself: label -> ``infer.eval``
        options (e.g. D²SD's drafter 1 alone: ``["branches=0"]``)."""
        return {}

    def attach_target(self, target_model) -> None:
        """Hook for families that use some of the target's modules frozen (e.g. its embedding
        and LM head): keep references to them without registering them, so they are neither
        trained nor saved. Called on a new drafter, and again after loading."""

    def prepare_batch(self, batch: Batch) -> Batch:
        """Family-specific additions to a micro-batch before the forward (e.g. sampled block
        anchors); must draw randomness from torch's global generator (checkpointed)."""
        return batch

    def loss_positions(self, batch: Batch) -> int:
        """How many positions ``objective`` will average over for ``batch``, known before the
        forward (weights micro-batches within a step)."""
        return int(batch.loss_mask.sum())

    def target_layers(self) -> list[int]:
        """Target hidden-state layers the drafter is conditioned on (empty: none)."""
        return []

    def needs_target_logits(self, cached_topk: bool) -> bool:
        """Whether the objective needs the target's logits online; ``cached_topk`` says the
        batch carries the target's top-k from the dataset."""
        return True

    def heldout_hits(self, batch: Batch, teacher: Teacher) -> torch.Tensor | None:
        """(b, T, K) bool for held-out metrics (``train/heldout.py``): for every position t whose
        next token is a response token, whether slot k + 1 of the chain the drafter drafts at t
        is right, given the true tokens up to t. None: the family has no chain to walk."""
        return None

    def forward(self, batch: Batch, teacher: Teacher) -> torch.Tensor:
        """Drafter logits for the batch; shape is family-specific, e.g. (B, T, V)."""
        raise NotImplementedError

    def objective(self, logits: torch.Tensor, batch: Batch, teacher: Teacher) -> LossOutput:
        """Loss and metrics from the drafter's logits; must not touch parameters (so it runs
        outside the ZeRO-3 forward, when parameters are partitioned)."""
        raise NotImplementedError

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights as saved (e.g. LoRA merged). Override when training wraps the weights."""
        return self.state_dict()

    def save_pretrained(self, folder: Path | str, state_dict=None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.export_state_dict()
        # safetensors refuses shared storage (tied weights): store contiguous copies
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        meta = {
            "drafter_type": self.drafter_type,
            "draftkit_version": FORMAT_VERSION,
            "target": asdict(self.target),
            "drafter": self.config,
        }
        (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return folder


def resolve_drafter_folder(path_or_id: str | Path) -> Path:
    """A local drafter folder as is, or the snapshot of a Hub id (config, weights and the tuned
    drafting settings ``tuned.json`` when published)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    from models.target import _HUB_ID

    if not _HUB_ID.match(str(path_or_id)):
        raise FileNotFoundError(
            f"drafter '{path_or_id}' is neither a local folder nor a Hub id of the form owner/name"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from models.target import unreachable

    try:
        return Path(
            snapshot_download(
                str(path_or_id), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, TUNED_NAME, COUNTS_NAME]
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        what = f"drafter '{path_or_id}' (not a local folder either)"
        raise unreachable(what, str(path_or_id), exc) from exc


def read_tuned(folder: Path | str) -> dict:
    """The drafting settings tuned for this drafter (``tuned.json``, written by
    ``infer.eval CKPT tune=true``), or {} when it was never tuned."""
    path = Path(folder) / TUNED_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


DRAFTER_FIELDS = ("drafter_type", "draftkit_version", "target", "drafter")


def read_drafter_config(folder: Path) -> dict:
    """``config.json`` of a drafter folder, refused with one message that says what was found:
    a missing or unreadable file, another format version, a folder that is not a draftkit
    drafter (a Hugging Face model, another toolkit's drafter), missing fields, or a weights file
    that is not a whole safetensors file."""
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise FileNotFoundError(
            f"{folder} is not a drafter folder: it has no {' and no '.join(missing)} "
            f"(found: {found})"
        )
    try:
        meta = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{folder / CONFIG_NAME} holds a {type(meta).__name__}, not an object")
    if "drafter_type" not in meta and "draftkit_version" not in meta:
        what = meta.get("model_type") or meta.get("speculators_model_type") or "unknown"
        archs = ", ".join(meta.get("architectures") or []) or "none"
        raise ValueError(
            f"{folder} is not a draftkit drafter folder: its config.json describes model type "
            f"'{what}' (architectures: {archs}), e.g. a Hugging Face model or another "
            "toolkit's drafter. A target goes in target=; a drafter is a folder written by "
            "train/drafter.py (config.json with drafter_type, draftkit_version, target, drafter)"
        )
    version = meta.get("draftkit_version")
    if version != FORMAT_VERSION:
        written = "no format version" if version is None else f"format version {version}"
        raise ValueError(
            f"drafter folder {folder} has {written}, but this draftkit reads format version "
            f"{FORMAT_VERSION}; retrain it with this version (the recipe is in its "
            "training.json) or load it with the draftkit release that wrote it"
        )
    absent = [k for k in DRAFTER_FIELDS if k not in meta]
    target = meta.get("target")
    if isinstance(target, dict):
        absent += [f"target.{f}" for f in TargetInfo.__dataclass_fields__ if f not in target]
    elif "target" not in absent:
        absent.append("target")
    if absent:
        raise ValueError(
            f"{folder / CONFIG_NAME} lacks {', '.join(absent)}: a drafter config.json holds "
            f"{', '.join(DRAFTER_FIELDS)} (target: {', '.join(TargetInfo.__dataclass_fields__)})"
        )
    check_weights_file(folder / WEIGHTS_NAME)
    return meta


def check_weights_file(path: Path) -> None:
    """Refuse a weights file that is not a whole safetensors file (truncated, another format)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"{path} is not a readable safetensors file ({' '.join(str(exc).split())}): a "
            "truncated download or copy, or weights in another format; copy or download it again"
        ) from exc


def family_of(drafter_type: str, recipe: str = "") -> type:
    """The registered class of ``drafter.type``; ``ConfigError`` listing the valid types."""
    from recipes import ConfigError

    families = load_families()
    if drafter_type in families:
        return families[drafter_type]
    valid = ", ".join(sorted(families))
    if not drafter_type:
        raise ConfigError(
            f"recipe '{recipe}' sets no drafter.type, so it trains no drafter (recipe "
            f"stdlib_target trains the embedded target: python train/pretrain.py "
            f"recipe=stdlib_target); set drafter.type to one of: {valid}"
        )
    raise ConfigError(f"drafter.type={drafter_type}: unknown drafter type; valid types: {valid}")


def build_drafter(cfg, target_model, tokenizer, target_name: str, recipe: str = "") -> Drafter:
    """The drafter ``cfg`` (a recipe's ``drafter`` section) describes, built against the target:
    every family setting is checked here (layers in range, widths, mask token, windows). Under
    ``torch.device("meta")`` with a meta target it builds no weights (pre-flight)."""
    family = family_of(cfg.type, recipe)
    if cfg.attention_window and not family.windowed:
        takes = ", ".join(sorted(name for name, c in DRAFTERS.items() if c.windowed))
        raise ValueError(
            f"drafter.attention_window={cfg.attention_window}: drafter type "
            f"'{cfg.type}' has no windowed attention (types that take it: {takes})"
        )
    info = TargetInfo.of(target_model, tokenizer, target_name)
    return family.from_recipe(cfg, target_model, info, tokenizer=tokenizer)


def load_drafter(
    path_or_id: str | Path, target: TargetInfo | None = None, target_model=None
) -> Drafter:
    """Load a saved drafter from a local folder or a Hub id.

    Args:
        path_or_id: folder written by ``Drafter.save_pretrained`` or a Hub repo id.
        target: when given, the drafter is refused unless it was trained for a target with the
            same vocabulary size, hidden size and tokenizer (the error names both sides).
        target_model: when given, the drafter re-attaches the frozen target modules it uses
            (``Drafter.attach_target``); families that use none ignore it.
    """
    folder = resolve_drafter_folder(path_or_id)
    meta = read_drafter_config(folder)
    kind = meta.get("drafter_type")
    load_families()
    if kind not in DRAFTERS:
        raise ValueError(
            f"{folder}: unknown drafter type '{kind}' (known: {', '.join(sorted(DRAFTERS))})"
        )
    trained_for = TargetInfo(**meta["target"])
    if target is not None:
        trained_for.check(target, str(path_or_id))
    drafter = DRAFTERS[kind](meta["drafter"], trained_for)
    drafter.load_state_dict(load_file(folder / WEIGHTS_NAME), strict=True)
    if target_model is not None:
        drafter.attach_target(target_model)
    return drafter.eval()
