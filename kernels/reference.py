"""Eager PyTorch references (fp32 accumulation) for the verification attention kernels.

Shapes (one sequence; batch by looping or stacking heads):
    q: (Hq, N, D) queries of the N tree nodes
    k_ctx, v_ctx: (Hkv, L, D) the cached context every node sees (L may be 0)
    k_tree, v_tree: (Hkv, N, D) the tree nodes' own keys/values
    parents: (N,) int, -1 for nodes without a parent in the tree, else an earlier node
Grouped-query attention: query head h uses KV head h // (Hq // Hkv).
Outputs: o (Hq, N, D) in q's dtype and lse (Hq, N) float32 (natural log-sum-exp of the scaled
scores); a query that sees no key gets o = 0, lse = -inf.
"""

from __future__ import annotations

import torch


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: [i, j] is True iff node j is node i or one of its ancestors."""
    n = parents.numel()
    mask = torch.eye(n, dtype=torch.bool, device=parents.device)
    for i, parent in enumerate(parents.tolist()):
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(R, C) bool -> (R, ceil(C / 32)) int32 bitmask: bit c % 32 of word c // 32 is mask[r, c]."""
    rows, cols = mask.shape
    words = (cols + 31) // 32
    padded = torch.zeros(rows, words * 32, dtype=torch.int64, device=mask.device)
    padded[:, :cols] = mask.long()
    weights = 2 ** torch.arange(32, dtype=torch.int64, device=mask.device)
    packed = (padded.view(rows, words, 32) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (Hq, N, D) over k, v (Hkv, S, D); visible (N, S) bool or None."""
    group = q.shape[0] // k.shape[0]
    k = k.float().repeat_interleave(group, dim=0)
    v = v.float().repeat_interleave(group, dim=0)
    scores = torch.einsum("hnd,hsd->hns", q.float(), k) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (Hq, N)
    weights = torch.exp(scores - lse[..., None].clamp(min=-1e30)).nan_to_num(0.0)
    out = torch.einsum("hns,hsd->hnd", weights, v)
    return out.to(q.dtype), lse


def merge_states(o1, lse1, o2, lse2) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets by log-sum-exp:
    o = (e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)[..., None]
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)[..., None]
    out = (w1 * o1.float() + w2 * o2.float()).to(o1.dtype)
    return out, lse


def tree_attention(q, k_ctx, v_ctx, k_tree, v_tree, parents, scale):
    """Each node attends to the whole context and to itself and its ancestors (one pass)."""
    n, length = q.shape[1], k_ctx.shape[1]
    visible = torch.ones(n, length + n, dtype=torch.bool, device=q.device)
    visible[:, length:] = ancestor_mask(parents)
    k = torch.cat([k_ctx, k_tree], dim=1)
    v = torch.cat([v_ctx, v_tree], dim=1)
    return attention_with_lse(q, k, v, visible, scale)


def cascade_attention(q, k_ctx, v_ctx, k_tree, v_tree, parents, scale):
    """Shared-prefix cascade: every query over the context (no mask), then over the tree part
    (ancestor mask), merged by log-sum-exp. Equal to ``tree_attention``."""
    o_ctx, lse_ctx = attention_with_lse(q, k_ctx, v_ctx, None, scale)
    visible = ancestor_mask(parents).to(q.device)  # (parents may live on the CPU)
    o_tree, lse_tree = attention_with_lse(q, k_tree, v_tree, visible, scale)
    return merge_states(o_ctx, lse_ctx, o_tree, lse_tree)
