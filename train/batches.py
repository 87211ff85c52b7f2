"""Distillation rows -> drafter micro-batches, and the target's teacher signals per batch.

Data order is a pure function of (seed, global micro-batch index): epoch ``e`` shuffles the rows
with a generator seeded ``seed + e``, so a resumed run starts at any index without replaying,
and ``world`` processes split each global batch into contiguous equal parts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from models.drafter import Batch, Drafter, Teacher


def load_rows(data_dir: Path | str):
    """The ``datasets.Dataset`` of a distillation build and its manifest."""
    import datasets

    data_dir = Path(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return datasets.load_from_disk(str(data_dir / "dataset")), manifest


def collate(rows: list[dict], pad_id: int, max_seq_len: int, hidden_layers: list[int]) -> Batch:
    """Right-pad rows into a ``Batch``; cached teacher signals move to predicting positions."""
    length = min(max(len(r["input_ids"]) for r in rows), max_seq_len)
    b = len(rows)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(b, length, dtype=torch.long)
    loss_mask = torch.zeros(b, length, dtype=torch.long)
    has_topk = "topk_ids" in rows[0]
    if has_topk:
        k = len(rows[0]["topk_ids"][0]) if rows[0]["topk_ids"] else 1
        topk_ids = torch.zeros(b, length, k, dtype=torch.long)
        topk_logprobs = torch.zeros(b, length, k)
    hidden = {}
    for i, row in enumerate(rows):
        n = min(len(row["input_ids"]), length)
        input_ids[i, :n] = torch.tensor(row["input_ids"][:n])
        attention_mask[i, :n] = 1
        # position t predicts token t + 1: the mask moves one to the left
        loss_mask[i, : n - 1] = torch.tensor(row["loss_mask"][1:n])
        start = row["prompt_len"] - 1  # the first response token is predicted from here
        if has_topk and row["topk_ids"]:
            m = min(len(row["topk_ids"]), n - 1 - start)
            topk_ids[i, start : start + m] = torch.tensor(row["topk_ids"][:m])
            topk_logprobs[i, start : start + m] = torch.tensor(row["topk_logprobs"][:m])
        if "hidden_states" in row:
            states = torch.as_tensor(row["hidden_states"])  # (layers, T, H)
            for j, layer in enumerate(hidden_layers):
                hidden.setdefault(layer, torch.zeros(b, length, states.shape[-1]))
                hidden[layer][i, :n] = states[j, :n].float()
    batch = Batch(input_ids, attention_mask, loss_mask, hidden_states=hidden)
    if has_topk:
        batch.topk_ids, batch.topk_logprobs = topk_ids, topk_logprobs
    return batch


class MicroBatches:
    """Seeded, resumable micro-batches of one process.

    Args:
        rows: the dataset (indexable, with ``len``).
        batch_size: rows per global micro-batch (over all processes); divisible by ``world``.
        grad_accum: micro-batches per optimiser step; each batch carries its step in ``step``.
    """

    def __init__(
        self, rows, batch_size, seed, rank, world, pad_id, max_seq_len, hidden_layers, grad_accum=1
    ):
        if batch_size % world:
            raise ValueError(
                f"train.batch_size={batch_size} must be divisible by the number of processes "
                f"({world})"
            )
        if len(rows) < batch_size:
            raise ValueError(
                f"the dataset has {len(rows)} rows, fewer than train.batch_size={batch_size}"
            )
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world = rank, world
        self.pad_id, self.max_seq_len, self.hidden_layers = pad_id, max_seq_len, hidden_layers
        self.grad_accum = grad_accum  # micro-batches per optimiser step (stamps Batch.step)
        self.per_epoch = len(rows) // batch_size  # the last partial batch of an epoch is dropped

    def indices(self, index: int) -> list[int]:
        """Row indices of global micro-batch ``index`` that belong to this process."""
        epoch, within = divmod(index, self.per_epoch)
        order = torch.randperm(
            len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch)
        )
        rows = order[within * self.batch_size : (within + 1) * self.batch_size].tolist()
        share = self.batch_size // self.world
        return rows[self.rank * share : (self.rank + 1) * share]

    def __call__(self, start: int) -> Iterator[Batch]:
        index = start
        while True:
            rows = [self.rows[i] for i in self.indices(index)]
            batch = collate(rows, self.pad_id, self.max_seq_len, self.hidden_layers)
            batch.step = index // self.grad_accum
            yield batch
            index += 1


@torch.no_grad()
def teacher_signals(target, batch: Batch, drafter: Drafter) -> Teacher:
    """What the drafter needs from the frozen target, from the cache when it has it, else from
    one online target forward."""
    layers = drafter.target_layers()
    cached_topk = batch.topk_ids is not None
    need_logits = drafter.needs_target_logits(cached_topk)
    need_hidden = [layer for layer in layers if layer not in batch.hidden_states]
    teacher = Teacher(
        hidden_states={k: v for k, v in batch.hidden_states.items() if k in layers},
        topk_ids=batch.topk_ids,
        topk_logprobs=batch.topk_logprobs,
    )
    if not need_logits and not need_hidden:
        return teacher
    out = target(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        output_hidden_states=bool(need_hidden),
    )
    if need_logits:
        teacher.logits = out.logits
    for layer in need_hidden:
        teacher.hidden_states[layer] = out.hidden_states[layer]
    return teacher
