"""DFlash: a block-diffusion drafter conditioned on the target's hidden states (arXiv 2602.06036).

A block is ``[x_anchor, MASK x (B - 1)]`` at absolute positions ``anchor .. anchor + B - 1``; one
drafter forward fills all B - 1 masked slots (attention inside the block is bidirectional, in
training and at inference alike). The context enters every drafter layer as extra keys/values
through that layer's own k/v projections ("KV injection"):

    ctx = RMSNorm(Linear(k*H -> H)(concat of the target's hidden states at k layers))
    layer: q = q_proj(block), k/v = [k/v_proj(ctx) ; k/v_proj(block)], RoPE at absolute positions

The drafter owns ``drafter.num_layers`` decoder layers of the target's own architecture and width
(built from the target's config with transformers classes), its final norm, and the fusion; the
target's embedding and LM head are used frozen and never saved (``attach_target``).

Training (one target pass per sequence): ``num_anchors`` anchors are sampled inside the loss mask
(``prepare_batch``); all blocks of a batch go through one forward under a block-sparse mask where
block j sees context positions strictly before anchor_j (by position, never by block index) and
its own block. Labels are same-position: slot k predicts the token at anchor + k; slot 0 (the
anchor itself) is not scored. ``BlockDrafter`` holds everything that does not depend on where
the context comes from; ``models/deer.py`` conditions the same block on tokens only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.drafter import Batch, Drafter, LossOutput, TargetInfo, Teacher
from models.losses import chunked_cross_entropy
from models.registry import register_drafter
from models.window import Window

BLOCK_LOSSES = ("ce", "fkl")  # hard CE on the target's tokens, or KL to its distribution
POSITION_WEIGHTS = ("decay", "dpace", "uniform")


def decoder_config(lm_config: dict):
    """A transformers config from its dict (the target's, with the drafter's layer count)."""
    from transformers import AutoConfig

    fields = dict(lm_config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def family_classes(config):
    """(decoder layer, RMSNorm, rotary embedding) classes of ``config``'s model family, found by
    building its base model on the meta device (no weights are allocated)."""
    from transformers import AutoModel

    with torch.device("meta"):
        base = AutoModel.from_config(config)
    return type(base.layers[0]), type(base.norm), type(base.rotary_emb)


def default_target_layers(num_target_layers: int, n: int) -> list[int]:
    """DFlash's choice: n decoder layers evenly from layer 1 to L - 3 (0-based ids), never the
    last one; n = 1 -> [L // 2]. Small targets are clamped to 0 .. L - 2."""
    last = num_target_layers - 2
    if n == 1:
        ids = [num_target_layers // 2]
    else:
        ids = [round(1 + i * (num_target_layers - 4) / (n - 1)) for i in range(n)]
    return sorted({min(max(i, 0), last) for i in ids})


def resolve_mask_token(explicit: int, tokenizer, vocab_size: int) -> int | None:
    """A token id the tokenizer never emits, inside the embedding: ``explicit`` (>= 0), else the
    tokenizer's mask token, else the first embedding row past the tokenizer, else its pad token
    (when it is a special token distinct from EOS/BOS). None when there is none of them: the
    drafter then learns its own mask embedding (``BlockDrafter.mask_embedding``)."""
    if explicit >= 0:
        found, why = explicit, "drafter.mask_token_id"
    elif tokenizer is None:
        raise ValueError("drafter.mask_token_id=-1 needs the tokenizer to pick a mask token")
    elif tokenizer.mask_token_id is not None:
        found, why = tokenizer.mask_token_id, "the tokenizer's mask token"
    elif len(tokenizer) < vocab_size:
        found, why = len(tokenizer), "the first embedding row the tokenizer never emits"
    elif tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in (
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    ):
        found, why = tokenizer.pad_token_id, "the tokenizer's pad token"
    else:
        return None
    if not 0 <= found < vocab_size:
        raise ValueError(
            f"drafter.mask_token_id={found} ({why}) is outside the target's embedding: valid ids "
            f"are 0..{vocab_size - 1}, or -1 to pick one (or learn a mask embedding)"
        )
    return int(found)


def copy_layer(mine, theirs) -> None:
    """Copy a target decoder layer into a drafter layer; a Qwen3-style drafter layer keeps its
    own q/k norms (at 1) when the target's layer has none."""
    state = {k: v.float() for k, v in theirs.state_dict().items()}
    missing, unexpected = mine.load_state_dict(state, strict=False)
    extra = [k for k in missing if not k.endswith(("q_norm.weight", "k_norm.weight"))]
    if extra or unexpected:
        raise ValueError(
            f"drafter.init=target: the target's layer does not fit the drafter's "
            f"(missing {extra}, unexpected {unexpected}); use drafter.init=random"
        )


def position_weights(kind: str, block_size: int, gamma: float, nll=None, valid=None, alpha=0.5):
    """Per-slot loss weights, slot 0 always 0.

    - ``decay``: w_k = exp(-(k - 1) / gamma) (DFlash; gamma 0 -> 7 for B = 16, 4 for B = 8).
    - ``uniform``: w_k = 1.
    - ``dpace`` (D-PACE, arXiv 2605.18810): 1. q_k = exp(-CE_k) detached; 2. mixed with a floor,
      q~_k = (1 - alpha) q_k + alpha, 0 on invalid slots; 3. w_j = sum_{m >= j} prod_{k <= m} q~_k,
      the expected number of accepted slots that slot j's acceptance enables.
    Returns (B,) for decay/uniform, (..., B) like ``nll`` for dpace.
    """
    k = torch.arange(block_size, dtype=torch.float32)
    if kind == "dpace":
        q = ((1 - alpha) * torch.exp(-nll.detach().float()) + alpha) * valid
        q[..., 0] = 1.0  # the anchor is given
        run = torch.cumprod(q, dim=-1)
        weights = run.flip(-1).cumsum(-1).flip(-1)
        weights[..., 0] = 0.0
        return weights
    if kind == "uniform":
        weights = torch.ones(block_size)
    else:
        gamma = gamma or {8: 4.0, 16: 7.0}.get(block_size, 7.0 * block_size / 16)
        weights = torch.exp(-(k - 1) / gamma)
    weights[0] = 0.0
    return weights


def qwen3_config(target_config, num_layers: int):
    """A Qwen3 decoder config at the target's widths, heads, RoPE and norm epsilon (the layer
    the serving engines' DFlash drafter is built of, whatever the target)."""
    from transformers import Qwen3Config

    text = target_config.get_text_config()
    heads = text.num_attention_heads
    return Qwen3Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        hidden_act=getattr(text, "hidden_act", "silu"),
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
        rope_parameters=getattr(text, "rope_parameters", None),
        attention_bias=bool(getattr(text, "attention_bias", False)),
        tie_word_embeddings=False,
        layer_types=["full_attention"] * num_layers,
    )


def block_config(cfg, target_model, target: TargetInfo, tokenizer) -> dict:
    """The settings every block drafter saves: the target's config cut to ``drafter.num_layers``
    layers (or a Qwen3 config at its widths, ``drafter.layer_style=qwen3``), the block, the
    objective and the default draft length (B - 1)."""
    import copy

    if cfg.layer_style.value == "qwen3":
        lm = qwen3_config(target_model.config, cfg.num_layers)
    else:
        lm = copy.deepcopy(target_model.config)
        lm.num_hidden_layers = cfg.num_layers
        if getattr(lm, "layer_types", None):
            lm.layer_types = lm.layer_types[: cfg.num_layers]
    return {
        "lm_config": lm.to_dict(),
        "block_size": cfg.block_size,
        "num_anchors": cfg.num_anchors,
        "mask_token_id": resolve_mask_token(cfg.mask_token_id, tokenizer, target.vocab_size),
        "loss": cfg.loss.value,
        "position_weight": cfg.position_weight.value,
        "decay_gamma": cfg.decay_gamma,
        "dpace_alpha": cfg.dpace_alpha,
        "num_draft": cfg.block_size - 1,
        "init": cfg.init,
        "attention_window": cfg.attention_window,
        "attention_sinks": cfg.attention_sinks,
    }


@dataclass
class BlockContext:
    """A drafter's inference context: per layer the keys/values of the context positions fed so
    far (never of a block), ``length`` of them (a windowed drafter keeps the sinks' and the last
    W only); ``extra`` is family state (e.g. an encoder cache)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    length: int = 0
    extra: dict = field(default_factory=dict)


class RotaryLayers:
    """Helpers for running decoder layers of the target's family by hand (``run_layers``):
    per-head projections (with Qwen3-style QK-norm when the layer has one) and RoPE at given
    positions. Needs ``self.rotary`` and ``self.rope`` (``init_rotary``)."""

    def init_rotary(self, lm, layer_cls, rotary_cls) -> None:
        self.rotary = rotary_cls(config=lm)
        self.rope = sys.modules[layer_cls.__module__].apply_rotary_pos_emb

    def _heads(self, attn, x: torch.Tensor, proj, norm_name: str | None = None) -> torch.Tensor:
        b, n, _ = x.shape  # (b, n, H) -> (b, heads, n, D)
        out = proj(x).view(b, n, -1, attn.head_dim)
        norm = getattr(attn, norm_name, None) if norm_name else None  # Qwen3-style QK-norm
        return (norm(out) if norm is not None else out).transpose(1, 2)

    def _roped(self, states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(states, positions)
        return self.rope(states, states, cos.to(states.dtype), sin.to(states.dtype))[0]


class FrozenTargetEmbedding:
    """Use the target's input embedding frozen (a reference kept out of the module tree, so it
    is neither trained nor saved); ``embed`` returns rows in ``embed_dtype()``."""

    _embedding: tuple = ()

    def attach_target(self, target_model) -> None:
        self._embedding = (target_model.get_input_embeddings(),)

    def embed_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if not self._embedding:
            raise RuntimeError(
                f"{self.drafter_type} uses the target's embedding: call attach_target(target) "
                "or load_drafter(..., target_model=target) first"
            )
        return self._embedding[0](ids).to(self.embed_dtype())


class FrozenTargetHead:
    """Use the target's embedding and LM head frozen: references kept out of the module tree
    (``attach_target``), so they are neither trained nor saved."""

    _target_modules: tuple = ()

    def attach_target(self, target_model) -> None:
        self._target_modules = (target_model.get_input_embeddings(), target_model.lm_head)

    def _target(self):
        if not self._target_modules:
            raise RuntimeError(
                f"{self.drafter_type} uses the target's embedding and LM head: call "
                "attach_target(target) or load_drafter(..., target_model=target) first"
            )
        return self._target_modules


class BlockDrafter(RotaryLayers, Drafter):
    """Block drafter body shared by DFlash and DEER. config: ``lm_config`` (target config dict,
    ``num_hidden_layers`` = drafter layers), ``block_size``, ``num_anchors``, ``mask_token_id``,
    ``loss``, ``position_weight``, ``decay_gamma``, ``dpace_alpha``, ``num_draft``,
    ``attention_window``, ``attention_sinks``."""

    windowed = True

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__(config, target)
        if config["loss"] not in BLOCK_LOSSES:
            raise ValueError(
                f"{self.drafter_type}: drafter.loss={config['loss']} is not supported "
                f"(valid: {', '.join(BLOCK_LOSSES)})"
            )
        if config["position_weight"] == "dpace" and config["loss"] != "ce":
            raise ValueError("drafter.position_weight=dpace needs drafter.loss=ce (hard labels)")
        lm = decoder_config(config["lm_config"])
        layer_cls, norm_cls, rotary_cls = family_classes(lm)
        self.layers = torch.nn.ModuleList(
            [layer_cls(lm, layer_idx=i) for i in range(lm.num_hidden_layers)]
        )
        self.norm = norm_cls(lm.hidden_size, eps=lm.rms_norm_eps)
        self.init_rotary(lm, layer_cls, rotary_cls)
        self.block_size, self.mask_token_id = config["block_size"], config["mask_token_id"]
        self.mask_embedding = None
        if self.mask_token_id is None:  # no spare token in the target: a learned mask embedding
            self.mask_token_id = lm.vocab_size  # outside the embedding; replaced in embed_block
            self.mask_embedding = torch.nn.Parameter(torch.zeros(lm.hidden_size))
        self.window = Window.of(config)  # long prompts: sinks + the last W context positions

    # --- what subclasses provide -------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., n) token ids -> (..., n, H) in the drafter's dtype."""
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) float32 logits."""
        raise NotImplementedError

    def training_context(self, batch: Batch, teacher: Teacher) -> torch.Tensor:
        """(b, S, H) context rows for every position of the batch; row p may depend on tokens
        <= p only (block j sees rows p < anchor_j)."""
        raise NotImplementedError

    def new_context(self, context, state: BlockContext) -> torch.Tensor:
        """(1, n, H) context rows of the n positions that follow ``state.length``."""
        raise NotImplementedError

    # --- the shared block forward -------------------------------------------------------------
    def embed_block(self, ids: torch.Tensor) -> torch.Tensor:
        """``embed`` with the mask slots given the learned mask embedding when the drafter has
        one (``mask_token_id`` is then the first id past the target's embedding)."""
        if self.mask_embedding is None:
            return self.embed(ids)
        is_mask = ids == self.mask_token_id
        out = self.embed(ids.masked_fill(is_mask, 0))
        return torch.where(is_mask[..., None], self.mask_embedding.to(out.dtype), out)

    def init_mask_embedding(self, embedding: torch.Tensor) -> None:
        """Start a learned mask embedding at the mean of the target's embedding rows."""
        if self.mask_embedding is not None:
            self.mask_embedding.data.copy_(embedding.detach().float().mean(0))

    def context_kv(self, ctx: torch.Tensor, positions: torch.Tensor) -> list:
        """ctx (b, n, H) at ``positions`` (b, n) -> per layer (k, v), each (b, Hkv, n, D)."""
        kv = []
        for layer in self.layers:
            attn = layer.self_attn
            k = self._roped(self._heads(attn, ctx, attn.k_proj, "k_norm"), positions)
            kv.append((k, self._heads(attn, ctx, attn.v_proj)))
        return kv

    def blocks(self, hidden, positions, ctx_kv, mask=None) -> torch.Tensor:
        """Run block tokens through the drafter layers with the context as extra keys/values.

        Args:
            hidden: (b, n, H) embedded block tokens; positions: (b, n) absolute positions.
            ctx_kv: per layer (k, v) of the context, (b, Hkv, c, D).
            mask: (b, 1, n, c + n) bool, True = may attend; a ``BlockMask``; None = everything.
        Returns:
            (b, n, H) after the final norm.
        """
        return self.norm(run_layers(self, self.layers, hidden, positions, ctx_kv, mask)[0])

    def block_ids(self, anchor_tokens: torch.Tensor) -> torch.Tensor:
        """(...,) anchor tokens -> (..., B) blocks [anchor, MASK x (B - 1)]."""
        ids = anchor_tokens.new_full((*anchor_tokens.shape, self.block_size), self.mask_token_id)
        ids[..., 0] = anchor_tokens
        return ids

    # --- training -----------------------------------------------------------------------------
    def prepare_batch(self, batch: Batch) -> Batch:
        """Sample ``num_anchors`` anchors per row among positions whose next token is a response
        token (``loss_mask``); sorted, -1 pads rows with fewer candidates."""
        n = self.config["num_anchors"]
        anchors = torch.full((batch.input_ids.shape[0], n), -1, dtype=torch.long)
        for row, mask in enumerate(batch.loss_mask.cpu()):
            candidates = mask.nonzero().flatten()
            picked = candidates[torch.randperm(len(candidates))[:n]].sort().values
            anchors[row, : len(picked)] = picked
        batch.anchors = anchors.to(batch.input_ids.device)
        if self.window.active:  # anchor-offset position indices (``models/window.py``)
            b, seq = batch.input_ids.shape
            limit = self.config["lm_config"].get("max_position_embeddings") or 2048
            offsets = self.window.offsets(b, seq + self.block_size, limit)
            batch.extra["position_offset"] = offsets.to(batch.input_ids.device)
        return batch

    def loss_positions(self, batch: Batch) -> int:
        """Blocks: one per anchor."""
        per_row = batch.loss_mask.sum(-1).clamp(max=self.config["num_anchors"])
        return int(per_row.sum())

    def forward(self, batch: Batch, teacher: Teacher) -> torch.Tensor:
        """(b, N, B, V) logits of every block of the batch, from one forward."""
        return self.head(self.block_hidden(batch, teacher))

    def training_blocks(self, batch: Batch) -> torch.Tensor:
        """(b, N, B) token ids of every training block: ``[x_anchor, MASK x (B - 1)]``."""
        return self.block_ids(batch.input_ids.gather(1, batch.anchors.clamp(min=0)))

    def block_hidden(self, batch: Batch, teacher: Teacher) -> torch.Tensor:
        """(b, N, B, H) final hidden states of every block of the batch, from one forward."""
        anchors = batch.anchors  # (b, N)
        b, n_blocks = anchors.shape
        seq = batch.input_ids.shape[1]
        valid, start = anchors >= 0, anchors.clamp(min=0)
        offsets = torch.arange(self.block_size, device=anchors.device)
        positions = (start[..., None] + offsets).flatten(1)  # (b, N*B)
        ids = self.training_blocks(batch)  # (b, N, B)
        ctx = self.training_context(batch, teacher)  # (b, S, H)
        ctx_positions = torch.arange(seq, device=anchors.device).expand(b, seq)
        offset = batch.extra.get("position_offset")
        if offset is not None:  # RoPE at anchor-offset indices; the masks use true positions
            ctx_kv = self.context_kv(ctx, self.window.shift(ctx_positions, offset))
            positions = self.window.shift(positions, offset)
        else:
            ctx_kv = self.context_kv(ctx, ctx_positions)
        query_anchor = start.repeat_interleave(self.block_size, dim=1)  # (b, N*B)
        query_valid = valid.repeat_interleave(self.block_size, dim=1)
        sees_ctx = ctx_positions[:, None, :] < query_anchor[..., None]  # (b, N*B, S)
        sees_ctx &= self.window.visible(ctx_positions[:, None, :], query_anchor[..., None])
        sees_ctx = sees_ctx & query_valid[..., None]
        mask = BlockMask(sees_ctx, self.block_size)  # + each block's own rows, bidirectional
        out = self.blocks(self.embed_block(ids.flatten(1)), positions, ctx_kv, mask)
        return out.view(b, n_blocks, self.block_size, -1)

    @torch.no_grad()
    def heldout_hits(self, batch: Batch, teacher: Teacher) -> torch.Tensor:
        """Every response-predicting position is an anchor; slot k of the block at t is right
        when it equals the token at t + k."""
        b, seq = batch.input_ids.shape
        hits = torch.zeros(b, seq, self.block_size - 1, dtype=torch.bool)
        for rows, at, probe in self.each_anchor(batch):
            drafted = self.head(self.block_hidden(probe, teacher)).max(-1).indices
            labels, valid = self.block_labels(probe)
            right = ((drafted == labels) & valid)[..., 1:].cpu()  # (b, chunk, B - 1)
            hits[rows, at] = right[probe.anchors.cpu() >= 0]
        return hits

    def each_anchor(self, batch: Batch, chunk: int = 32):
        """Every position that predicts a response token as a block anchor, ``chunk`` anchors a
        row per forward. Yields (rows, positions, probe): the real anchors' row and position
        indices (in the order of ``probe.anchors >= 0``) and ``batch`` with those anchors
        (-1 pads a row's last chunk)."""
        b = batch.input_ids.shape[0]
        positions = [m.nonzero().flatten() for m in batch.loss_mask.cpu()]
        longest = max((len(p) for p in positions), default=0)
        for start in range(0, longest, chunk):
            anchors = torch.full((b, chunk), -1, dtype=torch.long)
            for row, found in enumerate(positions):
                part = found[start : start + chunk]
                anchors[row, : len(part)] = part
            real = anchors >= 0
            rows = torch.arange(b)[:, None].expand(b, chunk)[real]
            probe = Batch(batch.input_ids, batch.attention_mask, batch.loss_mask,
                          anchors=anchors.to(batch.input_ids.device))  # fmt: skip
            yield rows, anchors[real], probe

    def block_labels(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Same-position labels: slot k of block j is the token at anchor_j + k (slot 0 is the
        anchor, not scored); a slot counts when that token exists and is a response token.
        Returns labels (b, N, B) and valid (b, N, B) bool."""
        seq = batch.input_ids.shape[1]
        at = self.label_positions(batch)  # (b, N, B)
        inside = at < seq
        at = at.clamp(max=seq - 1)
        labels = batch.input_ids.gather(1, at.flatten(1)).view_as(at)
        # loss_mask[t] says token t + 1 is a response token
        is_response = batch.loss_mask.gather(1, (at - 1).clamp(min=0).flatten(1)).view_as(at)
        valid = inside & is_response.bool() & (batch.anchors >= 0)[..., None]
        valid[..., 0] = False
        return labels, valid

    def slot_losses(self, logits, labels, batch: Batch, teacher: Teacher) -> torch.Tensor:
        """(b, N, B) per-slot CE on the target's tokens, or KL(target || drafter) with the
        target's distribution for the same token."""
        if self.config["loss"] == "ce":
            nll = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), reduction="none")
            return nll.view_as(labels)
        seq = batch.input_ids.shape[1]
        rows = (self.label_positions(batch) - 1).clamp(0, seq - 1).flatten(1)  # predicting rows
        target_logits = teacher.logits.gather(
            1, rows[..., None].expand(-1, -1, teacher.logits.shape[-1])
        ).view_as(logits)
        target_logprobs = F.log_softmax(target_logits.float(), -1)
        draft_logprobs = F.log_softmax(logits, -1)
        return (target_logprobs.exp() * (target_logprobs - draft_logprobs)).sum(-1)

    def label_positions(self, batch: Batch) -> torch.Tensor:
        """(b, N, B) absolute position of each slot's label: anchor + k."""
        offsets = torch.arange(self.block_size, device=batch.anchors.device)
        return batch.anchors.clamp(min=0)[..., None] + offsets

    def slot_weights(self, batch: Batch, per_slot: torch.Tensor, valid: torch.Tensor):
        """(b, N, B) loss weight of every slot; a block's weights sum to 1 over a full block
        (D-PACE's are its expected-acceptance weights, unnormalised)."""
        kind = self.weight_kind(batch)
        weights = position_weights(
            kind, self.block_size, self.config["decay_gamma"], per_slot, valid.float(),
            self.config["dpace_alpha"],
        ).to(per_slot.device)  # fmt: skip
        if kind != "dpace":  # normalised by a full block's weight sum, so each block counts alike
            weights = weights / weights.sum()
        return weights.expand_as(per_slot)

    def objective(self, logits: torch.Tensor, batch: Batch, teacher: Teacher) -> LossOutput:
        """Position-weighted CE or KL per block, averaged over blocks; metrics per slot. CE runs
        chunk by chunk in float32 on logits of any dtype (``chunked_cross_entropy``)."""
        labels, valid = self.block_labels(batch)  # (b, N, B)
        if self.config["loss"] == "ce":
            stats = chunked_cross_entropy(logits.flatten(0, 2), labels.flatten())
            per_slot, drafted = stats.nll.view_as(labels), stats.argmax.view_as(labels)
        else:
            logits = logits.float()
            per_slot = self.slot_losses(logits, labels, batch, teacher)
            drafted = logits.max(-1).indices  # max: 2x faster than argmax
        weights = self.slot_weights(batch, per_slot, valid)
        blocks = (batch.anchors >= 0).float()
        n_blocks = blocks.sum()
        loss = (weights * valid.float() * per_slot).sum()
        metrics = block_metrics(drafted, labels, valid, blocks)
        return LossOutput(loss / n_blocks.clamp(min=1), n_blocks, metrics)

    def weight_kind(self, batch: Batch) -> str:
        """The slot weighting for ``batch`` (see ``position_weights``)."""
        return self.config["position_weight"]

    # --- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def draft_block(self, root: int, start: int, context, state: BlockContext) -> torch.Tensor:
        """The tensor-level draft forward: logits of slots 1 .. B - 1 of the block
        ``[root, MASK x (B - 1)]`` at positions ``start ..``, after feeding ``context`` (the
        family's input for the positions ``state.length .. start - 1``) into ``state``.

        Returns:
            (B - 1, V) float32 logits.
        """
        return self.head(self.draft_hidden(root, start, context, state))

    @torch.no_grad()
    def feed(self, start: int, context, state: BlockContext) -> None:
        """Extend ``state`` with ``context`` (the family's input for positions
        ``state.length .. start - 1``)."""
        ctx = self.new_context(context, state)  # (1, n, H)
        n = ctx.shape[1]
        if state.length + n != start:
            raise ValueError(
                f"context covers positions up to {state.length + n}, the block starts at {start}"
            )
        if n:
            positions = torch.arange(state.length, start, device=ctx.device)[None]
            new = self.context_kv(ctx, positions)
            if state.kv:
                new = [
                    (torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))
                    for (k0, v0), (k1, v1) in zip(state.kv, new, strict=True)
                ]
            state.kv, state.length = self.window.trim(new), start

    @torch.no_grad()
    def draft_hidden(self, root: int, start: int, context, state: BlockContext) -> torch.Tensor:
        """``draft_block`` before the LM head: (B - 1, H) final hidden states of slots 1 ..."""
        self.feed(start, context, state)
        device = self.norm.weight.device
        ids = self.block_ids(torch.tensor([root], device=device))  # (1, B)
        positions = start + torch.arange(self.block_size, device=device)[None]
        kv = state.kv or empty_kv(self.layers, 1, device, self.norm.weight.dtype)
        return self.blocks(self.embed_block(ids), positions, kv)[0, 1:]


@dataclass(frozen=True)
class BlockMask:
    """The training mask of block drafters, kept sparse: the queries are consecutive blocks of
    ``size`` rows; a row sees the context keys where ``context`` (b, n, c) is True and every row
    of its own block (bidirectional), never another block's."""

    context: torch.Tensor
    size: int


def block_attention(q, ctx_k, ctx_v, own_k, own_v, mask: BlockMask, scale: float):
    """Attention of block queries over [context ; own block] without scoring other blocks' keys
    (a dense mask over every block's keys spends most of its work on masked-out keys).

    q: (b, Hq, n, D); ctx_k/ctx_v: (b, Hkv, c, D); own_k/own_v: (b, Hkv, n, D), n = blocks x
    size. Matmuls run in the inputs' dtype (bf16 under autocast), the softmax in float32.
    Returns (b, Hq, n, D)."""
    b, heads, n, d = q.shape
    kv_heads, c, size = ctx_k.shape[1], ctx_k.shape[2], mask.size
    group, blocks = heads // kv_heads, n // size
    q = (q * scale).reshape(b, kv_heads, group * n, d)  # GQA: query heads grouped by kv head
    ctx_scores = (q @ ctx_k.to(q.dtype).transpose(-1, -2)).view(b, kv_heads, group, blocks, size, c)
    ctx_scores = ctx_scores.masked_fill(~mask.context.view(b, 1, 1, blocks, size, c), -torch.inf)
    q6 = q.view(b, kv_heads, group, blocks, size, d)
    own_k = own_k.to(q.dtype).reshape(b, kv_heads, 1, blocks, size, d)
    scores = torch.cat([ctx_scores, q6 @ own_k.transpose(-1, -2)], dim=-1)  # (.., size, c + size)
    # float32 stays float32; bf16 (autocast) keeps bf16 storage, the softmax accumulates in fp32
    probs = torch.softmax(scores, dim=-1)
    out = probs[..., :c].reshape(b, kv_heads, group * n, c) @ ctx_v.to(q.dtype)
    own_v = own_v.to(q.dtype).reshape(b, kv_heads, 1, blocks, size, d)
    out = out.view_as(q6) + probs[..., c:] @ own_v  # (b, Hkv, g, blocks, size, D)
    return out.reshape(b, heads, n, d)


def run_layers(body: RotaryLayers, layers, hidden, positions, past_kv, mask=None):
    """Decoder layers where the queries are ``hidden``'s rows and the keys/values are
    ``past_kv`` (per layer, (b, Hkv, c, D)) followed by the rows' own; ``mask`` (b, 1, n, c + n)
    bool, a ``BlockMask``, or None (everything visible).

    Returns:
        (hidden (b, n, H) before any final norm, per layer (k, v) of the n rows).
    """
    b, n, _ = hidden.shape
    own_kv = []
    for layer, (past_k, past_v) in zip(layers, past_kv, strict=True):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = body._roped(body._heads(attn, x, attn.q_proj, "q_norm"), positions)
        k = body._roped(body._heads(attn, x, attn.k_proj, "k_norm"), positions)
        v = body._heads(attn, x, attn.v_proj)
        own_kv.append((k, v))
        if isinstance(mask, BlockMask):
            out = block_attention(q, past_k, past_v, k, v, mask, attn.scaling)
        else:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (b, Hkv, c+n, D)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True
            )  # (b, Hq, n, D)
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, own_kv


def empty_kv(layers, batch: int, device, dtype) -> list:
    """Per layer (k, v) holding no positions: (batch, Hkv, 0, D)."""
    kv = []
    for layer in layers:
        attn = layer.self_attn
        heads = attn.k_proj.out_features // attn.head_dim
        empty = torch.zeros(batch, heads, 0, attn.head_dim, device=device, dtype=dtype)
        kv.append((empty, empty))
    return kv


@torch.no_grad()
def block_metrics(draft_argmax, labels, valid, blocks) -> dict[str, torch.Tensor]:
    """Train-time acceptance of block drafts under teacher forcing, on the batch being trained
    on; sums over blocks (the loop divides by the block count).

    - ``acc@k``: slot k's accuracy **given slots 1..k-1 were right** (what a chain verified from
      the anchor reaches), over blocks where slot k is scored (rescaled so that the loop's
      division by the block count gives the ratio); ``top1`` = ``acc@1``.
    The chain-walk τ is measured on held-out rows instead (``train/heldout.py``): averaging
    1 + the leading run over uniformly drawn anchors counts a run of m tokens m times.
    draft_argmax, labels, valid: (b, N, B); blocks: (b, N) 1 on real blocks.
    """
    correct = (draft_argmax == labels) & valid  # (b, N, B)
    n_blocks = blocks.sum()
    out, run = {}, torch.ones_like(correct[..., 0])
    for k in range(1, labels.shape[-1]):
        reached = run & valid[..., k]
        run = run & correct[..., k]
        out[f"acc@{k}"] = run.sum() / reached.sum().clamp(min=1) * n_blocks
    out["top1"] = out["acc@1"]
    return out


@register_drafter("dflash")
class DFlash(FrozenTargetHead, BlockDrafter):
    """config (beyond ``BlockDrafter``'s): ``target_layers`` (0-based target decoder layer ids;
    the features are ``hidden_states[id + 1]``), ``init``."""

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__(config, target)
        hidden = self.norm.weight.shape[0]
        n_features = len(config["target_layers"])
        self.fc = torch.nn.Linear(n_features * hidden, hidden, bias=False)
        self.hidden_norm = type(self.norm)(hidden, eps=self.norm.variance_epsilon)

    @classmethod
    def from_recipe(cls, cfg, target_model, target: TargetInfo, tokenizer=None) -> DFlash:
        n_target = target_model.config.num_hidden_layers
        layers = list(cfg.target_layers) or default_target_layers(n_target, cfg.num_layers)
        bad = [i for i in layers if not 0 <= i < n_target - 1]
        if bad:
            raise ValueError(
                f"drafter.target_layers {bad}: must be 0-based decoder layer ids in "
                f"0..{n_target - 2} (the last layer {n_target - 1} is stored after the final norm)"
            )
        config = {**block_config(cfg, target_model, target, tokenizer), "target_layers": layers}
        drafter = cls(config, target).float()
        if cfg.init == "target":  # start from the target's last layers (next to its LM head)
            source = target_model.get_decoder().layers[n_target - cfg.num_layers :]
            for mine, theirs in zip(drafter.layers, source, strict=True):
                copy_layer(mine, theirs)
        elif cfg.init != "random":
            raise ValueError(f"dflash: drafter.init={cfg.init}: valid choices are target, random")
        drafter.init_mask_embedding(target_model.get_input_embeddings().weight)
        drafter.attach_target(target_model)
        return drafter

    def target_layers(self) -> list[int]:
        return [i + 1 for i in self.config["target_layers"]]  # HF hidden_states: 0 = embeddings

    def needs_target_logits(self, cached_topk: bool) -> bool:
        return self.config["loss"] == "fkl"

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._target()[0](ids).to(self.norm.weight.dtype)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits; under autocast (training) the autocast dtype, which the objective
        reads chunk by chunk (a float32 copy of a batch's logits is the largest tensor of a
        step on a large vocabulary)."""
        lm_head = self._target()[1]
        logits = lm_head(hidden.to(lm_head.weight.dtype))
        return logits if torch.is_autocast_enabled(hidden.device.type) else logits.float()

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """(..., k*H) concatenated target features -> (..., H) context rows."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def training_context(self, batch: Batch, teacher: Teacher) -> torch.Tensor:
        features = [teacher.hidden_states[layer] for layer in self.target_layers()]
        return self.fuse(torch.cat(features, dim=-1))

    def new_context(self, context: torch.Tensor, state: BlockContext) -> torch.Tensor:
        """context: (n, k*H) target features of the newly committed positions."""
        return self.fuse(context.to(self.fc.weight.device))[None]
