"""Triton kernel for verification attention: tree attention and the passes of cascade attention.

One kernel, ``_tree_attn_fwd``, computes softmax attention with fp32 online-softmax
accumulation for the queries of one KV head:
- queries of the ``G`` query heads sharing a KV head are packed into one row dimension
  (row = g * N + node), so every key/value block is loaded once for the whole group;
- keys ``[0, n_ctx)`` (the context) are visible to every query;
- keys ``[n_ctx, n_ctx + n_tree)`` (the tree nodes) are visible through a packed ancestor
  bitmask (``kernels.reference.pack_mask``), read 32 keys per word.
Tree attention runs both parts in one pass; cascade attention calls it once with only the
context (all queries, no mask: the prefix is read once) and once with only the tree part, then
merges by log-sum-exp. Inputs are checked by ``kernels.attention``; call that, not this.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _update(acc, m_i, l_i, scores, v):
    """One online-softmax step: fold (BLOCK_M, BLOCK_N) scores and their values into the state."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _tree_attn_fwd(
    Q, K, V, MASK, OUT, LSE,
    stride_qh, stride_qm, stride_kh, stride_ks, stride_vh, stride_vs,
    stride_oh, stride_om, stride_lh,
    n_ctx, n_tree, n_nodes, n_rows, mask_words, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_TREE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    block, head = tl.program_id(0), tl.program_id(1)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + head * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base, v_base = K + head * stride_kh, V + head * stride_vh
    for start in range(0, n_ctx, BLOCK_N):  # the context: visible to every query
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_ctx
        k = tl.load(
            k_base + cols[None, :] * stride_ks + dims[:, None], mask=col_ok[None, :], other=0.0
        )
        v = tl.load(
            v_base + cols[:, None] * stride_vs + dims[None, :], mask=col_ok[:, None], other=0.0
        )
        scores = tl.dot(q, k, input_precision=PRECISION, out_dtype=tl.float32) * scale
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        acc, m_i, l_i = _update(acc, m_i, l_i, scores, v)
    if HAS_TREE:  # the tree part: visible through the ancestor bitmask, 32 keys per word
        node = rows % n_nodes
        bit = tl.arange(0, 32)
        for start in range(0, n_tree, 32):
            cols = start + bit
            col_ok = cols < n_tree
            words = tl.load(MASK + node * mask_words + start // 32, mask=row_ok, other=0)
            visible = ((words[:, None] >> bit[None, :]) & 1) != 0
            visible = visible & col_ok[None, :]
            keys = n_ctx + cols
            k = tl.load(
                k_base + keys[None, :] * stride_ks + dims[:, None], mask=col_ok[None, :], other=0.0
            )
            v = tl.load(
                v_base + keys[:, None] * stride_vs + dims[None, :], mask=col_ok[:, None], other=0.0
            )
            scores = tl.dot(q, k, input_precision=PRECISION, out_dtype=tl.float32) * scale
            scores = tl.where(visible, scores, float("-inf"))
            acc, m_i, l_i = _update(acc, m_i, l_i, scores, v)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(OUT + head * stride_oh + rows[:, None] * stride_om + dims[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip
    tl.store(LSE + head * stride_lh + rows, lse, mask=row_ok)


def tree_attention_pass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_ctx: int, mask_words: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """q (Hq, N, D); k, v (Hkv, n_ctx + n_tree, D) with unit stride on D; ``mask_words``
    (N, W) int32 for the tree part, or None when there is no tree part."""
    hq, n, d = q.shape
    hkv = k.shape[0]
    group = hq // hkv
    n_tree = k.shape[1] - n_ctx
    q_rows = q.reshape(hkv, group * n, d)  # row = g * N + node; a view when q is contiguous
    out = torch.empty_like(q_rows)
    lse = torch.empty(hkv, group * n, dtype=torch.float32, device=q.device)
    if mask_words is None:
        mask_words = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
    block_m = 16 if group * n <= 16 else 64
    grid = (triton.cdiv(group * n, block_m), hkv)
    _tree_attn_fwd[grid](
        q_rows, k, v, mask_words, out, lse,
        q_rows.stride(0), q_rows.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        n_ctx, n_tree, n, group * n, mask_words.shape[1], scale,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=64, HAS_TREE=n_tree > 0,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out.view(hq, n, d), lse.view(hq, n)
