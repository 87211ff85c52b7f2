"""Block drafters (DFlash, DEER): the traps other trainers fell into.

- a block never sees target features at or after its anchor;
- a one-token label shift is caught by the inference path;
- the batched training forward equals the inference forward (fp32, atol 1e-5);
- (greedy losslessness with drafts accepted and the sampled law through the loop:
  ``test_lossless.py``, ``test_sampling_loop.py``);
- tiny runs through ``train/drafter.py`` resume exactly (DEER across its stage switch).
"""

from __future__ import annotations

import json

import pytest
import torch

import train.drafter as entry
from infer.decode import decode
from infer.proposers import proposer_for
from models.deer import Deer
from models.dflash import BlockContext, DFlash, default_target_layers, resolve_mask_token
from models.drafter import Batch, TargetInfo, load_drafter
from models.sampling import Sampling
from recipes import load_config
from tests.conftest import build_tiny_dataset
from tests.fitted import overfit
from tests.test_train_drafter import PROMPTS, Crash, _crash, _fail_on_call, _losses, _weights
from train.batches import teacher_signals


def _drafter(tiny, *overrides, family: type = DFlash):
    target, tokenizer = tiny
    cfg = load_config(
        ["recipe=dflash", "drafter.num_layers=1", "drafter.block_size=4",
         "drafter.num_anchors=6", *overrides]
    )  # fmt: skip
    info = TargetInfo.of(target, tokenizer, "tiny")
    torch.manual_seed(0)
    return family.from_recipe(cfg.drafter, target, info, tokenizer).eval()


def _batch(tiny, drafter, seq: int = 24, rows: int = 2) -> tuple[Batch, object]:
    target, _ = tiny
    ids = torch.randint(3, target.config.vocab_size, (rows, seq), generator=_gen(1))
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 5 : seq - 1] = 1
    torch.manual_seed(2)
    batch = drafter.prepare_batch(Batch(ids, torch.ones_like(ids), loss_mask))
    return batch, teacher_signals(target, batch, drafter)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_features_at_or_after_an_anchor_leave_its_block_unchanged(tiny):
    drafter = _drafter(tiny)
    batch, teacher = _batch(tiny, drafter)
    logits = drafter(batch, teacher)  # (b, N, B, V)
    anchors = batch.anchors[0].tolist()
    j = len(anchors) // 2
    anchor = anchors[j]
    layer = drafter.target_layers()[0]
    perturbed = teacher.hidden_states[layer].clone()
    perturbed[0, anchor:] += torch.randn(perturbed[0, anchor:].shape, generator=_gen(3))
    teacher.hidden_states[layer] = perturbed
    changed = drafter(batch, teacher)
    for i, a in enumerate(anchors):  # blocks anchored at or before the change see none of it
        if a <= anchor:
            torch.testing.assert_close(changed[0, i], logits[0, i], rtol=0, atol=1e-6)
        else:
            assert not torch.allclose(changed[0, i], logits[0, i], atol=1e-4), (i, a, anchor)
    torch.testing.assert_close(changed[1], logits[1], rtol=0, atol=1e-6)  # other rows untouched
    perturbed[0, anchor - 1] += 1.0  # the feature just before the anchor is seen
    assert not torch.allclose(drafter(batch, teacher)[0, j], logits[0, j], atol=1e-4)


@pytest.mark.parametrize("family", [DFlash, Deer])
def test_training_blocks_equal_the_inference_forward(tiny, family):
    drafter = _drafter(tiny, "drafter.context_layers=1", family=family)
    batch, teacher = _batch(tiny, drafter)
    logits = drafter(batch, teacher)
    if family is DFlash:  # the context is the target's features, else the tokens themselves
        features = torch.cat([teacher.hidden_states[i] for i in drafter.target_layers()], -1)
    else:
        features = batch.input_ids
    for row in range(2):
        for j, anchor in enumerate(batch.anchors[row].tolist()):
            root, cut = int(batch.input_ids[row, anchor]), anchor // 2
            whole = drafter.draft_block(root, anchor, features[row, :anchor], BlockContext())
            torch.testing.assert_close(whole, logits[row, j, 1:], rtol=0, atol=1e-5)
            state = BlockContext()  # the context fed in two pieces, as the loop does
            drafter.draft_block(root, cut, features[row, :cut], state)
            pieces = drafter.draft_block(root, anchor, features[row, cut:anchor], state)
            torch.testing.assert_close(pieces, logits[row, j, 1:], rtol=0, atol=1e-5)


CYCLE = (torch.randperm(200, generator=_gen(3))[:20] + 10).tolist()


def _cycles(rows: int, seq: int = 40) -> torch.Tensor:
    """Token sequences walking one fixed cycle of 20 tokens from different offsets: the token
    after x is always the same, so a drafter can learn slot k -> anchor + k exactly."""
    offsets = torch.arange(rows) * 7
    return torch.tensor(CYCLE)[(offsets[:, None] + torch.arange(seq)) % len(CYCLE)]


class ShiftedLabels(DFlash):
    """An EAGLE-style shift: slot k trained on the token at anchor + k + 1."""

    def block_labels(self, batch):
        labels, valid = super().block_labels(batch)
        valid = valid.clone()
        valid[..., -1] = False
        return torch.roll(labels, -1, dims=-1), valid


def _first_slot_accuracy(tiny, family: type) -> float:
    """Train on the cycles, then measure through the inference forward how often slot 1 drafts
    the token that really follows the anchor."""
    target, _ = tiny
    drafter = _drafter(tiny, "drafter.init=random", "drafter.num_anchors=8", family=family)
    ids = _cycles(8)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 4:-1] = 1
    batch = Batch(ids, torch.ones_like(ids), loss_mask)
    overfit(drafter, target, [batch], 150, 3e-2, torch.optim.AdamW)
    teacher = teacher_signals(target, Batch(ids, torch.ones_like(ids), loss_mask), drafter)
    features = torch.cat([teacher.hidden_states[i] for i in drafter.target_layers()], -1)
    hits = [
        int(drafter.draft_block(int(ids[r, a]), a, features[r, :a], BlockContext())[0].argmax())
        == int(ids[r, a + 1])
        for r in range(8)
        for a in range(5, 30, 3)
    ]
    return sum(hits) / len(hits)


def test_a_one_token_label_shift_is_caught(tiny):
    assert _first_slot_accuracy(tiny, DFlash) >= 0.8
    # trained on shifted labels its own metrics look as good, but the drafts are misaligned
    assert _first_slot_accuracy(tiny, ShiftedLabels) <= 0.2


def test_mask_token_and_target_layers_are_checked(tiny):
    _, tokenizer = tiny
    assert default_target_layers(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B, as DFlash picks
    assert default_target_layers(2, 1) == [0]  # never the last layer
    assert resolve_mask_token(-1, tokenizer, len(tokenizer) + 4) == len(tokenizer)
    assert resolve_mask_token(-1, tokenizer, len(tokenizer)) == tokenizer.pad_token_id
    with pytest.raises(ValueError, match="outside the target's embedding: valid ids are 0..299"):
        resolve_mask_token(len(tokenizer), tokenizer, len(tokenizer))
    with pytest.raises(ValueError, match="target_layers"):
        _drafter(tiny, "drafter.target_layers=[1]")  # the tiny target's last layer


# --- a target with no spare token: a learned mask embedding ------------------------------------


@pytest.fixture(scope="module")
def full_target_dir(tmp_path_factory, tiny_target_dir):
    """The tiny target with a tokenizer that has no mask or pad token and uses every embedding
    row (as many code and base models do): no token id is free for the mask."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("full_vocab_target")
    tokenizer = AutoTokenizer.from_pretrained(tiny_target_dir)
    tokenizer.pad_token = None
    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    assert model.config.vocab_size == len(tokenizer) and tokenizer.mask_token_id is None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_no_spare_token_means_a_learned_mask_and_an_explicit_id_still_wins(full_target_dir):
    from models.target import load_target

    target, tokenizer = load_target(str(full_target_dir))
    assert tokenizer.pad_token_id is None
    assert resolve_mask_token(-1, tokenizer, len(tokenizer)) is None
    assert resolve_mask_token(7, tokenizer, len(tokenizer)) == 7
    learned = _drafter((target, tokenizer))
    assert learned.config["mask_token_id"] is None and learned.mask_token_id == len(tokenizer)
    embedding = target.get_input_embeddings().weight
    torch.testing.assert_close(learned.mask_embedding.data, embedding.float().mean(0))
    assert "mask_embedding" in learned.state_dict()
    explicit = _drafter((target, tokenizer), "drafter.mask_token_id=7")
    assert explicit.mask_embedding is None and explicit.mask_token_id == 7
    assert "mask_embedding" not in explicit.state_dict()
    # the mask slots get the learned vector, the anchor its token's embedding
    block = learned.block_ids(torch.tensor([5]))
    rows = learned.embed_block(block)[0]
    torch.testing.assert_close(rows[0], embedding[5].float())
    torch.testing.assert_close(rows[1:], learned.mask_embedding.data.expand(3, -1))


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [("dflash", ()), ("deer", ("drafter.context_layers=1", "drafter.stage2_step=4")),
     ("d2sd", ("drafter.vp_steps=2",))],
)  # fmt: skip
def test_block_families_train_and_decode_on_a_target_with_no_spare_token(
    tmp_path, full_target_dir, recipe, extra
):
    """Data, training, saving, loading and lossless decoding through the entry point, on a
    target whose tokenizer leaves no id for the mask; the learned mask embedding is trained."""
    from models.target import load_target

    out = tmp_path / recipe
    argv = [f"recipe={recipe}", f"target={full_target_dir}", f"output_dir={out}",
            "prompts.source=stdlib-eval", "prompts.limit=12", "distill.max_new_tokens=12",
            "train.device=cpu", "train.steps=4", "train.batch_size=4", "train.warmup_steps=1",
            "drafter.num_layers=1", "drafter.block_size=4", "drafter.num_anchors=4",
            "drafter.heldout_rows=2", "final_eval.limit=0", "distill.max_drop_rate=0.5", *extra]  # fmt: skip
    assert entry.main(argv) == 0
    folder = out / "drafter"
    saved = json.loads((folder / "config.json").read_text())["drafter"]
    configs = [saved[k] for k in ("first", "vp")] if recipe == "d2sd" else [saved]
    assert all(c["mask_token_id"] is None for c in configs)
    weights = _weights(out)
    masks = [k for k in weights if k.endswith("mask_embedding")]
    assert len(masks) == len(configs)
    target, tokenizer = load_target(str(full_target_dir))
    start = target.get_input_embeddings().weight.float().mean(0)
    assert all(not torch.allclose(weights[k], start) for k in masks)  # it was trained
    info = TargetInfo.of(target, tokenizer, str(full_target_dir))
    drafter = load_drafter(folder, info, target_model=target)
    prompt = tokenizer("import os\n", add_special_tokens=False)["input_ids"]
    plain = decode(target, prompt, 12, tokenizer.eos_token_id)
    spec = decode(target, prompt, 12, tokenizer.eos_token_id,
                  proposer=proposer_for(drafter, 0, Sampling()))  # fmt: skip
    assert spec.tokens == plain.tokens


# --- end to end through train/drafter.py ---------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_target_dir, tiny):
    root = tmp_path_factory.mktemp("block_data")
    overrides = ["distill.max_new_tokens=12", "distill.shard_size=6"]
    return build_tiny_dataset(root, tiny_target_dir, tiny, PROMPTS, *overrides)


def _argv(recipe, tiny_target_dir, data_dir, out, *extra):
    return [
        f"recipe={recipe}", f"target={tiny_target_dir}", f"distill.out={data_dir}",
        f"output_dir={out}", "train.device=cpu", "train.steps=6", "train.batch_size=4",
        "train.warmup_steps=2", "train.save_every=2", "train.log_every=1",
        "drafter.num_layers=1", "drafter.block_size=4", "drafter.num_anchors=4", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [("dflash", ()), ("deer", ("drafter.context_layers=1", "drafter.stage2_step=4"))],
)
def test_tiny_run_resumes_exactly(tmp_path, tiny, tiny_target_dir, data_dir, recipe, extra,
                                  monkeypatch):  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert entry.main(_argv(recipe, tiny_target_dir, data_dir, straight, *extra)) == 0
    _fail_on_call(monkeypatch, 3, _crash)  # dies in step 3, after the step-2 checkpoint
    with pytest.raises(Crash):
        entry.main(_argv(recipe, tiny_target_dir, data_dir, resumed, *extra))
    monkeypatch.undo()
    assert entry.main(_argv(recipe, tiny_target_dir, data_dir, resumed, *extra)) == 0
    torch.testing.assert_close(_weights(resumed), _weights(straight))
    assert _losses(resumed) == pytest.approx(_losses(straight), rel=1e-6)
    records = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert {"acc@1", "acc@3", "heldout_tau", "heldout_acc@1"} <= set(records[-1])
    assert not {"eal", "tau"} & set(records[-1])  # the biased figures are gone
    if recipe == "deer":  # stage I for steps 1-4, stage II after: the switch was resumed across
        assert [r["stage"] for r in records] == pytest.approx([1, 1, 1, 1, 2, 2])
    # the saved folder holds no target weights; loading re-attaches the target's modules
    target, tokenizer = tiny
    names = set(_weights(straight))
    assert not any("embed" in n or "lm_head" in n for n in names) or recipe == "deer"
    info = TargetInfo.of(target, tokenizer, str(tiny_target_dir))
    drafter = load_drafter(straight / "drafter", info, target_model=target)
    prompt = tokenizer("import os\n", add_special_tokens=False)["input_ids"]
    plain = decode(target, prompt, 12, tokenizer.eos_token_id)
    spec = decode(target, prompt, 12, tokenizer.eos_token_id,
                  proposer=proposer_for(drafter, 0, Sampling()))  # fmt: skip
    assert spec.tokens == plain.tokens


@pytest.mark.slow
def test_trained_dflash_is_lossless_on_100_bundled_prompts(tmp_path):
    """The embedded target: a small dflash trained through train/drafter.py, then infer.eval on
    100 held-out prompts gives exactly plain greedy decoding's tokens, with drafts accepted."""
    from infer.eval import evaluate
    from recipes import load_options
    from recipes.schema import EvalConfig

    out = tmp_path / "dflash"
    argv = ["recipe=dflash", f"output_dir={out}", "prompts.limit=64", "distill.max_new_tokens=64",
            "train.steps=60", "train.save_every=60", "drafter.block_size=8"]  # fmt: skip
    assert entry.main(argv) == 0
    options = load_options(EvalConfig, ["limit=100", "max_new_tokens=24", "card=false"])
    overall = evaluate(str(out / "drafter"), options)["overall"]
    assert overall["lossless"]["checked"] == 100
    assert overall["lossless"]["identical"] == 100, overall["lossless"]
    assert overall["tau"] > 1.0  # drafts were really accepted
