"""Distillation rows -> drafter micro-batches, and the target's teacher signals per batch.

Data order is a pure function of (seed, global micro-batch index): epoch ``e`` shuffles the rows
with a generator seeded ``seed + e``, so a resumed run starts at any index without replaying,
and ``world`` processes split each global batch into contiguous equal parts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from models.drafter import Batch, Drafter, Teacher


def load_rows(data_dir: Path | str):
    """The ``datasets.Dataset`` of a distillation build (numpy format: rows load as arrays,
    cached teacher signals without a Python loop) and its manifest."""
    import datasets

    data_dir = Path(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    rows = datasets.load_from_disk(str(data_dir / "dataset"))
    return rows.with_format("numpy", dtype=None), manifest  # stored dtypes (fp16, int32)


def _tensor(values, dtype=None) -> torch.Tensor:
    """A row field (numpy array or list) as a tensor, without copying numpy data."""
    array = np.asarray(values)
    return torch.from_numpy(array) if dtype is None else torch.from_numpy(array).to(dtype)


def collate(rows: list[dict], pad_id: int, max_seq_len: int, hidden_layers: list[int]) -> Batch:
    """Right-pad rows into a ``Batch``; cached teacher signals move to predicting positions.

    Cached hidden states are stored per token as (T, layers, H) float16 (``data/distill.py``);
    top-k ids/logprobs as (response tokens, K)."""
    length = min(max(len(r["input_ids"]) for r in rows), max_seq_len)
    b = len(rows)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(b, length, dtype=torch.long)
    loss_mask = torch.zeros(b, length, dtype=torch.long)
    has_topk = "topk_ids" in rows[0] and rows[0]["topk_ids"] is not None
    if has_topk:
        k = max(1, np.shape(rows[0]["topk_ids"])[-1])
        topk_ids = torch.zeros(b, length, k, dtype=torch.long)
        topk_logprobs = torch.zeros(b, length, k)
    hidden = None
    for i, row in enumerate(rows):
        n = min(len(row["input_ids"]), length)
        input_ids[i, :n] = _tensor(row["input_ids"][:n], torch.long)
        attention_mask[i, :n] = 1
        # position t predicts token t + 1: the mask moves one to the left
        loss_mask[i, : n - 1] = _tensor(row["loss_mask"][1:n], torch.long)
        start = int(row["prompt_len"]) - 1  # the first response token is predicted from here
        if has_topk and len(row["topk_ids"]):
            m = min(len(row["topk_ids"]), n - 1 - start)
            topk_ids[i, start : start + m] = _tensor(row["topk_ids"][:m], torch.long)
            topk_logprobs[i, start : start + m] = _tensor(row["topk_logprobs"][:m], torch.float)
        if hidden_layers and row.get("hidden_states") is not None:
            states = _tensor(row["hidden_states"])  # (T, layers, H) float16
            if hidden is None:
                hidden = torch.zeros(len(hidden_layers), b, length, states.shape[-1])
            hidden[:, i, :n] = states[:n].transpose(0, 1)
    layers = {} if hidden is None else dict(zip(hidden_layers, hidden, strict=True))
    batch = Batch(input_ids, attention_mask, loss_mask, hidden_states=layers)
    if has_topk:
        batch.topk_ids, batch.topk_logprobs = topk_ids, topk_logprobs
    return batch


BUCKET = 16  # batches per length bucket: rows are sorted by length within 16 batches' worth


class MicroBatches:
    """Seeded, resumable, length-bucketed micro-batches of one process.

    An epoch shuffles the rows (generator seeded ``seed + epoch``), cuts the order into buckets
    of ``BUCKET`` global batches, sorts each bucket by row length (so a batch pads little), and
    shuffles the batches; the order is a pure function of (seed, epoch), so a resumed run starts
    at any index without replaying.

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
        self.lengths = torch.tensor([min(len(ids), max_seq_len) for ids in rows["input_ids"]])
        self._epoch: tuple[int, list[list[int]]] = (-1, [])

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Row indices of every global batch of ``epoch``, in training order."""
        if self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.rows), generator=generator)
            order = order[: self.per_epoch * self.batch_size]
            batches = []
            for start in range(0, len(order), BUCKET * self.batch_size):
                bucket = order[start : start + BUCKET * self.batch_size]
                ranked = bucket[torch.sort(self.lengths[bucket], stable=True).indices]
                batches += ranked.view(-1, self.batch_size).tolist()
            shuffled = torch.randperm(len(batches), generator=generator).tolist()
            self._epoch = (epoch, [batches[i] for i in shuffled])
        return self._epoch[1]

    def indices(self, index: int) -> list[int]:
        """Row indices of global micro-batch ``index`` that belong to this process."""
        epoch, within = divmod(index, self.per_epoch)
        rows = self.epoch_batches(epoch)[within]
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
    one online target forward.

    The online forward passes no attention mask: rows are right-padded and attention is causal,
    so real positions never see padding (and the causal fast path stays on). Logits are computed
    only when the objective reads them."""
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
    if need_logits or not hasattr(target, "get_decoder"):  # (a ZeRO-3 wrapper: the whole model)
        out = target(input_ids=batch.input_ids, output_hidden_states=bool(need_hidden))
        teacher.logits = out.logits if need_logits else None
    else:  # hidden states only: the decoder without the LM head
        out = target.get_decoder()(input_ids=batch.input_ids, output_hidden_states=True)
    for layer in need_hidden:
        teacher.hidden_states[layer] = out.hidden_states[layer]
    return teacher
