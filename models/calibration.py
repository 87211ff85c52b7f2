"""Calibration of per-slot acceptance confidences (DSpark §3.2.1, arXiv 2607.05147).

A block drafter's confidence c_k says how likely slot k's token is accepted given slots before
it were. What a scheduler uses is the cumulative product prod_{i <= k} c_i: the probability
that the first k drafted tokens are all accepted. The metrics here compare that product with
the realised prefix acceptance (1 when the target accepted slots 1..k, else 0), per slot:

- ECE with 20 equal-width bins: sum over bins of |bin| / n * |mean(prediction) - mean(outcome)|;
- AUROC: the probability that a random accepted prefix gets a higher prediction than a random
  rejected one (ties count half), by ranks;
- Brier: mean squared error of the prediction.

Sequential temperature scaling fits, for k = 1..B-1 in order, one temperature T_k for the head's
logit z_k (c_k = sigmoid(z_k / T_k)) by a 1-D grid search minimising slot k's ECE of the
cumulative product, the temperatures of earlier slots frozen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

BINS = 20
TEMPERATURES = [math.exp(x / 20) for x in range(-46, 47)]  # 0.1 .. 10, log-spaced


def ece(prediction: torch.Tensor, outcome: torch.Tensor, bins: int = BINS) -> float:
    """Expected calibration error of predictions in [0, 1] against 0/1 outcomes."""
    prediction, outcome = prediction.double().flatten(), outcome.double().flatten()
    if not prediction.numel():
        return float("nan")
    index = (prediction * bins).long().clamp(0, bins - 1)
    total = 0.0
    for b in index.unique().tolist():
        inside = index == b
        total += inside.sum().item() * abs(
            prediction[inside].mean().item() - outcome[inside].mean().item()
        )
    return total / prediction.numel()


def auroc(prediction: torch.Tensor, outcome: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks); NaN without both classes."""
    prediction, outcome = prediction.double().flatten(), outcome.bool().flatten()
    positives, negatives = int(outcome.sum()), int((~outcome).sum())
    if not positives or not negatives:
        return float("nan")
    order = prediction.argsort()
    ranks = torch.empty_like(prediction)
    ranks[order] = torch.arange(1, prediction.numel() + 1, dtype=torch.float64)
    for value in prediction.unique():  # average ranks over ties
        tied = prediction == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    u = ranks[outcome].sum().item() - positives * (positives + 1) / 2
    return u / (positives * negatives)


def brier(prediction: torch.Tensor, outcome: torch.Tensor) -> float:
    if not prediction.numel():
        return float("nan")
    return float(((prediction.double() - outcome.double()) ** 2).mean())


def prefix_outcomes(accepted: torch.Tensor) -> torch.Tensor:
    """(n, S) per-slot acceptance (slot k accepted given slots before it) -> (n, S) realised
    prefix acceptance: 1 where slots 1..k were all accepted."""
    return torch.cumprod(accepted.double(), dim=-1)


def slot_calibration(confidence: torch.Tensor, accepted: torch.Tensor) -> list[dict]:
    """Per slot k: ECE, AUROC and Brier of prod_{i <= k} c_i against realised prefix acceptance.

    Args:
        confidence: (n, S) c_k per drafted block and slot.
        accepted: (n, S) 0/1, slot k's token is what the target chose given the slots before.
    Returns:
        one dict per slot (``slot`` 1-based, ``n`` rows, ``accept`` the realised prefix rate).
    """
    predicted = torch.cumprod(confidence.double(), dim=-1)
    outcome = prefix_outcomes(accepted)
    rows = []
    for k in range(confidence.shape[-1]):
        p, o = predicted[:, k], outcome[:, k]
        rows.append({
            "slot": k + 1, "n": int(p.numel()), "accept": float(o.mean()) if p.numel() else float("nan"),
            "ece": ece(p, o), "auroc": auroc(p, o), "brier": brier(p, o),
        })  # fmt: skip
    return rows


def fit_temperatures(logits: torch.Tensor, accepted: torch.Tensor) -> list[float]:
    """Sequential temperature scaling: (n, S) head logits z and 0/1 per-slot acceptance ->
    S temperatures, fitted slot by slot on the ECE of the cumulative product."""
    outcome = prefix_outcomes(accepted)
    temperatures: list[float] = []
    product = torch.ones(logits.shape[0], dtype=torch.float64)
    for k in range(logits.shape[-1]):
        z = logits[:, k].double()
        best = min(  # ties (e.g. a slot never accepted) go to the mildest temperature
            TEMPERATURES,
            key=lambda t: (ece(product * torch.sigmoid(z / t), outcome[:, k]), abs(math.log(t))),
        )
        temperatures.append(best)
        product = product * torch.sigmoid(z / best)
    return temperatures


def chain_cycles(runs: list[int], mask: list) -> Iterator[tuple[int, int, int]]:
    """The cycles greedy chain decoding goes through on one teacher-forced row: from the first
    response-predicting position, a cycle at root t accepts the chain's leading run there
    (``runs[t]`` correct slots, at most what is left), emits it plus the target's token, and
    the next root is where it stopped. ``mask[t]``: position t predicts a response token.
    Yields (root t, accepted run, response tokens left at t)."""
    positions = [t for t, m in enumerate(mask) if m]
    if not positions:
        return
    t, last = positions[0], positions[-1]
    while t <= last:
        remaining = last - t + 1
        run = min(runs[t], remaining)
        yield t, run, remaining
        t += run + 1


def constant_rates(accepted: torch.Tensor) -> torch.Tensor:
    """(n, S) 0/1 per-slot acceptance -> (S,) the constant confidences whose cumulative product
    is the realised prefix acceptance rate of every slot: the base-rate baseline."""
    prefix = prefix_outcomes(accepted).mean(0)
    before = torch.cat([prefix.new_ones(1), prefix[:-1]])
    return torch.where(before > 0, prefix / before.clamp(min=1e-12), 0.0).float()
