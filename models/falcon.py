"""Falcon: a semi-autoregressive drafter trained with Coupled Sequential Glancing Distillation
(arXiv 2412.12639, AAAI'25), following the paper where its released code differs.

Input at position i: the target's final feature f_i (normed last hidden state) with the
embedding of the next token, x_i = MLP([E[t_{i+1}] ; f_i]) (the paper's LSTM is replaced by a
fusion MLP: the released LSTM wiring is broken, see ``../shared/DRAFTERS.md`` §7). Then
``drafter.num_layers`` decoder layers of the target's architecture with a **block-causal** mask
of block size k (``drafter.semi_ar_k``, default 2): positions of one k-block see each other and
every earlier position. Position i regresses f_{i+k}; tokens come from the frozen target LM head
on the predicted features, so one pass over the last k known positions drafts k tokens.

Blocks are aligned by a random offset per sequence in training, so any k consecutive positions
form a block, as at inference, where the block is always the last k known positions.

**CSGD** (Coupled Sequential Glancing Distillation): a first pass without gradient predicts
every position; M = the loss positions whose drafted token differs from the target's; N =
round(lambda * M) positions, drawn among the block-first loss positions, get the true answer as
their input ([E[t_{p+k+1}] ; f_{p+k}], a "glance"); the second pass, with gradient, is scored on
the positions that were not glanced. lambda = 0.4 (S - s) / S + 0.1 over ``drafter.csgd_steps``
S (s the optimiser step; 0 = no glancing). Loss: SmoothL1(f^, f) + 0.1 (0.9 KL(target || draft)
+ 0.1 CE) as published.

One decoder layer keeps the drafter's KV cache exact at inference: its keys and values are
functions of each position's own input, whatever the mask. With more layers a position's upper
K/V would depend on its later block partner, so ``num_layers`` > 1 is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.dflash import (
    FrozenTargetHead,
    RotaryLayers,
    decoder_config,
    family_classes,
    run_layers,
)
from models.drafter import Batch, Drafter, LossOutput, TargetInfo, Teacher
from models.registry import register_drafter
from models.window import Window


@dataclass
class FalconOutput:
    """Predicted features (b, T, H) (row i regresses f_{i+k}) and the glanced rows (b, T)."""

    features: torch.Tensor
    glanced: torch.Tensor


def glance_ratio(step: int, total: int) -> float:
    """lambda = 0.4 (S - s) / S + 0.1 (the paper's schedule); 0 when ``total`` is 0."""
    if total <= 0:
        return 0.0
    return 0.4 * max(total - step, 0) / total + 0.1


def block_causal_mask(n: int, k: int, offset: int, device=None) -> torch.Tensor:
    """(n, n) bool: row i sees column j iff block(j) <= block(i), block(x) = (x + offset) // k."""
    block = (torch.arange(n, device=device) + offset) // k
    return block[None, :] <= block[:, None]


@register_drafter("falcon")
class Falcon(FrozenTargetHead, RotaryLayers, Drafter):
    """config: ``lm_config`` (target config, one layer), ``k``, ``final_layer``, ``csgd_steps``,
    ``num_draft``, ``passes``, ``tree_width``, ``attention_window``, ``attention_sinks`` (a block
    starting at s sees the sinks and positions s - W .. s - 1, and its own block)."""

    windowed = True

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__(config, target)
        lm = decoder_config(config["lm_config"])
        layer_cls, norm_cls, rotary_cls = family_classes(lm)
        hidden = lm.hidden_size
        self.fuse = torch.nn.Sequential(
            torch.nn.Linear(2 * hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden)
        )
        self.layers = torch.nn.ModuleList(
            [layer_cls(lm, layer_idx=i) for i in range(lm.num_hidden_layers)]
        )
        self.norm = norm_cls(hidden, eps=lm.rms_norm_eps)
        self.init_rotary(lm, layer_cls, rotary_cls)
        self.k = config["k"]
        self.window = Window.of(config)  # long prompts: sinks + the last W before a block

    @classmethod
    def from_recipe(cls, cfg, target_model, target: TargetInfo, tokenizer=None) -> Falcon:
        import copy

        if cfg.num_layers != 1:
            raise ValueError(
                f"falcon: drafter.num_layers={cfg.num_layers}: only 1 is supported (a single "
                "attention layer keeps the block-causal draft cache exact; see models/falcon.py)"
            )
        lm = copy.deepcopy(target_model.config)
        lm.num_hidden_layers = 1
        if getattr(lm, "layer_types", None):
            lm.layer_types = lm.layer_types[:1]
        config = {
            "lm_config": lm.to_dict(), "k": cfg.semi_ar_k,
            "final_layer": target_model.config.num_hidden_layers,
            "csgd_steps": cfg.csgd_steps, "num_draft": cfg.semi_ar_k * cfg.falcon_passes,
            "passes": cfg.falcon_passes, "tree_width": cfg.falcon_width,
            "attention_window": cfg.attention_window, "attention_sinks": cfg.attention_sinks,
        }  # fmt: skip
        drafter = cls(config, target).float()
        last = target_model.get_decoder().layers[-1].state_dict()  # start from the last layer
        drafter.layers[0].load_state_dict({k: v.float() for k, v in last.items()})
        drafter.attach_target(target_model)
        return drafter

    def target_layers(self) -> list[int]:
        return [self.config["final_layer"]]

    def needs_target_logits(self, cached_topk: bool) -> bool:
        return True  # the KL term

    def tokens_of(self, features: torch.Tensor) -> torch.Tensor:
        """(..., H) features -> (..., V) float32 logits through the target's LM head."""
        head = self._target()[1]
        return head(features.to(head.weight.dtype)).float()

    def inputs(self, next_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """x_i = MLP([E[t_{i+1}] ; f_i]): (..., n) ids, (..., n, H) features -> (..., n, H)."""
        emb = self._target()[0](next_ids).to(self.norm.weight.dtype)
        return self.fuse(torch.cat([emb, features.to(emb.dtype)], dim=-1))

    def run(self, x, positions, past_kv, mask):
        """The decoder layer(s) and final norm: -> (predicted features, own (k, v) per layer)."""
        hidden, own = run_layers(self, self.layers, x, positions, past_kv, mask)
        return self.norm(hidden), own

    # --- training -----------------------------------------------------------------------------
    def loss_positions(self, batch: Batch) -> int:
        return int(self.scored(batch).sum())

    def scored(self, batch: Batch) -> torch.Tensor:
        """(b, T) rows whose label token t_{i+k+1} exists and is a response token."""
        seq, k = batch.input_ids.shape[1], self.k
        valid = torch.zeros_like(batch.loss_mask, dtype=torch.bool)
        if seq > k + 1:
            valid[:, : seq - k - 1] = batch.loss_mask[:, k : seq - 1].bool()
        return valid

    def prepare_batch(self, batch: Batch) -> Batch:
        """A random block alignment per sequence (``extra['offset']``)."""
        b, seq = batch.input_ids.shape
        batch.extra["offset"] = torch.randint(0, self.k, (b,))
        if self.window.active:  # anchor-offset position indices (``models/window.py``)
            limit = self.config["lm_config"].get("max_position_embeddings") or 2048
            batch.extra["position_offset"] = self.window.offsets(b, seq, limit)
        return batch

    def teacher_inputs(self, batch: Batch, teacher: Teacher):
        """Per row i: next token t_{i+1}, feature f_i, target f_{i+k}, label t_{i+k+1}
        (shifted with zero padding past the end)."""
        ids = batch.input_ids
        feats = teacher.hidden_states[self.config["final_layer"]]
        k = self.k

        def shift(t, by):
            out = torch.zeros_like(t)
            if t.shape[1] > by:
                out[:, : t.shape[1] - by] = t[:, by:]
            return out

        return shift(ids, 1), feats, shift(feats, k), shift(ids, k + 1)

    def forward(self, batch: Batch, teacher: Teacher) -> FalconOutput:
        next_ids, feats, answer_feats, labels = self.teacher_inputs(batch, teacher)
        b, seq = next_ids.shape
        positions = torch.arange(seq, device=next_ids.device).expand(b, seq)
        offsets = batch.extra.get("offset", torch.zeros(b, dtype=torch.long))
        mask = torch.stack(
            [block_causal_mask(seq, self.k, int(o), next_ids.device) for o in offsets]
        )
        if self.window.active:  # row i's block starts at i - (i + offset) % k
            starts = positions - (positions + offsets[:, None].to(positions.device)) % self.k
            mask = mask & self.window.visible(positions[:, None, :], starts[..., None])
        rope = positions  # RoPE at anchor-offset indices; masks and blocks use true positions
        if batch.extra.get("position_offset") is not None:
            rope = self.window.shift(positions, batch.extra["position_offset"].to(rope.device))
        mask = mask[:, None] & batch.attention_mask.bool()[:, None, None, :]
        mask = mask | torch.eye(
            seq, dtype=torch.bool, device=mask.device
        )  # pad rows see themselves
        empty = [(self._empty_kv(b, next_ids.device),) * 2] * len(self.layers)
        glanced = torch.zeros(b, seq, dtype=torch.bool, device=next_ids.device)
        ratio = glance_ratio(batch.step, self.config["csgd_steps"])
        if ratio > 0:
            with torch.no_grad():  # pass 1: where does the drafter miss?
                first, _ = self.run(self.inputs(next_ids, feats), rope, empty, mask)
                missed = (self.tokens_of(first).argmax(-1) != labels) & self.scored(batch)
            block_first = ((positions + offsets[:, None].to(positions.device)) % self.k) == 0
            glanced = self.glance(missed, self.scored(batch) & block_first, ratio)
            next_ids = torch.where(glanced, labels, next_ids)
            feats = torch.where(glanced[..., None], answer_feats, feats)
        out, _ = self.run(self.inputs(next_ids, feats), rope, empty, mask)
        return FalconOutput(out, glanced)

    def _empty_kv(self, b: int, device) -> torch.Tensor:
        attn = self.layers[0].self_attn
        heads = attn.k_proj.out_features // attn.head_dim
        return torch.zeros(b, heads, 0, attn.head_dim, device=device, dtype=self.norm.weight.dtype)

    @staticmethod
    def glance(missed: torch.Tensor, eligible: torch.Tensor, ratio: float) -> torch.Tensor:
        """Per row: N = round(ratio * M) of the ``eligible`` positions (M = ``missed`` count),
        drawn at random (torch's global generator) -> (b, T) bool."""
        glanced = torch.zeros_like(eligible)
        for row in range(missed.shape[0]):
            n = int(round(ratio * int(missed[row].sum())))
            candidates = eligible[row].nonzero().flatten()
            picked = candidates[torch.randperm(len(candidates))[:n].to(candidates.device)]
            glanced[row, picked] = True
        return glanced

    def objective(self, output: FalconOutput, batch: Batch, teacher: Teacher) -> LossOutput:
        _, _, answer_feats, labels = self.teacher_inputs(batch, teacher)
        scored = self.scored(batch) & ~output.glanced
        n = scored.sum().clamp(min=1)
        pred = output.features.float()
        smooth = F.smooth_l1_loss(pred, answer_feats.float(), reduction="none").mean(-1)
        logits = self.tokens_of(pred)
        seq, k = labels.shape[1], self.k
        rows = (torch.arange(seq, device=labels.device) + k).clamp(max=seq - 1)
        target_lp = F.log_softmax(teacher.logits[:, rows].float(), -1)  # predicts t_{i+k+1}
        draft_lp = F.log_softmax(logits, -1)
        kl = (target_lp.exp() * (target_lp - draft_lp)).sum(-1)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(kl)
        per_row = smooth + 0.1 * (0.9 * kl + 0.1 * ce)
        loss = (per_row * scored).sum() / n
        with torch.no_grad():  # sums over the batch's loss positions (glanced ones included)
            positions = self.scored(batch).sum()
            top1 = ((logits.argmax(-1) == labels) & scored).sum() / n
            metrics = {
                "top1": top1 * positions, "smooth_l1": (smooth * scored).sum() / n * positions,
                "glanced": output.glanced.sum().float(),
            }  # fmt: skip
        return LossOutput(loss, positions, metrics)

    # --- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def context_kv(self, next_ids: torch.Tensor, features: torch.Tensor, positions) -> list:
        """Keys/values of context positions (1, n) for the draft cache: with one attention layer
        they depend on each position's own input only, so they are exact whatever the mask."""
        x = self.inputs(next_ids, features)
        attn = self.layers[0].self_attn
        h = self.layers[0].input_layernorm(x)
        k = self._roped(self._heads(attn, h, attn.k_proj, "k_norm"), positions)
        return [(k, self._heads(attn, h, attn.v_proj))]

    def pass_mask(self, past: torch.Tensor, block: torch.Tensor) -> torch.Tensor | None:
        """A windowed drafter's (1, 1, n, c + n) mask for a block at positions ``block`` (n,)
        over cached positions ``past`` (c,); None (everything visible) without a window."""
        if not self.window.active:
            return None
        sees = self.window.visible(past, block[0]).expand(len(block), -1)
        own = torch.ones(len(block), len(block), dtype=torch.bool, device=past.device)
        return torch.cat([sees, own], dim=1)[None, None]

    @torch.no_grad()
    def draft_block(self, next_ids, features, positions, past_kv, mask=None):
        """One semi-autoregressive pass: the block rows (1, k) see each other and ``past_kv``
        (all of it, or what ``mask`` allows); returns (predicted features (1, k, H) -- row i
        regresses f_{i+k} --, token logits (1, k, V), the block's own (k, v) per layer)."""
        if past_kv is None:
            past_kv = [(self._empty_kv(1, positions.device),) * 2]
        out, own = self.run(self.inputs(next_ids, features), positions, past_kv, mask)
        return out, self.tokens_of(out), own
