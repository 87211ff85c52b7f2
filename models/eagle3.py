"""EAGLE-3 (arXiv 2503.01840): one decoder layer over fused low/mid/high target features, trained
with a training-time test (TTT) that unrolls its own drafts.

**Features.** Three target taps, ``drafter.target_layers`` (0-based decoder layers whose output
is read, HF ``hidden_states[id + 1]``; default 1, L/2 - 1, L - 4: the streams *entering* layers
2, L/2 and L - 3, as the public trainers and engines tap them), concatenated low -> high and
fused once: g_t = fc([f_low ; f_mid ; f_high]) (Linear 3H -> H, no bias).

**The layer** (``midlayer``): x = [input_layernorm(E[token]) ; hidden_norm(h)] (2H; the target's
embedding E, frozen); q/k/v = Linear(2H -> .); h' = h + o_proj(attention); out = h' +
MLP(post_attention_layernorm(h')). ``out`` (before the final norm) is the next step's hidden
input; logits = lm_head(norm(out)) over the draft vocabulary (``drafter.draft_vocab`` most
frequent training-response tokens, ``draft_ids`` maps draft id -> target id; 0 = the whole
vocabulary), trained from scratch.

**Label convention** (the public trainers shipped off-by-one bugs here; ``tests/test_eagle3.py``
pins it). Batches follow the dataset: ``loss_mask[t]`` says token t + 1 is a response token.
Step j = 0 .. J - 1 at position t takes the token x_{t+1+j} and the hidden input (g_t for
j = 0, else step j - 1's ``out`` at t), sits at RoPE position t + j, and predicts x_{t+2+j},
the target's own next token at position t + 1 + j: scored where ``loss_mask[t + 1 + j]``, the
label ``input_ids[t + 2 + j]`` (``drafter.loss=ce``) or the target's distribution at t + 1 + j
renormalised over the draft vocabulary (``fkl``), weighted 0.8^j.

**Attention.** Step j at position t sees step 0's keys at positions s <= t (causal, real tokens)
and the keys of steps 1 .. j at position t itself (its own chain), exactly what inference sees:
the drafter's cache holds step 0 of every committed position, and a draft of depth j attends to
it and to its own ancestors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.dflash import FrozenTargetEmbedding, RotaryLayers, decoder_config, family_classes
from models.drafter import Batch, Drafter, LossOutput, TargetInfo, Teacher
from models.registry import register_drafter

EAGLE3_LOSSES = ("ce", "fkl")


def default_taps(num_layers: int) -> list[int]:
    """0-based decoder layers whose outputs are the low, middle and high features (EAGLE-3's
    taps, clamped to 0 .. L - 2 on a small target; repeats allowed)."""
    last = num_layers - 2
    return [min(max(i, 0), last) for i in (1, num_layers // 2 - 1, num_layers - 4)]


def chain_attention(q, k0, v0, chain, mask, scale):
    """Attention of query row t to ``k0/v0`` where ``mask`` (b, 1, n, c) allows and to row t of
    every (k, v) in ``chain`` (the TTT diagonal); q (b, Hq, n, D), keys (b, Hkv, ., D)."""
    groups = q.shape[1] // k0.shape[1]
    k0, v0 = k0.repeat_interleave(groups, 1), v0.repeat_interleave(groups, 1)
    ks = torch.stack([k for k, _ in chain], -2).repeat_interleave(groups, 1)  # (b, Hq, n, j, D)
    vs = torch.stack([v for _, v in chain], -2).repeat_interleave(groups, 1)
    scores0 = (q @ k0.transpose(-1, -2)) * scale
    scores0 = scores0.masked_fill(~mask, float("-inf"))
    diag = (q[..., None, :] * ks).sum(-1) * scale  # (b, Hq, n, j)
    weights = torch.softmax(torch.cat([scores0, diag], -1).float(), -1).to(q.dtype)
    c = k0.shape[2]
    return weights[..., :c] @ v0 + (weights[..., c:, None] * vs).sum(-2)


@register_drafter("eagle3")
class Eagle3(FrozenTargetEmbedding, RotaryLayers, Drafter):
    """config: ``lm_config`` (the target's config, one layer), ``target_layers`` (3 ids),
    ``draft_vocab`` (0: all), ``ttt_steps``, ``ttt_decay``, ``loss``, ``num_draft``."""

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__(config, target)
        if config["loss"] not in EAGLE3_LOSSES:
            raise ValueError(
                f"eagle3: drafter.loss={config['loss']} is not supported "
                f"(valid: {', '.join(EAGLE3_LOSSES)})"
            )
        lm = decoder_config(config["lm_config"])
        layer_cls, norm_cls, rotary_cls = family_classes(lm)
        hidden = lm.hidden_size
        self.fc = torch.nn.Linear(len(config["target_layers"]) * hidden, hidden, bias=False)
        layer = layer_cls(lm, layer_idx=0)
        attn = layer.self_attn
        bias = bool(getattr(lm, "attention_bias", False))
        for name in ("q_proj", "k_proj", "v_proj"):  # the input is [embedding ; hidden]: 2H
            out = getattr(attn, name).out_features
            setattr(attn, name, torch.nn.Linear(2 * hidden, out, bias=bias))
        layer.hidden_norm = norm_cls(hidden, eps=lm.rms_norm_eps)
        self.midlayer = layer
        self.norm = norm_cls(hidden, eps=lm.rms_norm_eps)
        size = config["draft_vocab"] or target.vocab_size
        self.lm_head = torch.nn.Linear(hidden, size, bias=False)
        self.register_buffer("draft_ids", torch.arange(size))  # draft id -> target id
        self.init_rotary(lm, layer_cls, rotary_cls)

    @classmethod
    def from_recipe(cls, cfg, target_model, target: TargetInfo, tokenizer=None) -> Eagle3:
        import copy

        n_target = target_model.config.num_hidden_layers
        taps = list(cfg.target_layers) or default_taps(n_target)
        bad = [i for i in taps if not 0 <= i < n_target - 1]
        if bad or len(taps) != 3:
            raise ValueError(
                f"eagle3: drafter.target_layers={taps}: three 0-based decoder layer ids in "
                f"0..{n_target - 2} (low, middle, high), or [] for EAGLE-3's taps"
            )
        if not 0 <= cfg.draft_vocab <= target.vocab_size:
            raise ValueError(
                f"eagle3: drafter.draft_vocab={cfg.draft_vocab}: 0 (the whole vocabulary) or "
                f"1..{target.vocab_size}"
            )
        lm = copy.deepcopy(target_model.config)
        lm.num_hidden_layers = 1
        if getattr(lm, "layer_types", None):
            lm.layer_types = lm.layer_types[:1]
        config = {
            "lm_config": lm.to_dict(), "target_layers": taps, "draft_vocab": cfg.draft_vocab,
            "ttt_steps": cfg.ttt_steps, "ttt_decay": 0.8, "loss": cfg.loss.value,
            "num_draft": cfg.num_draft,
        }  # fmt: skip
        drafter = cls(config, target).float()
        drafter.attach_target(target_model)
        return drafter

    # --- the target's frozen embedding, the draft vocabulary ----------------------------------
    def embed_dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def fit_data(self, counts: torch.Tensor) -> None:
        """The draft vocabulary: the ``draft_vocab`` most frequent training-response tokens."""
        if self.config["draft_vocab"]:
            from models.vocab import frequent_ids

            self.draft_ids.copy_(frequent_ids(counts, self.config["draft_vocab"]))

    def target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """(..., draft V) -> (..., V) float32, -inf outside the draft vocabulary."""
        full = draft_logits.new_full((*draft_logits.shape[:-1], self.target.vocab_size), -1e9)
        return full.index_copy(-1, self.draft_ids, draft_logits).float()

    def target_layers(self) -> list[int]:
        return [i + 1 for i in self.config["target_layers"]]  # HF hidden_states indices

    def needs_target_logits(self, cached_topk: bool) -> bool:
        return self.config["loss"] == "fkl"

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """(..., 3H) concatenated taps -> (..., H)."""
        return self.fc(features.to(self.fc.weight.dtype))

    # --- one step of the layer ----------------------------------------------------------------
    def step(self, emb, hidden, positions, past_k, past_v, mask, chain=None):
        """emb, hidden (b, n, H) at ``positions`` (b, n); keys/values ``past_k/v`` (b, Hkv, c, D)
        before the rows' own; ``mask`` (b, 1, n, c + n) bool. Training's TTT steps j >= 1 pass
        ``chain``, the (k, v) of steps 1 .. j - 1 (each (b, Hkv, n, D)): row t then attends to
        ``past_k/v`` (step 0's keys, ``mask`` (b, 1, n, c)) and to row t of every chain step and
        its own, computed as dot products instead of n x n blocks that are all diagonal.
        Returns (out (b, n, H) before the final norm, (k, v) of the n rows)."""
        layer, attn = self.midlayer, self.midlayer.self_attn
        b, n, _ = emb.shape
        x = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(hidden)], dim=-1)
        q = self._roped(self._heads(attn, x, attn.q_proj, "q_norm"), positions)
        k = self._roped(self._heads(attn, x, attn.k_proj, "k_norm"), positions)
        v = self._heads(attn, x, attn.v_proj)
        if chain is None:
            keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True
            )
        else:
            out = chain_attention(q, past_k, past_v, [*chain, (k, v)], mask, attn.scaling)
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, (k, v)

    def empty_kv(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.midlayer.self_attn
        heads = attn.k_proj.out_features // attn.head_dim
        empty = torch.zeros(
            batch, heads, 0, attn.head_dim, device=device, dtype=self.fc.weight.dtype
        )
        return empty, empty

    # --- training: the unrolled training-time test ---------------------------------------------
    def forward(self, batch: Batch, teacher: Teacher) -> torch.Tensor:
        """(J, b, T, draft V) logits of every TTT step at every position."""
        ids, real = batch.input_ids, batch.attention_mask.bool()
        b, seq = ids.shape
        device = ids.device
        feats = torch.cat([teacher.hidden_states[i] for i in self.target_layers()], dim=-1)
        hidden = self.fuse(feats)
        positions = torch.arange(seq, device=device).expand(b, seq)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        seen = causal[None] & real[:, None, :]  # step 0's keys: s <= t, real tokens
        logits, step0, chain = [], None, []
        for j in range(self.config["ttt_steps"]):
            nxt = torch.zeros_like(ids)  # the token x_{t+1+j} (0 past the end, never scored)
            if seq > 1 + j:
                nxt[:, : seq - 1 - j] = ids[:, 1 + j :]
            if j == 0:  # causal over the real tokens
                empty_k, empty_v = self.empty_kv(b, device)
                hidden, step0 = self.step(self.embed(nxt), hidden, positions, empty_k, empty_v,
                                          seen[:, None])  # fmt: skip
            else:  # step 0's keys at s <= t, and row t of steps 1 .. j
                hidden, own = self.step(self.embed(nxt), hidden, positions + j, *step0,
                                        seen[:, None], chain=chain)  # fmt: skip
                chain.append(own)
            logits.append(self.lm_head(self.norm(hidden)))
        return torch.stack(logits)

    def step_targets(self, batch: Batch, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step j's labels (b, T) as target ids and where they are scored (b, T) bool: position t
        predicts x_{t+2+j}, scored where loss_mask[t + 1 + j] (the convention above)."""
        ids, mask = batch.input_ids, batch.loss_mask.bool()
        b, seq = ids.shape
        labels = torch.zeros_like(ids)
        valid = torch.zeros_like(mask)
        if seq > 2 + j:
            labels[:, : seq - 2 - j] = ids[:, 2 + j :]
            valid[:, : seq - 2 - j] = mask[:, 1 + j : seq - 1]
        return labels, valid

    def loss_positions(self, batch: Batch) -> int:
        return int(self.step_targets(batch, 0)[1].sum())

    def objective(self, logits: torch.Tensor, batch: Batch, teacher: Teacher) -> LossOutput:
        index = torch.full((self.target.vocab_size,), -1, dtype=torch.long, device=logits.device)
        index[self.draft_ids] = torch.arange(len(self.draft_ids), device=logits.device)
        total, metrics = logits.new_zeros((), dtype=torch.float32), {}
        n0 = None
        for j in range(logits.shape[0]):
            labels, valid = self.step_targets(batch, j)
            draft_labels = index[labels]
            valid = valid & (draft_labels >= 0)  # tokens outside the draft vocabulary: unscored
            logp = torch.log_softmax(logits[j].float(), dim=-1)
            if self.config["loss"] == "fkl":
                seq = labels.shape[1]
                target = torch.full_like(teacher.logits, -1e9)
                target[:, : seq - 1 - j] = teacher.logits[:, 1 + j :]
                p = torch.softmax(target.float()[..., self.draft_ids], dim=-1)
                per = -(p * logp).sum(-1)
            else:
                per = -logp.gather(-1, draft_labels.clamp(min=0)[..., None])[..., 0]
            weight = self.config["ttt_decay"] ** j
            n = valid.sum()
            n0 = n if n0 is None else n0
            total = total + weight * (per * valid).sum()
            hits = (logp.argmax(-1) == draft_labels) & valid
            metrics[f"acc@{j + 1}"] = hits.sum().float() / n.clamp(min=1) * n0
        metrics["top1"] = metrics["acc@1"]
        return LossOutput(total / n0.clamp(min=1), n0, metrics)

    @torch.no_grad()
    def heldout_hits(self, batch: Batch, teacher: Teacher) -> torch.Tensor:
        """(b, T, J): slot j + 1 of the chain drafted from root position r is right. That chain's
        steps run at position r - 1 (its features, the root as input) and step j predicts
        x_{r+1+j}; the training forward feeds the true tokens, which is what the chain was fed
        up to its first miss."""
        logits = self.forward(batch, teacher)  # (J, b, T, draft V)
        drafted = self.draft_ids[logits.argmax(-1)]  # (J, b, T) target ids
        steps, b, seq = drafted.shape
        correct = torch.zeros(b, seq, steps, dtype=torch.bool, device=drafted.device)
        for j in range(steps):
            labels, _ = self.step_targets(batch, j)
            reach = seq - 2 - j
            if reach > 0:
                correct[:, :reach, j] = drafted[j, :, :reach] == labels[:, :reach]
        hits = torch.zeros_like(correct)
        hits[:, 1:] = correct[:, :-1]  # root r drafts from position r - 1
        return hits

    # --- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def extend(self, cache, ids: torch.Tensor, features: torch.Tensor, start: int):
        """Step 0 over newly committed positions start .. start + n - 1 (``ids`` (n,): their next
        tokens, ``features`` (n, 3H): their taps), after ``cache`` ((k, v) of positions
        0 .. start - 1, or None). Returns the extended cache and the last position's output
        (1, 1, H), the hidden input of the next draft."""
        device = self.fc.weight.device
        ids, n = ids.to(device)[None], ids.shape[0]
        positions = torch.arange(start, start + n, device=device)[None]
        k0, v0 = cache if cache is not None else self.empty_kv(1, device)
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        mask = torch.cat([torch.ones(n, k0.shape[2], dtype=torch.bool, device=device), causal], -1)
        hidden = self.fuse(features.to(device))[None]
        out, (k, v) = self.step(self.embed(ids), hidden, positions, k0, v0, mask[None, None])
        return (torch.cat([k0, k], 2), torch.cat([v0, v], 2)), out[:, -1:]

    @torch.no_grad()
    def draft(self, cache, root_out: torch.Tensor, t: int, n: int, choose):
        """A chain of n drafts from committed position t: ``cache`` = step 0's (k, v) of positions
        0 .. t (position t was fed the root), ``root_out`` step 0's output at t. ``choose(j,
        logits)`` picks step j's token (a target id) from its draft-vocabulary logits; step j > 0
        is fed step j - 1's token at RoPE position t + j and attends to the cache and its own
        chain. Returns the tokens and the (n, draft V) logits."""
        device = self.fc.weight.device
        k, v = cache
        hidden, tokens, logits = root_out, [], []
        for j in range(n):
            if j:
                ids = torch.tensor([[tokens[-1]]], device=device)
                positions = torch.tensor([[t + j]], device=device)
                mask = torch.ones(1, 1, 1, k.shape[2] + 1, dtype=torch.bool, device=device)
                hidden, (k1, v1) = self.step(self.embed(ids), hidden, positions, k, v, mask)
                k, v = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
            step_logits = self.lm_head(self.norm(hidden))[0, -1]
            logits.append(step_logits)
            tokens.append(int(choose(j, step_logits)))
        return tokens, torch.stack(logits) if logits else torch.zeros(0, len(self.draft_ids))

    @torch.no_grad()
    def expand(
        self, cache, hidden: torch.Tensor, chain_kv, tokens: torch.Tensor, t: int, depth: int
    ):
        """One draft step for n tree nodes at ``depth`` >= 1 at once: ``hidden`` (n, 1, H) their
        parents' outputs, ``chain_kv`` (k, v) of their ancestors' steps (n, Hkv, depth - 1, D),
        ``tokens`` (n,) the tokens they were given. Each node sees the cache and its own chain.
        Returns (outputs (n, 1, H), their draft logits (n, draft V), the chain (k, v) with theirs)."""
        n = tokens.shape[0]
        device = self.fc.weight.device
        k0, v0 = (x.expand(n, -1, -1, -1) for x in cache)
        ck, cv = chain_kv
        past_k, past_v = torch.cat([k0, ck], 2), torch.cat([v0, cv], 2)
        positions = torch.full((n, 1), t + depth, device=device)
        mask = torch.ones(n, 1, 1, past_k.shape[2] + 1, dtype=torch.bool, device=device)
        out, (k1, v1) = self.step(self.embed(tokens[:, None].to(device)), hidden, positions,
                                  past_k, past_v, mask)  # fmt: skip
        logits = self.lm_head(self.norm(out))[:, -1]
        return out, logits, (torch.cat([ck, k1], 2), torch.cat([cv, v1], 2))
