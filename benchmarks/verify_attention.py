"""Verification-attention kernels on a GPU: Triton tree / cascade attention vs SDPA baselines.

    python -m benchmarks.verify_attention        # needs CUDA; run it whenever a GPU is available

Shapes follow an 8B-class target (32 query heads, 8 KV heads, head_dim 128, bf16), batch 1.
For context L in {1k, 4k, 16k, 32k} and tree sizes N in {16, 64, 128}:
- tree: one random tree of N nodes; Triton ``tree_attention`` vs SDPA with the dense
  (N, L + N) mask (the EAGLE / Medusa path);
- cascade, K in {1, 4} branches of N / K nodes each: Triton ``cascade_attention`` over the K
  branches as one tree vs verifying the branches one by one (SDPA, causal over prefix + branch);
- the attention share of a verification forward: attention time over the time of one
  decoder layer (``LlamaDecoderLayer`` of the same shape, random weights) with SDPA attention.
Times are CUDA-event medians; ratios are measured side by side in one run.
"""

from __future__ import annotations

import sys
from functools import partial

import torch

from benchmarks.results import machine, write_section
from kernels.attention import cascade_attention, tree_attention
from kernels.reference import ancestor_mask
from models.target import cache_arg

HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16


def timed(fn, repeats: int = 20) -> float:
    """Median milliseconds of ``fn()`` on the GPU."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def random_parents(n: int, branches: int = 1) -> torch.Tensor:
    """``branches`` chains of n // branches nodes hanging from -1, or a random tree (branches=0)."""
    if branches:
        size = n // branches
        return torch.tensor([-1 if i % size == 0 else i - 1 for i in range(size * branches)])
    gen = torch.Generator().manual_seed(n)
    return torch.tensor(
        [-1] + [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(1, n)]
    )


def sdpa_dense(q, k, v, visible):
    group = HQ // HKV
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    return torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], visible)


def branches_one_by_one(q, k, v, n_ctx: int, branches: int) -> None:
    """Verify each branch (a chain) separately: prefix + its own nodes, causal among them."""
    size = q.shape[1] // branches
    causal = torch.ones(size, size, device=q.device).tril().bool()
    for b in range(branches):
        own = slice(n_ctx + b * size, n_ctx + (b + 1) * size)
        branch_k = torch.cat([k[:, :n_ctx], k[:, own]], 1)
        branch_v = torch.cat([v[:, :n_ctx], v[:, own]], 1)
        mask = torch.ones(size, n_ctx + size, dtype=torch.bool, device=q.device)
        mask[:, n_ctx:] = causal
        sdpa_dense(q[:, b * size : (b + 1) * size], branch_k, branch_v, mask)


def layer_ms(n_ctx: int, n: int, device: str = "cuda", heads=(HQ, HKV, D), inter=14336) -> float:
    """One decoder layer's verification forward (SDPA, dense tree mask) over a cached context."""
    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    hq, hkv, d = heads
    config = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv,
                         intermediate_size=inter, head_dim=d, num_hidden_layers=1)  # fmt: skip
    config._attn_implementation = "sdpa"
    dtype = DTYPE if device == "cuda" else torch.float32
    layer = LlamaDecoderLayer(config, 0).to(device, dtype).eval()
    hidden = torch.randn(1, n_ctx + n, hq * d, device=device, dtype=dtype)
    cos, sin = LlamaRotaryEmbedding(config).to(device)(
        hidden, torch.arange(n_ctx + n)[None].to(device)
    )
    cache = DynamicCache(config=config)
    mask = torch.ones(1, 1, n, n_ctx + n, dtype=torch.bool, device=device)
    mask[0, 0, :, n_ctx:] = torch.ones(n, n, device=device).tril().bool()

    def verify():
        layer(hidden[:, n_ctx:], attention_mask=mask, **cache_arg(layer, cache),
              position_embeddings=(cos[:, n_ctx:], sin[:, n_ctx:]))  # fmt: skip
        for cached in cache.layers:  # drop the tree again: every call sees the same context
            cached.keys, cached.values = cached.keys[..., :n_ctx, :], cached.values[..., :n_ctx, :]

    with torch.no_grad():
        layer(hidden[:, :n_ctx], attention_mask=None, **cache_arg(layer, cache),
              position_embeddings=(cos[:, :n_ctx], sin[:, :n_ctx]))  # fmt: skip
        return timed(verify) if device == "cuda" else (verify() or 0.0)


def main(argv: list[str]) -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks.verify_attention needs a CUDA GPU")
    contexts = [1024, 4096, 16384, 32768]
    rows, cascade_rows = [], []
    for n_ctx in contexts:
        for n in (16, 64, 128):
            q = torch.randn(HQ, n, D, device="cuda", dtype=DTYPE)
            k = torch.randn(HKV, n_ctx + n, D, device="cuda", dtype=DTYPE)
            v = torch.randn_like(k)
            parents = random_parents(n, 0)
            visible = torch.ones(n, n_ctx + n, dtype=torch.bool, device="cuda")
            visible[:, n_ctx:] = ancestor_mask(parents).cuda()
            ours = timed(partial(tree_attention, q, k, v, parents, backend="triton"))
            dense = timed(partial(sdpa_dense, q, k, v, visible))
            attn_share = dense / layer_ms(n_ctx, n)
            rows.append(f"| {n_ctx} | {n} | {ours:.3f} | {dense:.3f} | {dense / ours:.2f}x | "
                        f"{attn_share:.0%} |")  # fmt: skip
            for branches in (1, 4):
                tree = random_parents(n, branches)
                cascade = timed(partial(cascade_attention, q, k, v, tree, backend="triton"))
                one_by_one = timed(partial(branches_one_by_one, q, k, v, n_ctx, branches))
                cascade_rows.append(f"| {n_ctx} | {n} | {branches} | {cascade:.3f} | "
                                    f"{one_by_one:.3f} | {one_by_one / cascade:.2f}x |")  # fmt: skip
            print(rows[-1], flush=True)
    text = "\n".join([
        "## Verification attention kernels (`python -m benchmarks.verify_attention`)", "",
        f"Device: {machine()}. {HQ} query / {HKV} KV heads, head_dim {D}, bf16, batch 1.", "",
        "| context | tree nodes | Triton tree ms | SDPA dense-mask ms | speedup | attention share "
        "of a layer's verify forward |", "| --- | --- | --- | --- | --- | --- |", *rows, "",
        "| context | nodes | branches K | Triton cascade ms | branches one by one (SDPA) ms | "
        "speedup |", "| --- | --- | --- | --- | --- | --- |", *cascade_rows,
    ])  # fmt: skip
    print(text)
    write_section("verify_attention", text)


if __name__ == "__main__":
    main(sys.argv[1:])
