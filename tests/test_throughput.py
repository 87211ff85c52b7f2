"""The fast training paths give the numbers of the plain ones: block attention = the dense block
mask, bf16 autocast within a stated tolerance, cached top-k acceptance targets, the teacher
cache the data build makes for each family, and length-bucketed data order."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.teacher_cache import drafter_needs, with_teacher_cache
from models.d2sd import D2SD
from models.dflash import BlockMask, block_attention
from models.drafter import Batch, TargetInfo, Teacher
from recipes import load_config
from train.batches import BUCKET, MicroBatches
from train.engine import resolve_topology


def _dense_reference(q, ctx_k, ctx_v, own_k, own_v, context, size, scale):
    """Every block's rows over [context ; every block's rows] under the dense block mask."""
    b, _, n, _ = q.shape
    block_of = torch.arange(n) // size
    own = (block_of[:, None] == block_of[None, :]).expand(b, n, n)
    mask = torch.cat([context, own], -1)[:, None]
    k, v = torch.cat([ctx_k, own_k], 2), torch.cat([ctx_v, own_v], 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def _attention_inputs(dtype=torch.float32, b=2, heads=4, kv_heads=2, blocks=3, size=4, c=9):
    gen = torch.Generator().manual_seed(0)
    n, d = blocks * size, 8
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    q, own_k, own_v = rand(b, heads, n, d), rand(b, kv_heads, n, d), rand(b, kv_heads, n, d)
    ctx_k, ctx_v = rand(b, kv_heads, c, d), rand(b, kv_heads, c, d)
    anchors = torch.randint(0, c + 1, (b, blocks), generator=gen)
    anchors[0, 0] = 0  # a block that sees no context at all (an anchor at position 0)
    context = torch.arange(c)[None, None] < anchors.repeat_interleave(size, 1)[..., None]
    return q, ctx_k, ctx_v, own_k, own_v, context, size


def test_block_attention_equals_the_dense_block_mask():
    q, ctx_k, ctx_v, own_k, own_v, context, size = _attention_inputs()
    ours = block_attention(q, ctx_k, ctx_v, own_k, own_v, BlockMask(context, size), 0.3)
    dense = _dense_reference(q, ctx_k, ctx_v, own_k, own_v, context, size, 0.3)
    torch.testing.assert_close(ours, dense, atol=1e-6, rtol=1e-5)


def test_block_attention_in_bf16_is_within_bf16_rounding():
    """bf16 storage (autocast): within 2e-2 of the float32 result on unit-scale inputs, about
    four bf16 ulps at 1; a wrong mask would be off by O(1)."""
    inputs = _attention_inputs()
    exact = block_attention(*inputs[:5], BlockMask(inputs[5], inputs[6]), 0.3)
    low = [t.bfloat16() for t in inputs[:5]]
    ours = block_attention(*low, BlockMask(inputs[5], inputs[6]), 0.3)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), exact, atol=2e-2, rtol=2e-2)


def test_mixed_precision_auto_follows_the_cpu(monkeypatch):
    cfg = load_config(["recipe=dflash"]).train
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("train.engine.cpu_has_bf16", lambda: True)
    assert resolve_topology(cfg, env={}).mixed_precision == "bf16"
    monkeypatch.setattr("train.engine.cpu_has_bf16", lambda: False)
    assert resolve_topology(cfg, env={}).mixed_precision == "no"
    fp32 = load_config(["recipe=dflash", "train.mixed_precision=no"]).train
    monkeypatch.setattr("train.engine.cpu_has_bf16", lambda: True)
    assert resolve_topology(fp32, env={}).mixed_precision == "no"
    # `accelerate launch` exports "no" when nothing was asked for: the hardware still decides
    launched = {"ACCELERATE_MIXED_PRECISION": "no"}
    assert resolve_topology(cfg, env=launched).mixed_precision == "bf16"
    assert resolve_topology(fp32, env=launched).mixed_precision == "no"


def _d2sd(tiny, *overrides):
    target, tokenizer = tiny
    cfg = load_config(["recipe=d2sd", "drafter.num_layers=1", "drafter.block_size=4",
                       "drafter.vp_block_size=4", "drafter.num_anchors=5", *overrides])  # fmt: skip
    torch.manual_seed(0)
    return D2SD.from_recipe(cfg.drafter, target, TargetInfo.of(target, tokenizer, "tiny"),
                            tokenizer)  # fmt: skip


def test_cached_topk_acceptance_target_is_a_tight_lower_bound(tiny):
    """The sampled rule's target: sum over the target's top-k of min(q, p) equals 1 - TV(q, p)
    when k covers the vocabulary and never exceeds it for a smaller k."""
    target, _ = tiny
    first = _d2sd(tiny, "drafter.confidence_target=sampled").first
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, target.config.vocab_size, (2, 20), generator=gen)
    mask = torch.zeros_like(ids)
    mask[:, 4:19] = 1
    torch.manual_seed(1)
    batch = first.prepare_batch(Batch(ids, torch.ones_like(ids), mask))
    logits = target(input_ids=ids).logits
    with torch.no_grad():
        drafted = first(batch, Teacher(hidden_states=_features(target, ids, first))).logits
    exact = first.acceptance_target(drafted, batch, Teacher(logits=logits))
    logprobs = torch.log_softmax(logits, -1)
    for k, check in ((logprobs.shape[-1], "equal"), (4, "below")):
        top = logprobs.topk(k, dim=-1)
        bound = first.acceptance_target(
            drafted, batch, Teacher(topk_ids=top.indices, topk_logprobs=top.values)
        )
        if check == "equal":
            torch.testing.assert_close(bound, exact, atol=1e-5, rtol=1e-5)
        else:
            assert (bound <= exact + 1e-6).all() and (bound < exact - 1e-4).any()


def _features(target, ids, drafter):
    with torch.no_grad():
        states = target(input_ids=ids, output_hidden_states=True).hidden_states
    return {layer: states[layer] for layer in drafter.target_layers()}


def test_the_data_build_caches_what_each_family_reads(tiny):
    target, tokenizer = tiny
    dflash = load_config(["recipe=dflash", "drafter.num_layers=1"])
    layers, topk = drafter_needs(dflash, target, tokenizer)
    assert layers and topk == 0  # CE on the target's tokens: layers only
    d2sd = load_config(["recipe=d2sd", "drafter.num_layers=1"])
    layers_2, topk_2 = drafter_needs(d2sd, target, tokenizer)
    assert layers_2 == layers and topk_2 == d2sd.drafter.topk  # + the confidence target's top-k
    draft_lm = load_config(["recipe=draft_lm", "drafter.num_layers=1"])
    assert drafter_needs(draft_lm, target, tokenizer) == ([], draft_lm.drafter.topk)
    fkl = load_config(["recipe=draft_lm", "drafter.num_layers=1", "drafter.loss=fkl"])
    assert drafter_needs(fkl, target, tokenizer) == ([], 0)  # full logits: the target runs
    built = with_teacher_cache(d2sd, target, tokenizer).distill
    assert (built.hidden_layers, built.topk_logprobs) == (layers, d2sd.drafter.topk)
    off = load_config(["recipe=d2sd", "drafter.num_layers=1", "distill.teacher_cache=false"])
    assert with_teacher_cache(off, target, tokenizer).distill == off.distill
    seeded = torch.get_rng_state()
    drafter_needs(d2sd, target, tokenizer)
    assert torch.equal(torch.get_rng_state(), seeded)  # the training seed is untouched


class _Rows:
    """A stand-in dataset: rows of given lengths."""

    def __init__(self, lengths):
        self.data = [{"input_ids": list(range(n))} for n in lengths]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        if key == "input_ids":
            return [r["input_ids"] for r in self.data]
        return self.data[key]


def test_length_buckets_pad_less_and_stay_seeded():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 400, (8 * BUCKET * 2,), generator=gen).tolist()
    rows = _Rows(lengths)
    batches = MicroBatches(rows, 8, seed=4, rank=0, world=1, pad_id=0, max_seq_len=512,
                           hidden_layers=[])  # fmt: skip
    epoch = [batches.indices(i) for i in range(batches.per_epoch)]
    assert sorted(i for b in epoch for i in b) == list(range(len(rows)))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in epoch)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(4)).view(-1, 8)
    unbucketed = sum(max(lengths[i] for i in b) * len(b) for b in order.tolist())
    assert sum(lengths) / padded > 0.9 > sum(lengths) / unbucketed
    again = MicroBatches(rows, 8, 4, 0, 1, 0, 512, [])
    assert [again.indices(i) for i in (5, 1, 2 * batches.per_epoch)] == [
        batches.indices(i) for i in (5, 1, 2 * batches.per_epoch)
    ]
    assert batches.indices(batches.per_epoch) != epoch[0]  # the next epoch reshuffles
