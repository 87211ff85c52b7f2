"""DEER: a tokens-only block-diffusion drafter aligned in two stages (arXiv 2512.15176).

The block machinery is DFlash's (``models/dflash.py``: ``[anchor, MASK x (B - 1)]``, KV
injection, block-sparse anchor training, same-position labels), but the context comes from the
tokens alone, so the drafter works for targets whose hidden states are unavailable:

    ctx = RMSNorm(causal encoder over the token embeddings)   # row p sees tokens <= p

The drafter is standalone: its own embedding and LM head (copies of the target's, trained), a
``drafter.context_layers``-layer causal encoder (with its own KV cache at inference) and
``drafter.num_layers`` block layers, all of the target's architecture and width.

Two alignment stages in one run (``drafter.stage2_step``, an optimiser step):
1. stage I, continuation distillation: every block is a continuation of a truncated target
   response (its anchor), every slot weighted alike;
2. stage II, refinement: slot weights decay exponentially away from the verification boundary
   (the anchor), ``drafter.position_weight`` (decay or D-PACE) as in DFlash.
The stage is a function of the micro-batch's step (``Batch.step``), so resuming across the
switch is exact.
"""

from __future__ import annotations

import torch

from models.dflash import (
    BlockContext,
    BlockDrafter,
    block_config,
    copy_layer,
    decoder_config,
    empty_kv,
    family_classes,
    run_layers,
)
from models.drafter import Batch, LossOutput, TargetInfo, Teacher
from models.registry import register_drafter


@register_drafter("deer")
class Deer(BlockDrafter):
    """config (beyond ``BlockDrafter``'s): ``context_layers``, ``stage2_step``, ``init``."""

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__(config, target)
        lm = decoder_config(config["lm_config"])
        layer_cls, norm_cls, _ = family_classes(lm)
        self.embed_tokens = torch.nn.Embedding(lm.vocab_size, lm.hidden_size)
        self.lm_head = torch.nn.Linear(lm.hidden_size, lm.vocab_size, bias=False)
        self.encoder = torch.nn.ModuleList(
            [layer_cls(lm, layer_idx=i) for i in range(config["context_layers"])]
        )
        self.encoder_norm = norm_cls(lm.hidden_size, eps=lm.rms_norm_eps)

    @classmethod
    def from_recipe(cls, cfg, target_model, target: TargetInfo, tokenizer=None) -> Deer:
        n_target = target_model.config.num_hidden_layers
        if cfg.layer_style.value != "target":
            raise ValueError(
                f"deer: drafter.layer_style={cfg.layer_style.value}: deer has no serving-engine "
                "layout, so its layers are the target's (valid: target; qwen3 is for dflash, d2sd)"
            )
        if cfg.context_layers + cfg.num_layers > n_target and cfg.init == "target":
            raise ValueError(
                f"drafter.context_layers + drafter.num_layers = "
                f"{cfg.context_layers + cfg.num_layers} exceeds the target's {n_target} layers "
                "(drafter.init=target copies its first and last layers)"
            )
        config = {
            **block_config(cfg, target_model, target, tokenizer),
            "context_layers": cfg.context_layers,
            "stage2_step": cfg.stage2_step,
        }
        drafter = cls(config, target).float()
        if cfg.init == "target":  # encoder = the target's first layers, block = its last ones
            layers = target_model.get_decoder().layers
            pairs = [
                *zip(drafter.encoder, layers[: cfg.context_layers], strict=True),
                *zip(drafter.layers, layers[n_target - cfg.num_layers :], strict=True),
                (drafter.embed_tokens, target_model.get_input_embeddings()),
                (drafter.lm_head, target_model.lm_head),
                (drafter.norm, target_model.get_decoder().norm),
            ]
            for mine, theirs in pairs:
                copy_layer(mine, theirs)
        elif cfg.init != "random":
            raise ValueError(f"deer: drafter.init={cfg.init}: valid choices are target, random")
        drafter.init_mask_embedding(drafter.embed_tokens.weight)
        return drafter

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)  # autocast (training): its dtype, read chunk by chunk
        return logits if torch.is_autocast_enabled(hidden.device.type) else logits.float()

    def needs_target_logits(self, cached_topk: bool) -> bool:
        return self.config["loss"] == "fkl"

    def encode(self, ids, positions, past_kv, mask=None):
        """Causal context encoder: ids (b, n) at ``positions`` after ``past_kv`` ->
        (ctx rows (b, n, H), per layer (k, v) of the n rows)."""
        hidden, own_kv = run_layers(
            self, self.encoder, self.embed_tokens(ids), positions, past_kv, mask
        )
        return self.encoder_norm(hidden), own_kv

    def training_context(self, batch: Batch, teacher: Teacher) -> torch.Tensor:
        b, seq = batch.input_ids.shape
        device = batch.input_ids.device
        positions = torch.arange(seq, device=device).expand(b, seq)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        past = empty_kv(self.encoder, b, device, self.norm.weight.dtype)
        return self.encode(batch.input_ids, positions, past, causal.expand(b, 1, seq, seq))[0]

    def new_context(self, context: torch.Tensor, state: BlockContext) -> torch.Tensor:
        """context: (n,) the newly committed token ids; the encoder's KV cache lives in
        ``state.extra['encoder_kv']``."""
        device = self.norm.weight.device
        ids = context.to(device)[None]  # (1, n)
        if not ids.shape[1]:
            return torch.zeros(1, 0, self.norm.weight.shape[0], device=device)
        past = state.extra.get("encoder_kv") or empty_kv(
            self.encoder, 1, device, self.norm.weight.dtype
        )
        n, c = ids.shape[1], state.length
        positions = torch.arange(c, c + n, device=device)[None]
        causal = torch.ones(n, c + n, dtype=torch.bool, device=device).tril(diagonal=c)
        ctx, own = self.encode(ids, positions, past, causal[None, None])
        state.extra["encoder_kv"] = [
            (torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))
            for (k0, v0), (k1, v1) in zip(past, own, strict=True)
        ]
        return ctx

    def stage(self, step: int) -> int:
        """1 (continuation distillation) before ``stage2_step``, then 2 (refinement)."""
        return 1 if step < self.config["stage2_step"] else 2

    def weight_kind(self, batch: Batch) -> str:
        return "uniform" if self.stage(batch.step) == 1 else self.config["position_weight"]

    def objective(self, logits: torch.Tensor, batch: Batch, teacher: Teacher) -> LossOutput:
        out = super().objective(logits, batch, teacher)
        out.metrics["stage"] = float(self.stage(batch.step)) * out.n_positions.detach()
        return out
