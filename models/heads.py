"""Draft heads on the target's last hidden state: Medusa and Hydra / Hydra++.

Both read h_t, the target's final (normed) hidden state at position t, whose own LM head gives
token t + 1; head i (0-based) predicts token t + 2 + i. Each head has its own LM head,
initialised from the target's (a copy, trained).

- **Medusa** (arXiv 2401.10774): head i = ResBlock x ``num_layers`` (Linear H->H zero-initialised,
  SiLU, residual) -> LM head; the heads are independent of each other's tokens.
- **Hydra** (arXiv 2402.05109): head i also sees the embeddings (the target's, frozen) of the
  tokens t + 1 .. t + 1 + i chosen before it on the path: input [h_t ; E[x_{t+1}] ; ... ;
  E[x_{t+1+i}]] ((i + 2) H) -> a projecting ResBlock -> ResBlocks -> LM head.
  ``variant=hydra++`` adds one decoder layer of the target's architecture over the target's
  hidden states (causal, its own KV cache at inference, fed the committed tokens' hidden states
  every cycle) whose output replaces h_t, and trains against the target's distribution only.

Objective: per head CE on the target's tokens or KL to the target's distribution at the same
position (``drafter.loss``), head i weighted ``decay^i`` (default 0.8), averaged over positions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.dflash import (
    FrozenTargetEmbedding,
    RotaryLayers,
    decoder_config,
    family_classes,
    run_layers,
)
from models.drafter import Batch, Drafter, LossOutput, TargetInfo, Teacher
from models.registry import register_drafter
from models.window import Window

HEAD_LOSSES = ("ce", "fkl")


@dataclass
class HeadOutput:
    """The heads' training forward: logits (K, P, V) at the flat positions ``rows`` (P,)."""

    logits: torch.Tensor
    rows: torch.Tensor


class ResBlock(torch.nn.Module):
    """x + SiLU(W x), W zero-initialised (so a new head starts as the target's own head);
    with ``d_in != d_out`` the residual goes through a projection (Hydra's first block)."""

    def __init__(self, d_in: int, d_out: int | None = None):
        super().__init__()
        d_out = d_out or d_in
        self.linear = torch.nn.Linear(d_in, d_out)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.skip = torch.nn.Linear(d_in, d_out, bias=False) if d_in != d_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip(x) if self.skip is not None else x
        return residual + F.silu(self.linear(x))


class HeadDrafter(Drafter):
    """What Medusa and Hydra share: config ``hidden_size``, ``vocab_size``, ``num_heads``,
    ``num_layers``, ``loss``, ``decay``, ``final_layer`` (the HF hidden-state index of the
    target's final normed hidden state), ``num_draft`` (= num_heads), ``tree_nodes``.
    ``own_heads``: each head has its own LM head (a trained copy of the target's)."""

    own_heads = True

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__(config, target)
        if config["loss"] not in HEAD_LOSSES:
            raise ValueError(
                f"{self.drafter_type}: drafter.loss={config['loss']} is not supported "
                f"(valid: {', '.join(HEAD_LOSSES)})"
            )
        if self.own_heads:
            hidden, vocab = config["hidden_size"], config["vocab_size"]
            self.lm_heads = torch.nn.ModuleList(
                [torch.nn.Linear(hidden, vocab, bias=False) for _ in range(config["num_heads"])]
            )

    @classmethod
    def base_config(cls, cfg, target_model, target: TargetInfo) -> dict:
        if cfg.loss.value not in HEAD_LOSSES:
            raise ValueError(
                f"{cls.drafter_type}: drafter.loss={cfg.loss.value} is not supported "
                f"(valid: {', '.join(HEAD_LOSSES)})"
            )
        return {
            "hidden_size": target_model.config.hidden_size,
            "vocab_size": target.vocab_size,
            "num_heads": cfg.num_heads,
            "num_layers": cfg.num_layers,
            "loss": cfg.loss.value,
            "decay": cfg.head_decay,
            "final_layer": target_model.config.num_hidden_layers,
            "num_draft": cfg.num_heads,
            "tree_nodes": cfg.tree_nodes,
        }

    def init_heads_from(self, target_model) -> None:
        weight = target_model.get_output_embeddings().weight.detach().float()
        for head in self.lm_heads:
            head.weight.data.copy_(weight)

    def target_layers(self) -> list[int]:
        return [self.config["final_layer"]]

    def needs_target_logits(self, cached_topk: bool) -> bool:
        return self.config["loss"] == "fkl"

    def loss_positions(self, batch: Batch) -> int:
        return int(batch.loss_mask.sum())

    def head_labels(self, batch: Batch, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head i at position t predicts token t + 2 + i: labels (b, T) and valid (b, T) (the
        label exists and is a response token)."""
        seq = batch.input_ids.shape[1]
        shift = 2 + i
        labels = torch.zeros_like(batch.input_ids)
        valid = torch.zeros_like(batch.loss_mask, dtype=torch.bool)
        if seq > shift:
            labels[:, : seq - shift] = batch.input_ids[:, shift:]
            # loss_mask[t] says token t + 1 is a response token
            valid[:, : seq - shift] = batch.loss_mask[:, shift - 1 : seq - 1].bool()
        return labels, valid

    def scored_rows(self, batch: Batch) -> torch.Tensor:
        """(P,) flat indices (into b * T) of the positions where some head's label is a
        response token: the heads run on these rows only (the vocabulary-sized logits of every
        position would cost K times the target's own)."""
        any_valid = torch.zeros_like(batch.loss_mask, dtype=torch.bool)
        for i in range(self.config["num_heads"]):
            any_valid |= self.head_labels(batch, i)[1]
        return any_valid.flatten().nonzero().flatten()

    @torch.no_grad()
    def heldout_hits(self, batch: Batch, teacher: Teacher) -> torch.Tensor:
        """The rank-0 path of the tree, teacher-forced: at root position p (the root token p is
        the target's; the last hidden state is p - 1's) head k proposes token p + 1 + k, right
        when it equals that token. The walk over these hits is the chain's τ; the static tree
        the proposer verifies accepts at least as much."""
        output = self(batch, teacher)
        b, seq = batch.input_ids.shape
        heads = output.logits.shape[0]
        drafted = torch.full((heads, b * seq), -1, dtype=torch.long, device=output.rows.device)
        drafted[:, output.rows] = output.logits.argmax(-1)
        drafted = drafted.view(heads, b, seq)
        hits = torch.zeros(b, seq, heads, dtype=torch.bool, device=drafted.device)
        for k in range(heads):
            labels, valid = self.head_labels(batch, k)  # at t: token t + 2 + k
            hits[:, 1:, k] = ((drafted[k] == labels) & valid)[:, :-1]
        return hits

    def objective(self, output: HeadOutput, batch: Batch, teacher: Teacher) -> LossOutput:
        """Head i's loss at positions t whose token t + 2 + i is a response token, weighted
        decay^i / sum of the weights; averaged over loss positions."""
        logits, rows = output.logits, output.rows
        weights = [self.config["decay"] ** i for i in range(logits.shape[0])]
        total, metrics = torch.zeros((), device=logits.device), {}
        n_positions = batch.loss_mask.sum()
        seq = batch.input_ids.shape[1]
        b_idx, t_idx = rows // seq, rows % seq
        for i, head_logits in enumerate(logits):  # (P, V)
            labels, valid = (x.flatten()[rows] for x in self.head_labels(batch, i))
            head_logits = head_logits.float()
            if self.config["loss"] == "ce":
                per_pos = F.cross_entropy(head_logits, labels, reduction="none")
            else:  # KL(target || head) with the target's distribution for the same token
                target = teacher.logits[b_idx, (t_idx + 1 + i).clamp(max=seq - 1)].float()
                target_lp = F.log_softmax(target, -1)
                per_pos = (target_lp.exp() * (target_lp - F.log_softmax(head_logits, -1))).sum(-1)
            scored = valid.sum()
            mean = (per_pos * valid).sum() / scored.clamp(min=1)
            total = total + weights[i] * mean
            with torch.no_grad():
                correct = ((head_logits.argmax(-1) == labels) & valid).sum()
                metrics[f"head{i}_top1"] = correct / scored.clamp(min=1) * n_positions
        loss = total / sum(weights)
        metrics["top1"] = metrics["head0_top1"]
        return LossOutput(loss, n_positions, metrics)


@register_drafter("medusa")
class Medusa(HeadDrafter):
    """K independent heads: ResBlock x ``num_layers`` -> LM head."""

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__(config, target)
        hidden = config["hidden_size"]
        self.blocks = torch.nn.ModuleList(
            [
                torch.nn.Sequential(*(ResBlock(hidden) for _ in range(config["num_layers"])))
                for _ in range(config["num_heads"])
            ]
        )

    @classmethod
    def from_recipe(cls, cfg, target_model, target: TargetInfo, tokenizer=None) -> Medusa:
        drafter = cls(cls.base_config(cfg, target_model, target), target)
        drafter.init_heads_from(target_model)
        return drafter

    def forward(self, batch: Batch, teacher: Teacher) -> HeadOutput:
        rows = self.scored_rows(batch)
        hidden = teacher.hidden_states[self.config["final_layer"]]
        return HeadOutput(self.head_logits(hidden.flatten(0, 1)[rows]), rows)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) target hidden states -> (K, ..., V) float32 logits of every head."""
        hidden = hidden.to(self.lm_heads[0].weight.dtype)
        return torch.stack(
            [
                head(block(hidden)).float()
                for block, head in zip(self.blocks, self.lm_heads, strict=True)
            ]
        )


@register_drafter("hydra")
class Hydra(FrozenTargetEmbedding, RotaryLayers, HeadDrafter):
    """Sequentially dependent heads; config adds ``variant`` (``hydra`` | ``hydra++``) and, for
    hydra++, ``lm_config`` (the target's config cut to one layer) for the prefix layer, and
    ``attention_window``, ``attention_sinks`` for its attention over the context."""

    windowed = True  # hydra++ only (refused for plain Hydra in ``from_recipe``)

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__(config, target)
        hidden = config["hidden_size"]
        self.mlps = torch.nn.ModuleList(
            [
                torch.nn.Sequential(
                    ResBlock((i + 2) * hidden, hidden),
                    *(ResBlock(hidden) for _ in range(config["num_layers"] - 1)),
                )
                for i in range(config["num_heads"])
            ]
        )
        self.prefix = None
        self.window = Window.of(config)  # hydra++'s prefix layer on long prompts
        if config["variant"] == "hydra++":
            lm = decoder_config(config["lm_config"])
            layer_cls, _, rotary_cls = family_classes(lm)
            self.prefix = layer_cls(lm, layer_idx=0)
            self.init_rotary(lm, layer_cls, rotary_cls)

    @classmethod
    def from_recipe(cls, cfg, target_model, target: TargetInfo, tokenizer=None) -> Hydra:
        variants = ("hydra", "hydra++")
        if cfg.variant not in variants:
            raise ValueError(
                f"hydra: drafter.variant={cfg.variant}: valid choices are {', '.join(variants)}"
            )
        config = {**cls.base_config(cfg, target_model, target), "variant": cfg.variant}
        if cfg.attention_window and cfg.variant != "hydra++":
            raise ValueError(
                "hydra: drafter.attention_window needs drafter.variant=hydra++ (the only Hydra "
                "with attention over the context)"
            )
        if cfg.variant == "hydra++":
            config["attention_window"] = cfg.attention_window
            config["attention_sinks"] = cfg.attention_sinks
            if config["loss"] != "fkl":
                raise ValueError(
                    "hydra++ trains against the target's distribution: drafter.loss=fkl"
                )
            lm = copy.deepcopy(target_model.config)
            lm.num_hidden_layers = 1
            if getattr(lm, "layer_types", None):
                lm.layer_types = lm.layer_types[:1]
            config["lm_config"] = lm.to_dict()
        drafter = cls(config, target)
        drafter.init_heads_from(target_model)
        if drafter.prefix is not None:  # start from the target's last layer
            last = target_model.get_decoder().layers[-1].state_dict()
            drafter.prefix.load_state_dict({k: v.float() for k, v in last.items()})
        drafter.attach_target(target_model)
        return drafter

    def embed_dtype(self) -> torch.dtype:
        return self.lm_heads[0].weight.dtype

    def prefix_states(self, hidden, positions, past_kv=None, mask=None):
        """Hydra++'s prefix layer over target hidden states (b, n, H) at ``positions`` (b, n)
        after ``past_kv`` (per layer (k, v) or None) -> (states, own (k, v)); ``mask``
        (n, c + n) bool, default causal over contiguous past positions."""
        b, n, _ = hidden.shape
        if past_kv is None:
            attn = self.prefix.self_attn
            heads = attn.k_proj.out_features // attn.head_dim
            empty = hidden.new_zeros(b, heads, 0, attn.head_dim)
            past_kv = [(empty, empty)]
        c = past_kv[0][0].shape[2]
        if mask is None:
            mask = torch.ones(n, c + n, dtype=torch.bool, device=hidden.device).tril(diagonal=c)
        out, own = run_layers(self, [self.prefix], hidden, positions, past_kv, mask[None, None])
        return out, own[0]

    def window_mask(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(q, k) bool: causal, and within the window (sinks + the last W) when one is set."""
        return (keys[None, :] <= queries[:, None]) & self.window.visible(
            keys[None, :], queries[:, None] + 1
        )

    def prepare_batch(self, batch: Batch) -> Batch:
        if self.window.active:  # anchor-offset position indices (``models/window.py``)
            b, seq = batch.input_ids.shape
            limit = self.config["lm_config"].get("max_position_embeddings") or 2048
            batch.extra["position_offset"] = self.window.offsets(b, seq, limit).to(
                batch.input_ids.device
            )
        return batch

    def context(self, hidden: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """(b, T, H) target hidden states -> the heads' base state per position (Hydra++: the
        prefix layer's causal output, windowed when set, RoPE at positions shifted by the
        anchor ``offset`` (b,); Hydra: the hidden states themselves)."""
        hidden = hidden.to(self.lm_heads[0].weight.dtype)
        if self.prefix is None:
            return hidden
        b, seq, _ = hidden.shape
        raw = torch.arange(seq, device=hidden.device)
        positions = raw.expand(b, seq)
        if offset is not None:
            positions = self.window.shift(positions, offset)
        return self.prefix_states(hidden, positions, mask=self.window_mask(raw, raw))[0]

    def head(self, i: int, base: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """Head i on base states (..., H) and the path's token embeddings (..., i + 1, H):
        (..., V) float32 logits of token t + 2 + i."""
        x = torch.cat([base, path.flatten(-2)], dim=-1)
        return self.lm_heads[i](self.mlps[i](x)).float()

    def forward(self, batch: Batch, teacher: Teacher) -> HeadOutput:
        """Teacher-forced: head i at t sees the true tokens t + 1 .. t + 1 + i."""
        rows = self.scored_rows(batch)
        hidden = teacher.hidden_states[self.config["final_layer"]]
        base = self.context(hidden, batch.extra.get("position_offset")).flatten(0, 1)
        emb = self.embed(batch.input_ids)  # (b, T, H)
        shifted = [torch.roll(emb, -(1 + j), dims=1).flatten(0, 1)[rows]
                   for j in range(self.config["num_heads"])]  # rows t+1+j  # fmt: skip
        out = [
            self.head(i, base[rows], torch.stack(shifted[: i + 1], dim=-2))
            for i in range(self.config["num_heads"])
        ]
        return HeadOutput(torch.stack(out), rows)
