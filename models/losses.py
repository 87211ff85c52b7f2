"""Distillation losses and train-time acceptance proxies, shared by drafter families.

Every function takes per-position tensors and a ``mask`` (B, T) of positions to count, and
returns a *sum* over those positions (the engine divides by the global position count, so that
several processes average exactly like one).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def cross_entropy(draft_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Hard CE on the target's tokens. draft_logits (B, T, V), labels (B, T), mask (B, T)."""
    nll = F.cross_entropy(draft_logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return (nll * mask.flatten()).sum()


def forward_kl(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor):
    """KL(target || drafter) over the full vocabulary, summed over masked positions."""
    target_logprobs = F.log_softmax(target_logits.float(), dim=-1)
    draft_logprobs = F.log_softmax(draft_logits.float(), dim=-1)
    kl = (target_logprobs.exp() * (target_logprobs - draft_logprobs)).sum(-1)  # (B, T)
    return (kl * mask).sum()


def topk_forward_kl(
    draft_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
):
    """Forward KL on the target's top-k tokens (DistillSpec-style sparse KD).

    The target's top-k probabilities are renormalised to sum to one; the drafter's
    log-probabilities stay over the full vocabulary, so the value is ≥ 0 and is 0 only when the
    drafter puts exactly the renormalised target mass on the top-k tokens.
    topk_ids/topk_logprobs: (B, T, K).
    """
    target_logprobs = F.log_softmax(topk_logprobs.float(), dim=-1)  # renormalise over the k
    draft_logprobs = F.log_softmax(draft_logits.float(), dim=-1).gather(-1, topk_ids.long())
    kl = (target_logprobs.exp() * (target_logprobs - draft_logprobs)).sum(-1)
    return (kl * mask).sum()


def tvd_plus_plus(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor):
    """TVD++ (Goel et al. 2024, "Direct Alignment of Draft Model for Speculative Decoding").

    1. Reward r(x) = 1[target(x) > draft(x)]: the gradient of TV distance with respect to the
       drafter is -E_{x~draft}[r(x) ∇log draft(x)] (policy-gradient form).
    2. Variance reduction: standardise the reward under the drafter,
       a(x) = (r(x) - E_draft[r]) / std_draft[r].
    3. Surrogate loss -Σ_x draft(x)·a(x)·log draft(x) with draft(x)·a(x) held constant.
    The expectation is taken exactly over the vocabulary (we have both distributions), not by
    sampling. Returns (surrogate sum, TV distance sum) over masked positions.
    """
    draft_logprobs = F.log_softmax(draft_logits.float(), dim=-1)
    draft_probs = draft_logprobs.exp()
    target_probs = F.softmax(target_logits.float(), dim=-1)
    with torch.no_grad():
        reward = (target_probs > draft_probs).float()
        baseline = (draft_probs * reward).sum(-1, keepdim=True)
        spread = (draft_probs * (reward - baseline).square()).sum(-1, keepdim=True).sqrt()
        weight = draft_probs * (reward - baseline) / (spread + 1e-6)
        tvd = 0.5 * (target_probs - draft_probs).abs().sum(-1)
    surrogate = -(weight * draft_logprobs).sum(-1)
    return (surrogate * mask).sum(), (tvd * mask).sum()


@torch.no_grad()
def acceptance_proxies(
    draft_argmax: torch.Tensor, target_argmax: torch.Tensor, mask: torch.Tensor, num_draft: int
) -> dict[str, torch.Tensor]:
    """Train-time proxies of greedy speculative acceptance for a left-to-right drafter.

    With teacher forcing, a chain drafted from position t is accepted up to the first position
    where the drafter's argmax differs from the target's. So over masked start positions t:
    ``accept@k`` sums 1[the first k drafts from t all match] (positions past the mask count as
    mismatches) and ``top1`` is ``accept@1``. These count every position as a start, so they
    are not τ: the chain-walk τ is measured on held-out rows (``train/heldout.py``).
    All arguments are (B, T); returns sums over masked positions.
    """
    match = (draft_argmax == target_argmax) & mask.bool()  # (B, T)
    run = torch.ones_like(match)
    out = {}
    for k in range(1, num_draft + 1):
        shifted = torch.zeros_like(match)
        shifted[:, : match.shape[1] - k + 1] = match[:, k - 1 :]
        run = run & shifted  # drafts 1..k from t all match
        out[f"accept@{k}"] = (run & mask.bool()).float().sum()
    out["top1"] = out["accept@1"]
    return out


CHUNK_ELEMENTS = 1 << 20  # logits per chunk (4 MB in float32): a chunk stays in cache


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _chunk_stats(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(rows, V) of any float dtype -> float32 log-sum-exp, argmax, max and E_q[z] per row
    (q = softmax(z)), in place on a float32 copy."""
    z = chunk.to(torch.float32, copy=True)
    best = z.max(-1)
    shifted = z.sub_(best.values[:, None])  # z - max <= 0
    weights = shifted.exp()
    total = weights.sum(-1)
    mean = best.values + (weights.mul_(shifted)).sum(-1) / total
    return best.values + total.log(), best.indices, best.values, mean


class LogitStats(NamedTuple):
    """Per row of (n, V) logits: ``nll`` of the label (differentiable; None without labels),
    ``lse`` (log-sum-exp), ``argmax``, ``max_logprob`` (log max_v q(v)) and ``entropy`` of
    q = softmax(logits) (None from ``chunked_cross_entropy``)."""

    nll: torch.Tensor | None
    lse: torch.Tensor
    argmax: torch.Tensor
    max_logprob: torch.Tensor
    entropy: torch.Tensor | None


class _ChunkedCE(torch.autograd.Function):
    """Cross-entropy over (n, V) logits, chunk by chunk in float32, whatever the logits' dtype:
    no float32 copy, log-softmax or gradient of the whole (n, V) tensor is ever held (the bf16
    logits of a block drafter on a 49K vocabulary are 0.4 GB; each full float32 pass was 0.8),
    and each chunk's few passes (max, exp, sum; in the backward exp, scatter, scale) run in
    cache on a copy the chunk owns."""

    @staticmethod
    def forward(ctx, logits, labels):
        n, vocab = logits.shape
        nll = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse, peak = torch.empty_like(nll), torch.empty_like(nll)
        top = torch.empty(n, dtype=torch.long, device=logits.device)
        step = _rows_per_chunk(vocab)
        for i in range(0, n, step):
            rows = slice(i, i + step)
            z = logits[rows].to(torch.float32, copy=True)
            best = z.max(-1)
            top[rows], peak[rows] = best.indices, best.values
            picked = z.gather(-1, labels[rows, None])[:, 0]
            norm = best.values + z.sub_(best.values[:, None]).exp_().sum(-1).log()
            lse[rows], nll[rows] = norm, norm - picked
        ctx.save_for_backward(logits, labels, lse)
        ctx.mark_non_differentiable(lse, top, peak)
        return nll, lse, top, peak

    @staticmethod
    def backward(ctx, grad_nll, *_):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        step = _rows_per_chunk(logits.shape[1])
        for i in range(0, logits.shape[0], step):
            rows = slice(i, i + step)
            p = logits[rows].to(torch.float32, copy=True).sub_(lse[rows, None]).exp_()
            p.scatter_add_(-1, labels[rows, None], -torch.ones_like(p[:, :1]))
            grad[rows] = p.mul_(grad_nll[rows, None])
        return grad, None


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> LogitStats:
    """``F.cross_entropy(logits.float(), labels, reduction="none")`` with the statistics the
    metrics read, in one chunked float32 pass. logits (n, V) of any float dtype (its gradient
    comes back in that dtype), labels (n,)."""
    nll, lse, top, peak = _ChunkedCE.apply(logits, labels)
    return LogitStats(nll, lse, top, peak - lse, None)


@torch.no_grad()
def logit_stats(logits: torch.Tensor) -> LogitStats:
    """The statistics without a label (``nll`` None), entropy included, for (..., V) logits of
    any float dtype, chunk by chunk in float32; every output has the leading shape (...)."""
    shape, flat = logits.shape[:-1], logits.reshape(-1, logits.shape[-1])
    if not len(flat):
        empty = flat.new_zeros(shape, dtype=torch.float32)
        return LogitStats(None, empty, empty.long(), empty, empty)
    step = _rows_per_chunk(flat.shape[1])
    parts = [_chunk_stats(flat[i : i + step]) for i in range(0, len(flat), step)]
    lse, top, peak, mean = (torch.cat(p).view(shape) for p in zip(*parts, strict=True))
    return LogitStats(None, lse, top, peak - lse, lse - mean)
