"""Micro-batches from distillation rows: mask alignment, cached teacher signals, data order."""

from __future__ import annotations

import pytest
import torch

from models.drafter import Batch, Drafter
from tests.conftest import build_tiny_dataset
from tests.test_train_drafter import PROMPTS
from train.batches import MicroBatches, collate, load_rows, teacher_signals


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_target_dir, tiny):
    """A dataset with cached top-5 logprobs and hidden states of layers 0 and 2."""
    root = tmp_path_factory.mktemp("cached")
    overrides = [
        "distill.max_new_tokens=8",
        "distill.topk_logprobs=5",
        "distill.hidden_layers=[0,2]",
    ]
    return load_rows(build_tiny_dataset(root, tiny_target_dir, tiny, PROMPTS, *overrides))


class NeedsLayers(Drafter):
    """Stand-in drafter asking for target layers 0 and 2 and (optionally) the logits."""

    def __init__(self, logits: bool):
        super().__init__({}, None)
        self.logits = logits

    def target_layers(self):
        return [0, 2]

    def needs_target_logits(self, cached_topk):
        return self.logits


class CountingTarget(torch.nn.Module):
    def __init__(self, target):
        super().__init__()
        self.target, self.calls = target, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.target(**kwargs)


def test_loss_mask_and_cached_topk_sit_on_predicting_positions(cached, tiny):
    rows, manifest = cached
    target, tokenizer = tiny
    batch = collate([rows[i] for i in range(4)], tokenizer.pad_token_id, 512, [0, 2])
    logits = target(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for i in range(4):
        row = rows[i]
        start, n = row["prompt_len"] - 1, len(row["input_ids"])
        # position t predicts token t + 1: exactly the response tokens are predicted
        assert batch.loss_mask[i].nonzero().flatten().tolist() == list(range(start, n - 1))
        online = torch.log_softmax(logits[i, start : n - 1], -1).topk(5, dim=-1)
        assert torch.equal(batch.topk_ids[i, start : n - 1], online.indices)
        torch.testing.assert_close(
            batch.topk_logprobs[i, start : n - 1], online.values, atol=2e-3, rtol=2e-3
        )  # cached in fp16


def test_cached_signals_replace_the_online_target_forward(cached, tiny):
    rows, _ = cached
    target, tokenizer = tiny
    batch = collate([rows[i] for i in range(3)], tokenizer.pad_token_id, 512, [0, 2])
    counting = CountingTarget(target)
    teacher = teacher_signals(counting, batch, NeedsLayers(logits=False))
    assert counting.calls == 0  # everything came from the cache
    online = target(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    output_hidden_states=True)  # fmt: skip
    real = batch.attention_mask.bool()
    for layer in (0, 2):
        torch.testing.assert_close(
            teacher.hidden_states[layer][real],
            online.hidden_states[layer][real],
            atol=2e-3,
            rtol=2e-3,
        )
    uncached = Batch(batch.input_ids, batch.attention_mask, batch.loss_mask)
    teacher = teacher_signals(counting, uncached, NeedsLayers(logits=True))
    assert counting.calls == 1  # one online forward gives logits and both layers
    # no padding mask online (rows are right-padded): the real positions are unchanged
    torch.testing.assert_close(teacher.logits[real], online.logits[real])
    torch.testing.assert_close(teacher.hidden_states[2][real], online.hidden_states[2][real])
    assert (teacher.logits[~real] - online.logits[~real]).abs().max() > 1e-3  # the test can see


def test_data_order_is_seeded_resumable_and_split_over_processes(cached):
    rows, _ = cached
    one = MicroBatches(
        rows, 4, seed=3, rank=0, world=1, pad_id=0, max_seq_len=512, hidden_layers=[]
    )
    two = [MicroBatches(rows, 4, 3, r, 2, 0, 512, []) for r in range(2)]
    epoch = [one.indices(i) for i in range(one.per_epoch)]
    assert sorted(i for b in epoch for i in b) == list(range(len(rows)))  # an epoch covers all
    assert one.indices(one.per_epoch) != epoch[0]  # the next epoch reshuffles
    for i in range(5):
        assert two[0].indices(i) + two[1].indices(i) == one.indices(i)
    resumed = next(one(2))  # starting at micro-batch 2 gives what the third batch would be
    straight = iter(one(0))
    next(straight), next(straight)
    assert torch.equal(next(straight).input_ids, resumed.input_ids)
    other_seed = MicroBatches(rows, 4, 4, 0, 1, 0, 512, [])
    assert other_seed.indices(0) != one.indices(0)


def test_bad_batch_sizes_are_refused(cached):
    rows, _ = cached
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        MicroBatches(rows, 3, 0, 0, 2, 0, 512, [])
    with pytest.raises(ValueError, match="fewer than train.batch_size=64"):
        MicroBatches(rows, 64, 0, 0, 1, 0, 512, [])
