"""Triton verification-attention kernels against the eager references (small shapes, fp32, tight
tolerance), input checks, dispatch; larger shapes and bf16 on GPU. Every tensor lives on DEVICE:
on a CUDA host the kernels run as compiled Triton on the GPU, on a CPU-only host under
TRITON_INTERPRET=1 (set by conftest only when there is no CUDA)."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.attention import cascade_attention, tree_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def chain(n):
    return list(range(-1, n - 1))


def star(n):
    return [-1] + [0] * (n - 1)


def random_tree(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [-1] + [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(1, n)]


def _inputs(hq, hkv, n, n_ctx, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, n, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(hkv, n_ctx + n, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(hkv, n_ctx + n, d, generator=gen).to(DEVICE, dtype)
    return q, k, v


def test_reference_equals_a_dense_mask_softmax():
    """The reference itself against plain masked softmax attention per head (the tree and the
    mask on the inputs' device: a CPU mask cannot mask CUDA scores)."""
    parents = torch.tensor(random_tree(9, 1), device=DEVICE)
    q, k, v = _inputs(4, 2, 9, 11, 16)
    o, lse = reference.tree_attention(q, k[:, :11], v[:, :11], k[:, 11:], v[:, 11:], parents, 0.25)
    context = torch.ones(9, 11, dtype=torch.bool, device=DEVICE)
    visible = torch.cat([context, reference.ancestor_mask(parents)], 1)
    for h in range(4):
        scores = (q[h] @ k[h // 2].T * 0.25).masked_fill(~visible, float("-inf"))
        torch.testing.assert_close(o[h], torch.softmax(scores, -1) @ v[h // 2])
        torch.testing.assert_close(lse[h], torch.logsumexp(scores, -1))
    cascade = reference.cascade_attention(
        q, k[:, :11], v[:, :11], k[:, 11:], v[:, 11:], parents, 0.25
    )
    torch.testing.assert_close(cascade[0], o)
    torch.testing.assert_close(cascade[1], lse)


def test_pack_mask_bits():
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0, 0] = mask[1, 31] = mask[2, 33] = True
    words = reference.pack_mask(mask)
    assert words.shape == (3, 2) and words.dtype == torch.int32
    assert words[0].tolist() == [1, 0] and words[1].tolist() == [-(2**31), 0]
    assert words[2].tolist() == [0, 2]


CASES = [  # (tree, n_ctx, hq, hkv, head_dim)
    (chain(5), 37, 4, 4, 16),
    (star(9), 64, 4, 2, 16),
    (random_tree(33, 2), 1, 8, 2, 32),  # tree part longer than one 32-key mask word
    (random_tree(40, 3), 130, 6, 3, 16),  # context not a multiple of the 64-key block
    (chain(1), 0, 2, 1, 16),  # no context at all
    (random_tree(17, 4), 70, 8, 1, 16),  # multi-query attention (one KV head)
]


@pytest.mark.parametrize(("tree", "n_ctx", "hq", "hkv", "d"), CASES)
@pytest.mark.parametrize("op", [tree_attention, cascade_attention])
def test_triton_equals_reference(op, tree, n_ctx, hq, hkv, d):
    parents = torch.tensor(tree)
    q, k, v = _inputs(hq, hkv, len(tree), n_ctx, d, seed=n_ctx)
    expected = tree_attention(q, k, v, parents, backend="reference")
    got = op(q, k, v, parents, backend="triton")
    torch.testing.assert_close(got[0], expected[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got[1], expected[1], atol=2e-5, rtol=2e-5)


def test_context_only_pass_has_an_empty_tree_part():
    """The cascade's prefix pass (no tree keys) equals unmasked attention over the context."""
    from kernels.triton_attention import tree_attention_pass

    q, k, v = _inputs(4, 2, 6, 45, 16)
    ctx_k, ctx_v = k[:, :45], v[:, :45]
    got = tree_attention_pass(q, ctx_k, ctx_v, 45, None, 0.25)
    expected = reference.attention_with_lse(q, ctx_k, ctx_v, None, 0.25)
    torch.testing.assert_close(got[0], expected[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got[1], expected[1], atol=2e-5, rtol=2e-5)


def test_bad_inputs_are_named():
    q, k, v = _inputs(4, 2, 5, 10, 16)
    parents = torch.tensor(chain(5))
    with pytest.raises(ValueError, match="4 query heads are not a multiple of 3 KV heads"):
        tree_attention(q, k[:1].expand(3, -1, -1), v[:1].expand(3, -1, -1), parents)
    with pytest.raises(ValueError, match="q, k, v dtypes differ"):
        tree_attention(q, k.half(), v.half(), parents)
    with pytest.raises(ValueError, match=r"parents must have shape \(5,\)"):
        tree_attention(q, k, v, parents[:4])
    with pytest.raises(ValueError, match="node 2 has parent 3"):
        tree_attention(q, k, v, torch.tensor([-1, 0, 3, 1, 2]))
    with pytest.raises(ValueError, match="fewer than the 5 tree nodes"):
        tree_attention(q, k[:, :4], v[:, :4], parents)
    with pytest.raises(ValueError, match="contiguous in its last"):
        tree_attention(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, parents)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        tree_attention(q.long(), k.long(), v.long(), parents)
    with pytest.raises(ValueError, match="attention backend 'cuda'"):
        tree_attention(q, k, v, parents, backend="cuda")


def test_dispatch(monkeypatch):
    """``auto`` takes Triton on CUDA tensors and the reference on CPU ones; Triton on CPU tensors
    is refused without TRITON_INTERPRET=1; DRAFTKIT_ATTENTION=reference overrides ``auto``."""
    monkeypatch.delenv("DRAFTKIT_ATTENTION", raising=False)  # auto, whatever the caller set
    q, k, v = _inputs(2, 1, 3, 4, 16)
    parents = torch.tensor(chain(3))
    calls = []
    real = reference.tree_attention
    monkeypatch.setattr(reference, "tree_attention", lambda *a: calls.append(1) or real(*a))
    tree_attention(q, k, v, parents)
    assert calls == ([] if q.is_cuda else [1])
    if not q.is_cuda:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
            tree_attention(q, k, v, parents, backend="triton")
    monkeypatch.setenv("DRAFTKIT_ATTENTION", "reference")
    tree_attention(q, k, v, parents)
    assert calls == ([1] if q.is_cuda else [1, 1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "n_ctx", "hq", "hkv", "d"), [(64, 4096, 32, 8, 128), (128, 1000, 16, 4, 64)]
)
def test_large_shapes_on_gpu(dtype, n, n_ctx, hq, hkv, d):
    parents = torch.tensor(random_tree(n, 7))
    q, k, v = _inputs(hq, hkv, n, n_ctx, d, dtype)
    expected = tree_attention(q.float(), k.float(), v.float(), parents, backend="reference")
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
    for op in (tree_attention, cascade_attention):
        got = op(q, k, v, parents, backend="triton")
        torch.testing.assert_close(got[0].float(), expected[0], atol=tol, rtol=tol)
        torch.testing.assert_close(got[1], expected[1], atol=tol, rtol=tol)
