"""Distillation losses and acceptance proxies on hand-made distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.losses import (
    acceptance_proxies,
    cross_entropy,
    forward_kl,
    topk_forward_kl,
    tvd_plus_plus,
)


def _logits(seed, shape=(2, 5, 11)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


def test_forward_kl_is_zero_at_the_target_and_positive_elsewhere():
    target, mask = _logits(0), torch.ones(2, 5)
    assert forward_kl(target, target, mask).abs() < 1e-5
    kl = forward_kl(_logits(1), target, mask)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=target),
        torch.distributions.Categorical(logits=_logits(1)),
    ).sum()
    torch.testing.assert_close(kl, expected)


def test_masked_positions_do_not_count():
    target, draft = _logits(0), _logits(1)
    mask = torch.zeros(2, 5)
    mask[0, 2] = 1
    single = forward_kl(draft[:1, 2:3], target[:1, 2:3], torch.ones(1, 1))
    torch.testing.assert_close(forward_kl(draft, target, mask), single)
    labels = target.argmax(-1)
    assert cross_entropy(draft, labels, mask) == cross_entropy(
        draft[:1, 2:3], labels[:1, 2:3], torch.ones(1, 1)
    )


def test_topk_kl_is_zero_when_the_drafter_matches_the_renormalised_top_k():
    target, mask = _logits(0), torch.ones(2, 5)
    top = torch.log_softmax(target, -1).topk(3, dim=-1)
    draft = torch.full_like(target, -1e4).scatter(-1, top.indices, top.values)  # only the top 3
    assert topk_forward_kl(draft, top.indices, top.values, mask).abs() < 1e-4
    assert topk_forward_kl(_logits(2), top.indices, top.values, mask) > 0.1


def test_tvd_plus_plus_descends_the_total_variation_distance():
    target, mask = _logits(0), torch.ones(2, 5)
    draft = _logits(1).requires_grad_(True)
    optimizer = torch.optim.SGD([draft], lr=0.5)
    tvds = []
    for _ in range(60):
        surrogate, tvd = tvd_plus_plus(draft, target, mask)
        tvds.append(tvd.item())
        optimizer.zero_grad()
        surrogate.backward()
        optimizer.step()
    assert tvds[-1] < 0.5 * tvds[0]
    manual = 0.5 * (target.softmax(-1) - _logits(1).softmax(-1)).abs().sum(-1).sum()
    torch.testing.assert_close(torch.tensor(tvds[0]), manual)


def test_acceptance_proxies_count_greedy_chains():
    target = torch.tensor([[1, 2, 3, 4, 5, 6]])
    draft = torch.tensor([[1, 2, 9, 4, 5, 6]])  # one mismatch at position 2
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # the last position is not a loss position
    out = acceptance_proxies(draft, target, mask, num_draft=3)
    # chains from positions 0..4: matches [1,1,0,1,1]; runs (capped by the mask): 2,1,0,2,1
    assert out["accept@1"] == 4 and out["top1"] == 4
    assert out["accept@2"] == 2  # from 0 (1,2) and from 3 (4,5)
    assert out["accept@3"] == 0
    assert "tau" not in out  # not a τ: every position counts as a start


def test_chunked_cross_entropy_equals_the_full_one():
    """Across chunk boundaries the loss, its gradient and the statistics equal
    F.cross_entropy / log_softmax in float32; bf16 logits get a bf16 gradient within bf16
    rounding of the float32 one."""
    from models.losses import CHUNK_ELEMENTS, chunked_cross_entropy, logit_stats

    gen = torch.Generator().manual_seed(0)
    vocab = 5000
    n = CHUNK_ELEMENTS // vocab + 37  # a full chunk and a partial one
    logits = (3 * torch.randn(n, vocab, generator=gen)).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    weights = torch.rand(n, generator=gen)
    reference = F.cross_entropy(logits, labels, reduction="none")
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), logits)
    stats = chunked_cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad((stats.nll * weights).sum(), logits)
    torch.testing.assert_close(stats.nll, reference)
    torch.testing.assert_close(grad, grad_ref)
    logprobs = F.log_softmax(logits.detach(), -1)
    assert torch.equal(stats.argmax, logits.detach().argmax(-1))
    torch.testing.assert_close(stats.max_logprob, logprobs.max(-1).values)
    unlabelled = logit_stats(logits.detach().view(n, 1, vocab))
    assert unlabelled.nll is None and unlabelled.lse.shape == (n, 1)
    torch.testing.assert_close(unlabelled.lse[:, 0], stats.lse)
    torch.testing.assert_close(unlabelled.entropy[:, 0], -(logprobs.exp() * logprobs).sum(-1))
    assert torch.equal(stats.nll, chunked_cross_entropy(logits, labels).nll)  # logits untouched
    low = logits.detach().bfloat16().requires_grad_()
    (grad_low,) = torch.autograd.grad((chunked_cross_entropy(low, labels).nll * weights).sum(), low)
    assert grad_low.dtype == torch.bfloat16
    torch.testing.assert_close(grad_low.float(), grad_ref, atol=1e-2, rtol=2e-2)
