"""Verification attention: input checks and dispatch between the Triton kernels and the eager
references (``kernels/reference.py``), which share these signatures.

    o, lse = tree_attention(q, k, v, parents)      # one pass over context + tree
    o, lse = cascade_attention(q, k, v, parents)   # shared prefix once, tree part, LSE merge

q: (Hq, N, D) queries of the N tree nodes; k, v: (Hkv, L + N, D): the cached context followed by
the tree nodes' own keys/values (the layout of a KV cache after the verification forward
appended the tree); parents: (N,) -1 or an earlier node. Returns o (Hq, N, D), lse (Hq, N) fp32.

Backend: ``auto`` uses Triton on CUDA and the reference elsewhere; ``DRAFTKIT_ATTENTION=triton``
or ``=reference`` (or ``backend=``) forces one. Triton on CPU needs ``TRITON_INTERPRET=1``
(correctness only).
"""

from __future__ import annotations

import os

import torch

from kernels import reference

BACKENDS = ("auto", "triton", "reference")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(q, k, v, parents) -> None:
    """Raise ValueError naming the first bad input (device, dtype, shape, layout, tree)."""
    tensors = {"q": q, "k": k, "v": v}
    for name, t in tensors.items():
        if t.dim() != 3:
            raise ValueError(
                f"{name} must have shape (heads, tokens, head_dim), got {tuple(t.shape)}"
            )
        if t.dtype not in DTYPES:
            raise ValueError(
                f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, DTYPES))}"
            )
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    hq, n, d = q.shape
    if k.shape[0] == 0 or hq % k.shape[0]:
        raise ValueError(f"{hq} query heads are not a multiple of {k.shape[0]} KV heads")
    if k.shape[2] != d:
        raise ValueError(f"head_dim differs: q has {d}, k/v have {k.shape[2]}")
    if parents.dim() != 1 or parents.numel() != n:
        raise ValueError(
            f"parents must have shape ({n},) (one per query), got {tuple(parents.shape)}"
        )
    if k.shape[1] < n:
        raise ValueError(f"k/v hold {k.shape[1]} tokens, fewer than the {n} tree nodes")
    bad = [i for i, p in enumerate(parents.tolist()) if not -1 <= p < i]
    if bad:
        raise ValueError(f"node {bad[0]} has parent {int(parents[bad[0]])}: must be -1 or earlier")


def _backend(q: torch.Tensor, backend: str) -> str:
    choice = os.environ.get("DRAFTKIT_ATTENTION", backend) if backend == "auto" else backend
    if choice not in BACKENDS:
        raise ValueError(f"attention backend '{choice}': valid choices are {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if q.is_cuda else "reference"
    if choice == "triton" and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton backend on CPU needs TRITON_INTERPRET=1 (tests only)")
    if choice == "triton" and (q.shape[-1] < 16 or q.shape[-1] & (q.shape[-1] - 1)):
        raise ValueError(
            f"the triton kernels need a power-of-two head_dim >= 16, got {q.shape[-1]}"
        )
    return choice


def tree_attention(q, k, v, parents, scale: float | None = None, backend: str = "auto"):
    """Each tree node attends to the whole context and to itself and its ancestors."""
    check_inputs(q, k, v, parents)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_ctx = k.shape[1] - q.shape[1]
    if _backend(q, backend) == "reference":
        return reference.tree_attention(q, k[:, :n_ctx], v[:, :n_ctx], k[:, n_ctx:], v[:, n_ctx:],
                                        parents, scale)  # fmt: skip
    from kernels.triton_attention import tree_attention_pass

    words = reference.pack_mask(reference.ancestor_mask(parents.cpu())).to(q.device)
    return tree_attention_pass(q.contiguous(), k, v, n_ctx, words, scale)


def cascade_attention(q, k, v, parents, scale: float | None = None, backend: str = "auto"):
    """Shared-prefix cascade: one pass of every query over the context (read once), one over the
    tree part with the ancestor mask, merged by log-sum-exp."""
    check_inputs(q, k, v, parents)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_ctx = k.shape[1] - q.shape[1]
    k_ctx, v_ctx, k_tree, v_tree = k[:, :n_ctx], v[:, :n_ctx], k[:, n_ctx:], v[:, n_ctx:]
    if _backend(q, backend) == "reference":
        return reference.cascade_attention(q, k_ctx, v_ctx, k_tree, v_tree, parents, scale)
    from kernels.triton_attention import tree_attention_pass

    q = q.contiguous()
    words = reference.pack_mask(reference.ancestor_mask(parents.cpu())).to(q.device)
    o_ctx, lse_ctx = tree_attention_pass(q, k_ctx, v_ctx, n_ctx, None, scale)
    o_tree, lse_tree = tree_attention_pass(q, k_tree, v_tree, 0, words, scale)
    return reference.merge_states(o_ctx, lse_ctx, o_tree, lse_tree)
