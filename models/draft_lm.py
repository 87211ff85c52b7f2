"""Draft LM: a small independent causal LM of the target's family (FastDraft, DistillSpec).

It shares the target's tokenizer and nothing else at inference. Initialisation (``drafter.init``):
``target`` copies the target's embeddings, final norm, LM head and first ``drafter.num_layers``
decoder layers (a truncated target); ``random`` draws fresh weights of the same family; anything
else is a pretrained causal LM (local path or Hub id, e.g. one made by ``train/pretrain.py``)
with the target's vocabulary. Objective (``drafter.loss``): ``ce`` on the target's tokens,
``fkl`` forward KL to the target's distribution, ``fkl_topk`` on its top-k, ``tvdpp`` (TVD++).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch

from models.drafter import Batch, Drafter, LossOutput, TargetInfo, Teacher
from models.losses import (
    acceptance_proxies,
    cross_entropy,
    forward_kl,
    topk_forward_kl,
    tvd_plus_plus,
)
from models.registry import register_drafter
from models.window import Window

LOSSES = ("ce", "fkl", "fkl_topk", "tvdpp")


def _lm_from_config(lm_config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(lm_config)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoModelForCausalLM.from_config(config)


@register_drafter("draft_lm")
class DraftLM(Drafter):
    """config: ``lm_config`` (HF config dict), ``loss``, ``topk``, ``num_draft``, ``init``,
    ``lora_rank``/``lora_alpha`` (LoRA adapters while training; saved merged),
    ``attention_window``, ``attention_sinks``."""

    windowed = True

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__(config, target)
        if config["loss"] not in LOSSES:
            raise ValueError(f"draft_lm: unknown loss '{config['loss']}' (valid: {LOSSES})")
        self.lm = _lm_from_config(config["lm_config"])
        self.window = Window.of(config)  # long prompts: sinks + the last W positions

    @classmethod
    def from_recipe(cls, cfg, target_model, target: TargetInfo, tokenizer=None) -> DraftLM:
        base = _init_lm(cfg.init, cfg.num_layers, target_model, target)
        config = {
            "lm_config": base.config.to_dict(),
            "loss": cfg.loss.value,
            "topk": cfg.topk,
            "num_draft": cfg.num_draft,
            "init": cfg.init,
            "attention_window": cfg.attention_window,
            "attention_sinks": cfg.attention_sinks,
        }
        drafter = cls(config, target)
        drafter.lm.load_state_dict(base.state_dict())
        if cfg.lora_rank:
            if cfg.init == "random":
                raise ValueError("drafter.lora_rank needs pretrained weights: drafter.init=random")
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules="all-linear"
            )
            drafter.lm = get_peft_model(drafter.lm, lora)
        return drafter

    def needs_target_logits(self, cached_topk: bool) -> bool:
        loss = self.config["loss"]
        return loss in ("fkl", "tvdpp") or (loss == "fkl_topk" and not cached_topk)

    def prepare_batch(self, batch: Batch) -> Batch:
        if self.window.active:  # anchor-offset position indices (``models/window.py``)
            b, seq = batch.input_ids.shape
            limit = self.lm.config.max_position_embeddings
            batch.extra["position_offset"] = self.window.offsets(b, seq, limit).to(
                batch.input_ids.device
            )
        return batch

    def window_inputs(self, batch: Batch) -> dict:
        """A windowed drafter's attention mask (b, 1, T, T) and anchor-offset position ids."""
        b, seq = batch.input_ids.shape
        pos = torch.arange(seq, device=batch.input_ids.device)
        keys, queries = pos[None, :], pos[:, None]
        sees = (keys <= queries) & self.window.visible(keys, queries + 1)  # (T, T)
        mask = sees[None] & batch.attention_mask.bool()[:, None, :]  # (b, T, T)
        offset = batch.extra.get("position_offset", torch.zeros(b, dtype=torch.long))
        positions = self.window.shift(pos.expand(b, seq), offset.to(pos.device))
        return {"attention_mask": mask[:, None], "position_ids": positions}

    def forward(self, batch: Batch, teacher: Teacher) -> ScoredLogits:
        """Next-token logits at the scored positions only (``loss_mask``): the vocabulary
        projection is most of a step's cost for a large-vocabulary target (SmolLM2: 49,152
        tokens), and prompt positions are never scored."""
        inputs = {}  # right padding: causal attention keeps real positions off the padding
        if self.window.active:
            inputs = self.window_inputs(batch)
        out = self.lm(
            input_ids=batch.input_ids, output_hidden_states=True, logits_to_keep=1, **inputs
        )
        rows = batch.loss_mask.bool()
        return ScoredLogits(self.lm.get_output_embeddings()(out.hidden_states[-1][rows]), rows)

    @torch.no_grad()
    def heldout_hits(self, batch: Batch, teacher: Teacher) -> torch.Tensor:
        """Teacher-forced: draft k + 1 from t is right when the argmax at t + k is the token at
        t + k + 1 (while the drafts before it were right, its input is the true prefix)."""
        scored = self(batch, teacher)
        rows = scored.rows
        right = torch.zeros_like(rows)
        labels = torch.roll(batch.input_ids, -1, dims=1)
        right[rows] = scored.logits.max(-1).indices == labels[rows]
        slots, seq = self.config["num_draft"], rows.shape[1]
        hits = torch.zeros(*rows.shape, slots, dtype=torch.bool, device=rows.device)
        for k in range(slots):
            hits[:, : seq - k, k] = right[:, k:]
        return hits

    def objective(self, scored: ScoredLogits, batch: Batch, teacher: Teacher) -> LossOutput:
        rows = scored.rows  # (B, T): position t predicts response token t + 1
        logits = scored.logits[None]  # (1, N, V)
        mask = torch.ones(logits.shape[:2], device=logits.device)
        labels = torch.roll(batch.input_ids, -1, dims=1)  # (B, T); the wrapped column is masked
        loss_kind, metrics = self.config["loss"], {}
        topk_ids, topk_logprobs = teacher.topk_ids, teacher.topk_logprobs
        if loss_kind == "fkl_topk" and topk_ids is None:
            top = torch.log_softmax(teacher.logits.float(), -1).topk(self.config["topk"], dim=-1)
            topk_ids, topk_logprobs = top.indices, top.values
        if loss_kind == "ce":
            loss = cross_entropy(logits, labels[rows][None], mask)
        elif loss_kind == "fkl":
            loss = forward_kl(logits, teacher.logits[rows][None], mask)
        elif loss_kind == "fkl_topk":
            loss = topk_forward_kl(logits, topk_ids[rows][None], topk_logprobs[rows][None], mask)
        else:
            loss, metrics["tvd"] = tvd_plus_plus(logits, teacher.logits[rows][None], mask)
        if teacher.logits is not None:
            target_argmax = teacher.logits.argmax(-1)
        elif topk_ids is not None:
            target_argmax = topk_ids[..., 0]
        else:  # CE without teacher signals: the response tokens are the target's choices
            target_argmax = labels
        draft_argmax = torch.full_like(labels, -1)
        draft_argmax[rows] = scored.logits.argmax(-1)
        metrics.update(
            acceptance_proxies(draft_argmax, target_argmax, rows.float(), self.config["num_draft"])
        )
        n_positions = rows.sum()
        return LossOutput(loss / n_positions.clamp(min=1), n_positions, metrics)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        if hasattr(self.lm, "merge_and_unload"):  # LoRA: save the merged plain model
            merged = copy.deepcopy(self.lm).merge_and_unload()
            return {f"lm.{k}": v for k, v in merged.state_dict().items()}
        return self.state_dict()


class ScoredLogits(NamedTuple):
    """The draft LM's training output: logits (N, V) at the N positions where ``rows`` (B, T)
    is set."""

    logits: torch.Tensor
    rows: torch.Tensor


def _init_lm(init: str, num_layers: int, target_model, target: TargetInfo):
    """The initial causal LM for ``drafter.init`` (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    if init in ("target", "random"):
        config = copy.deepcopy(target_model.config)
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise ValueError(
                f"drafter.num_layers={num_layers}: must be 1..{config.num_hidden_layers} "
                f"(the target's layer count) with drafter.init={init}"
            )
        config.num_hidden_layers = num_layers
        if hasattr(config, "layer_types") and config.layer_types:
            config.layer_types = config.layer_types[:num_layers]
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if init == "target":  # copy every tensor whose name and shape exist in the drafter
            own = lm.state_dict()
            copied = {
                k: v.float()
                for k, v in target_model.state_dict().items()
                if k in own and own[k].shape == v.shape
            }
            lm.load_state_dict(copied, strict=False)
        return lm
    from models.target import resolve_target

    lm = AutoModelForCausalLM.from_pretrained(resolve_target(init), dtype=torch.float32)
    vocab = lm.get_output_embeddings().weight.shape[0]
    if vocab != target.vocab_size:
        raise ValueError(
            f"drafter.init={init} has vocab size {vocab}, but the target {target.id} has "
            f"{target.vocab_size}; a draft LM must share the target's tokenizer"
        )
    return lm
