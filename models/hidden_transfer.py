"""Hidden Transfer: drafting from inside the target ("Parallel Decoding via Hidden Transfer").

At target layer L (``transfer_layer``, an HF hidden-state index: the output of decoder layer
L - 1), the last committed position t's hidden state h_t is transferred into k pseudo hidden
states for the positions t + 1 .. t + k:

    pseudo_i = h_t + W_i [h_t ; E(x_{t+1})]        (W_i zero-initialised, i = 0 .. k - 1)

E(x_{t+1}) is the target's (frozen) embedding of the root, the token after t, which the
verification already fixed. The pseudo states then run through the target's own upper layers
L .. N - 1 (frozen, used by reference, never copied or saved) at positions t + 1 + i: each reads
the real context's keys/values of those layers (the target's KV cache at inference; recomputed
from the cached layer-L states in training) and the pseudo states before it (causal). The
target's final norm and LM head turn them into k draft distributions: pseudo state i proposes
token t + 2 + i, like Medusa's head i. Only the transfer module trains (CE on the target's
tokens or KL to its distribution, pseudo position i weighted ``decay^i``; the heads' objective).

Cost per cycle: the upper N - L layers on k rows (reading a KV cache that the target filled
anyway) plus k rows of the target's LM head. Medusa's heads cost k residual blocks and k LM
heads, so Hidden Transfer spends (N - L) / N of a k-token target forward more per cycle. It
pays where that forward is cheap next to the target's per-cycle cost (a GPU, where verifying k
more rows is nearly free) and the deeper drafts raise τ; on a CPU, where each extra row of a
forward costs about as much as a token step, it rarely does.
"""

from __future__ import annotations

import torch

from models.dflash import RotaryLayers, decoder_config, family_classes, run_layers
from models.drafter import Batch, TargetInfo, Teacher
from models.heads import HeadDrafter, HeadOutput
from models.registry import register_drafter


def causal_pseudo_mask(n_ctx: torch.Tensor, seq: int, k: int, device) -> torch.Tensor:
    """(P * k, seq + P * k) bool: pseudo state (p, i) sees context keys j < n_ctx[p] and the
    pseudo states (p, i') with i' <= i."""
    P = n_ctx.shape[0]
    keys = torch.arange(seq, device=device)
    sees_ctx = (keys[None, :] < n_ctx[:, None]).repeat_interleave(k, dim=0)  # (P*k, seq)
    group = torch.arange(P, device=device).repeat_interleave(k)
    slot = torch.arange(k, device=device).repeat(P)
    sees_own = (group[:, None] == group[None, :]) & (slot[None, :] <= slot[:, None])
    return torch.cat([sees_ctx, sees_own], dim=1)


@register_drafter("hidden_transfer")
class HiddenTransfer(RotaryLayers, HeadDrafter):
    """config (beyond ``HeadDrafter``'s): ``transfer_layer`` (HF hidden-state index L, 1 .. N -
    1), ``lm_config`` (the target's config, for its rotary embedding). ``num_heads`` = k pseudo
    positions."""

    own_heads = False

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__(config, target)
        hidden, k = config["hidden_size"], config["num_heads"]
        self.transfer = torch.nn.ModuleList([torch.nn.Linear(2 * hidden, hidden) for _ in range(k)])
        for linear in self.transfer:
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)
        lm = decoder_config(config["lm_config"])
        layer_cls, _, rotary_cls = family_classes(lm)
        self.init_rotary(lm, layer_cls, rotary_cls)
        self._frozen: tuple = ()  # the target's embedding, upper layers, final norm, LM head

    @classmethod
    def from_recipe(cls, cfg, target_model, target: TargetInfo, tokenizer=None) -> HiddenTransfer:
        n = target_model.config.num_hidden_layers
        layer = cfg.transfer_layer or n // 2
        if not 1 <= layer <= n - 1:
            raise ValueError(
                f"hidden_transfer: drafter.transfer_layer={layer}: valid hidden-state indices "
                f"are 1..{n - 1} (the output of decoder layer L - 1; the upper layers L..{n - 1} "
                "run the pseudo states)"
            )
        config = {
            **cls.base_config(cfg, target_model, target),
            "transfer_layer": layer,
            "lm_config": target_model.config.to_dict(),
        }
        drafter = cls(config, target).float()
        drafter.attach_target(target_model)
        return drafter

    def attach_target(self, target_model) -> None:
        decoder = target_model.get_decoder()
        upper = list(decoder.layers[self.config["transfer_layer"] :])
        self._frozen = (target_model.get_input_embeddings(), upper, decoder.norm,
                        target_model.get_output_embeddings())  # fmt: skip

    def _target(self):
        if not self._frozen:
            raise RuntimeError(
                "hidden_transfer runs the target's upper layers: call attach_target(target) or "
                "load_drafter(..., target_model=target) first"
            )
        return self._frozen

    def target_layers(self) -> list[int]:
        return [self.config["transfer_layer"]]

    def upper_layers(self) -> list:
        return self._target()[1]

    def pseudo_states(self, h: torch.Tensor, root_emb: torch.Tensor) -> torch.Tensor:
        """(P, H) layer-L states and (P, H) root embeddings -> (P, k, H) pseudo states."""
        dtype = self.transfer[0].weight.dtype
        h, root_emb = h.to(dtype), root_emb.to(dtype)
        x = torch.cat([h, root_emb], dim=-1)
        return torch.stack([h + linear(x) for linear in self.transfer], dim=1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) upper-layer output -> (..., V) float32 logits (target's norm and head)."""
        _, _, norm, lm_head = self._target()
        return lm_head(norm(hidden.to(lm_head.weight.dtype))).float()

    def run_upper(self, pseudo, positions, past_kv, mask) -> torch.Tensor:
        """Pseudo states (b, n, H) at ``positions`` (b, n) through the upper layers after
        ``past_kv`` (per upper layer (k, v)) -> (b, n, V) logits."""
        dtype = self.upper_layers()[0].self_attn.q_proj.weight.dtype
        out, _ = run_layers(self, self.upper_layers(), pseudo.to(dtype), positions, past_kv, mask)
        return self.logits(out)

    @torch.no_grad()
    def context_kv(self, hidden: torch.Tensor) -> list:
        """(b, T, H) layer-L states -> the upper layers' causal keys/values per layer, as the
        target's own KV cache would hold them."""
        b, seq, _ = hidden.shape
        layers = self.upper_layers()
        dtype = layers[0].self_attn.q_proj.weight.dtype
        positions = torch.arange(seq, device=hidden.device).expand(b, seq)
        attn = layers[0].self_attn
        heads = attn.k_proj.out_features // attn.head_dim
        empty = hidden.new_zeros(b, heads, 0, attn.head_dim, dtype=dtype)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=hidden.device).tril()
        _, kv = run_layers(self, layers, hidden.to(dtype), positions,
                           [(empty, empty)] * len(layers), causal[None, None])  # fmt: skip
        return kv

    def forward(self, batch: Batch, teacher: Teacher) -> HeadOutput:
        """Teacher-forced: at every scored position t, k pseudo states from h_t and the true
        token t + 1; logits (k, P, V) in ``scored_rows`` order."""
        rows = self.scored_rows(batch)
        hidden = teacher.hidden_states[self.config["transfer_layer"]]
        b, seq, _ = hidden.shape
        k = self.config["num_heads"]
        ctx_kv = self.context_kv(hidden)
        roots = torch.roll(batch.input_ids, -1, dims=1).flatten()[rows]
        pseudo = self.pseudo_states(hidden.flatten(0, 1)[rows], self._target()[0](roots))
        out = []
        for r in range(b):
            sel = (rows // seq) == r
            if not sel.any():
                continue
            t = rows[sel] % seq  # (P_r,)
            positions = (t[:, None] + 1 + torch.arange(k, device=t.device)).flatten()[None]
            mask = causal_pseudo_mask(t + 1, seq, k, t.device)[None, None]
            kv = [(key[r : r + 1], value[r : r + 1]) for key, value in ctx_kv]
            logits = self.run_upper(pseudo[sel].flatten(0, 1)[None], positions, kv, mask)
            out.append(logits[0].view(-1, k, logits.shape[-1]))
        return HeadOutput(torch.cat(out).transpose(0, 1), rows)

    @torch.no_grad()
    def draft_logits(self, h_last: torch.Tensor, root: int, past_kv: list) -> torch.Tensor:
        """The tensor-level draft forward: (H,) layer-L state of the last committed position t,
        the root token (t + 1) and the target's upper-layer keys/values of positions 0 .. t
        (per upper layer (k, v), (1, Hkv, t + 1, D)) -> (k, V) logits of tokens t + 2 ..."""
        embedding = self._target()[0]
        device = embedding.weight.device
        root_emb = embedding(torch.tensor([root], device=device))
        pseudo = self.pseudo_states(h_last[None].to(device), root_emb)  # (1, k, H)
        k, start = pseudo.shape[1], past_kv[0][0].shape[2]
        positions = (start + torch.arange(k, device=device))[None]
        mask = torch.ones(k, start + k, dtype=torch.bool, device=device)
        mask[:, start:] = torch.ones(k, k, dtype=torch.bool, device=device).tril()
        return self.run_upper(pseudo, positions, past_kv, mask[None, None])[0]
