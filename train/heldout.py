"""Held-out training metrics that mean what decoding measures.

Every ``train.eval_every`` steps the drafter is scored on held-out rows (whole source modules
kept out of training, ``split_heldout``) the way greedy chain decoding would use it:

- **chain-walk τ** (``heldout_tau``): walk each held-out response from its first token as
  decoding does. At a cycle root t the drafter's chain is accepted up to its first wrong slot
  (given the true tokens up to t, which greedy decoding has committed), the cycle emits the
  accepted tokens plus the target's own, and the next root is where it stopped. τ = emitted
  tokens / cycles. The rows are the target's own greedy responses, so this is the τ that
  ``infer.eval`` would measure for the chain on these prompts (up to the target's dtype).
- **conditional acceptance** (``heldout_acc@k``): over the cycle roots the walk visits, the share
  of those whose slots 1..k-1 were accepted whose slot k is accepted too.

A family provides ``Drafter.heldout_hits(batch, teacher)``: for every position t that predicts a
response token, whether slot k of the chain drafted from t is right given the true tokens up to
t (teacher-forced; only the leading run is used, so a slot after a miss does not matter).
Medusa and Hydra give their tree's rank-0 path (a lower bound on the tree's τ); Falcon, the
hidden-state transfer drafter and D²SD's VP stage return None and get no held-out τ yet.
"""

from __future__ import annotations

import hashlib

import torch

from models.calibration import chain_cycles


def split_heldout(source_ids: list[str], n: int) -> tuple[list[int], list[int]]:
    """(training, held-out) row indices: whole source modules are held out, in the order of a
    hash of their name, until at least ``n`` rows are (so no held-out row shares a module with
    a training row). A source id reads ``category/module:line``; ids without that form are
    their own module."""
    if n <= 0:
        return list(range(len(source_ids))), []

    def module(source: str) -> str:
        return source.split("/", 1)[-1].split(":", 1)[0]

    by_module: dict[str, list[int]] = {}
    for i, source in enumerate(source_ids):
        by_module.setdefault(module(str(source)), []).append(i)
    order = sorted(by_module, key=lambda m: hashlib.sha256(m.encode()).hexdigest())
    held: list[int] = []
    for name in order:
        if len(held) >= n:
            break
        held += by_module[name]
    kept = sorted(set(range(len(source_ids))) - set(held))
    return kept, sorted(held)


def walk(hits: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, float]:
    """Sums of the greedy chain walk over a batch.

    Args:
        hits: (b, T, K) bool: slot k + 1 of the chain drafted at position t is right.
        loss_mask: (b, T): position t predicts a response token.
    Returns:
        ``emitted``, ``cycles`` and per slot k ``reached@k`` / ``accepted@k`` (roots whose
        slots before k were accepted, and those whose slot k was too).
    """
    slots = hits.shape[-1]
    # leading run of each position's chain: slots accepted before the first miss
    runs = torch.cumprod(hits.long(), dim=-1).sum(-1).tolist()  # (b, T)
    sums = {"emitted": 0.0, "cycles": 0.0}
    for k in range(1, slots + 1):
        sums[f"reached@{k}"] = sums[f"accepted@{k}"] = 0.0
    for row, mask in enumerate(loss_mask.tolist()):
        for _, run, remaining in chain_cycles(runs[row], mask):
            sums["emitted"] += min(run + 1, remaining)
            sums["cycles"] += 1
            for k in range(1, min(slots, remaining) + 1):
                if run >= k - 1:
                    sums[f"reached@{k}"] += 1
                    sums[f"accepted@{k}"] += run >= k
    return sums


@torch.no_grad()
def heldout_metrics(module, pairs) -> dict[str, float]:
    """``heldout_tau`` and ``heldout_acc@k`` of ``module`` over ``pairs`` of (Batch, Teacher);
    {} when the family has no chain walk or there are no held-out rows."""
    was_training = module.training
    module.eval()
    total: dict[str, float] = {}
    try:
        for batch, teacher in pairs:
            hits = module.heldout_hits(batch, teacher)
            if hits is None:
                return {}
            for key, value in walk(hits.cpu(), batch.loss_mask.cpu()).items():
                total[key] = total.get(key, 0.0) + value
    finally:
        module.train(was_training)
    if not total.get("cycles"):
        return {}
    out = {"heldout_tau": total["emitted"] / total["cycles"]}
    k = 1
    while f"reached@{k}" in total:
        if total[f"reached@{k}"]:
            out[f"heldout_acc@{k}"] = total[f"accepted@{k}"] / total[f"reached@{k}"]
        k += 1
    return out
