"""Windowed drafters (attention sinks + the last W positions, ``models/window.py``): inference
logits equal the training forward's under the same window and sinks, the draft KV cache stays
one size as the context grows, anchor-offset indices keep the sinks, and decoding stays
lossless."""

from __future__ import annotations

import torch

from infer.decode import decode
from infer.proposers import proposer_for
from infer.proposers.draft_lm import DraftLMProposer
from models.dflash import BlockContext
from models.draft_lm import DraftLM
from models.drafter import Batch, TargetInfo
from models.sampling import Sampling
from models.window import Window
from recipes import load_config
from tests.test_dflash import _drafter, _gen, data_dir  # noqa: F401  (module fixture)
from tests.test_train_drafter import PROMPTS
from train.batches import teacher_signals

W, S = 5, 2


def test_window_keeps_the_sinks_and_the_last_entries():
    window = Window(W, S)
    k = torch.arange(12.0).view(1, 1, 12, 1)
    trimmed = window.trim([(k, -k)])
    assert trimmed[0][0].flatten().tolist() == [0, 1, 7, 8, 9, 10, 11]
    assert trimmed[0][1].flatten().tolist() == [0, -1, -7, -8, -9, -10, -11]
    assert window.trim([(k, k)], slack=3)[0][0].shape[2] == S + W + 3
    keys = torch.arange(12)
    assert window.visible(keys, torch.tensor(10)).tolist() == [
        True, True, False, False, False, True, True, True, True, True, True, True,
    ]  # fmt: skip
    assert Window().visible(keys, torch.tensor(3)).all()  # no window: everything
    torch.manual_seed(0)
    offsets = window.offsets(64, 20, 100)
    assert int(offsets.min()) >= 0 and int(offsets.max()) <= 80 and len(set(offsets.tolist())) > 8
    shifted = window.shift(torch.arange(6).expand(2, 6), torch.tensor([10, 0]))
    assert shifted.tolist() == [[0, 1, 12, 13, 14, 15], [0, 1, 2, 3, 4, 5]]
    assert not Window().offsets(4, 20, 100).any()


def _windowed_dflash(tiny):
    return _drafter(tiny, f"drafter.attention_window={W}", f"drafter.attention_sinks={S}")


def _block_batch(tiny, drafter, seq: int = 30):
    target, _ = tiny
    ids = torch.randint(3, target.config.vocab_size, (2, seq), generator=_gen(1))
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 3 : seq - 1] = 1
    torch.manual_seed(2)
    batch = drafter.prepare_batch(Batch(ids, torch.ones_like(ids), loss_mask))
    return batch, teacher_signals(target, batch, drafter)


def test_windowed_block_drafter_inference_equals_training(tiny):
    drafter = _windowed_dflash(tiny)
    batch, teacher = _block_batch(tiny, drafter)
    assert batch.extra["position_offset"].shape == (2,)  # anchor-offset indices drawn
    batch.extra["position_offset"].zero_()  # inference runs at the true positions
    logits = drafter(batch, teacher)
    features = torch.cat([teacher.hidden_states[i] for i in drafter.target_layers()], -1)
    checked = 0
    for row in range(2):
        for j, anchor in enumerate(batch.anchors[row].tolist()):
            root = int(batch.input_ids[row, anchor])
            state = BlockContext()  # fed in pieces of 3, as the loop does, trimming as it goes
            for cut in range(3, anchor, 3):
                drafter.feed(cut, features[row, state.length : cut], state)
                assert state.kv[0][0].shape[2] == min(cut, S + W)
            draft = drafter.draft_block(root, anchor, features[row, state.length : anchor], state)
            torch.testing.assert_close(draft, logits[row, j, 1:], rtol=0, atol=1e-5)
            checked += anchor > S + W
    assert checked  # some blocks had context outside the window
    # the window is real: the same weights attending to everything draft differently
    full = _drafter(tiny)
    full.load_state_dict(drafter.state_dict())
    anchor = int(batch.anchors[0].max())
    root = int(batch.input_ids[0, anchor])
    everything = full.draft_block(root, anchor, features[0, :anchor], BlockContext())
    assert not torch.allclose(everything, logits[0, int(batch.anchors[0].argmax()), 1:], atol=1e-4)


def test_block_training_positions_are_anchor_offset(tiny):
    drafter = _windowed_dflash(tiny)
    batch, teacher = _block_batch(tiny, drafter)
    offsets = batch.extra["position_offset"]
    limit = drafter.config["lm_config"]["max_position_embeddings"]
    assert (offsets >= 0).all() and (offsets <= limit - 30 - drafter.block_size).all()
    assert offsets.any()
    shifted = drafter(batch, teacher)
    batch.extra["position_offset"] = torch.zeros_like(offsets)
    # RoPE is relative: inside the window nothing changes, but the sinks are now farther away
    assert not torch.allclose(shifted, drafter(batch, teacher), atol=1e-5)


def _windowed_lm(tiny) -> DraftLM:
    target, tokenizer = tiny
    cfg = load_config(["recipe=draft_lm", "drafter.num_layers=1",
                       f"drafter.attention_window={W}", f"drafter.attention_sinks={S}"])  # fmt: skip
    torch.manual_seed(0)
    return DraftLM.from_recipe(cfg.drafter, target, TargetInfo.of(target, tokenizer, "t")).eval()


def test_windowed_draft_lm_inference_equals_training_and_its_cache_stays_one_size(tiny):
    drafter = _windowed_lm(tiny)
    target, _ = tiny
    seq = 40
    ids = torch.randint(3, target.config.vocab_size, (1, seq), generator=_gen(4))
    batch = drafter.prepare_batch(Batch(ids, torch.ones_like(ids), torch.ones_like(ids)))
    assert int(batch.extra["position_offset"][0]) > 0
    batch.extra["position_offset"].zero_()
    with torch.no_grad():
        out = drafter(batch, None)
    training = torch.zeros(seq, out.logits.shape[-1])
    training[out.rows[0]] = out.logits
    proposer = DraftLMProposer(drafter.lm, 3, window=Window.of(drafter.config))
    sizes = []
    # forward in steps of 1-4 tokens with rollbacks of up to num_draft, as the loop does
    for t in [0, 3, 4, 5, 9, 8, 12, 16, 14, 17, 20, 24, 22, 25, 30, 33, 31, 35, 39]:
        draft = proposer._logits_after(ids[0, : t + 1].tolist())
        torch.testing.assert_close(draft, training[t], rtol=0, atol=1e-4)
        sizes.append(proposer.cache.layers[0].keys.shape[2])
    assert max(sizes) <= S + W + 3 and sizes[-1] == S + W + 3
    full = DraftLMProposer(drafter.lm, 3)  # the same weights without the window differ
    assert not torch.allclose(full._logits_after(ids[0].tolist()), training[seq - 1], atol=1e-4)


def test_windowed_drafters_decode_losslessly(tiny):
    target, tokenizer = tiny
    drafters = [_windowed_lm(tiny), _windowed_dflash(tiny)]
    accepted = 0
    for text in [p["prompt"] for p in PROMPTS] * 2:
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        plain = decode(target, prompt, 16, tokenizer.eos_token_id)
        for drafter in drafters:
            spec = decode(target, prompt, 16, tokenizer.eos_token_id,
                          proposer=proposer_for(drafter, 0, Sampling()))  # fmt: skip
            assert spec.tokens == plain.tokens
            accepted += sum(spec.accepted)
    assert accepted > 0


def test_windowed_hydra_plus_plus_prefix_equals_training_and_stays_one_size(tiny):
    from infer.proposers.heads import HeadProposer
    from models.heads import Hydra
    from tests.test_heads import _heads

    target, _ = tiny
    drafter = _heads(tiny, Hydra, "drafter.variant=hydra++", f"drafter.attention_window={W}",
                     f"drafter.attention_sinks={S}")  # fmt: skip
    ids = torch.randint(3, target.config.vocab_size, (1, 30), generator=_gen(5))
    batch = drafter.prepare_batch(Batch(ids, torch.ones_like(ids), torch.ones_like(ids)))
    assert int(batch.extra["position_offset"][0]) > 0  # anchor-offset indices drawn
    hidden = teacher_signals(target, batch, drafter).hidden_states[drafter.config["final_layer"]]
    with torch.no_grad():
        training = drafter.context(hidden)[0]  # true positions, as inference uses
        everything = Hydra(dict(drafter.config, attention_window=0), drafter.target)
        everything.load_state_dict(drafter.state_dict())
        unwindowed = everything.context(hidden)[0]
    proposer = HeadProposer(drafter, 3)
    proposer.begin(target)
    done = 0
    for cut in (4, 9, 10, 17, 24, 30):  # committed in pieces, as the loop hands them over
        proposer.observe(hidden[0, done:cut])
        done = cut
        torch.testing.assert_close(proposer.last, training[cut - 1], rtol=0, atol=1e-5)
        assert proposer.prefix_kv[0][0].shape[2] == min(cut, S + W)
    assert not torch.allclose(training[-1], unwindowed[-1], atol=1e-4)  # the window is real


def test_families_without_windowed_attention_refuse_a_window(
    tiny,
    tiny_target_dir,
    data_dir,  # noqa: F811
    tmp_path,
    capsys,
):  # noqa: F811
    import pytest

    import train.drafter as entry
    from models.heads import Hydra
    from tests.test_dflash import _argv
    from tests.test_heads import _heads

    argv = _argv("medusa", tiny_target_dir, data_dir, tmp_path / "m", "drafter.attention_window=8")
    assert entry.main(argv) != 0
    err = capsys.readouterr().err
    assert "drafter.attention_window=8: drafter type 'medusa' has no windowed attention" in err
    assert "d2sd, deer, dflash, draft_lm, falcon, hydra" in err
    with pytest.raises(ValueError, match="attention_window needs drafter.variant=hydra\\+\\+"):
        _heads(tiny, Hydra, "drafter.attention_window=8")


def test_windowed_falcon_pass_equals_training_and_its_cache_stays_one_size(tiny):
    from infer.proposers.falcon import FalconProposer
    from tests.test_falcon import _falcon

    target, tokenizer = tiny
    drafter = _falcon(tiny, "drafter.csgd_steps=0", f"drafter.attention_window={W}",
                      f"drafter.attention_sinks={S}")  # fmt: skip
    ids = torch.randint(3, target.config.vocab_size, (1, 24), generator=_gen(2))
    batch = drafter.prepare_batch(Batch(ids, torch.ones_like(ids), torch.ones_like(ids)))
    assert "position_offset" in batch.extra
    batch.extra["offset"] = torch.tensor([1])  # blocks [1, 2], [3, 4], ... with k = 2
    batch.extra["position_offset"].zero_()
    teacher = teacher_signals(target, batch, drafter)
    with torch.no_grad():
        trained = drafter(batch, teacher).features[0]
    feats = teacher.hidden_states[drafter.config["final_layer"]][0]
    s = 13  # the block [13, 14] sees the sinks 0, 1 and positions 8 .. 12 before it
    cache = drafter.window.trim(drafter.context_kv(ids[:, 1 : s + 1], feats[None, :s],
                                                   torch.arange(0, s)[None]))  # fmt: skip
    kept = torch.tensor([0, 1, *range(s - W, s)])
    assert cache[0][0].shape[2] == len(kept)
    block = torch.arange(s, s + 2)
    predicted, _, _ = drafter.draft_block(ids[:, s + 1 : s + 3], feats[None, s : s + 2],
                                          block[None], cache, drafter.pass_mask(kept, block))  # fmt: skip
    torch.testing.assert_close(predicted[0], trained[s : s + 2], atol=1e-5, rtol=1e-5)
    everything = _falcon(tiny, "drafter.csgd_steps=0")
    everything.load_state_dict(drafter.state_dict())
    with torch.no_grad():
        assert not torch.allclose(everything(batch, teacher).features[0, s], trained[s], atol=1e-4)

    prompt = tokenizer(PROMPTS[1]["prompt"] * 2, add_special_tokens=False)["input_ids"]
    plain = decode(target, prompt, 16, None)
    proposer = proposer_for(drafter, 0, Sampling())
    assert isinstance(proposer, FalconProposer)
    assert decode(target, prompt, 16, None, proposer=proposer).tokens == plain.tokens
    assert len(prompt) > S + W + 4 and proposer.cache[0][0].shape[2] == len(proposer.kept) == S + W


def test_windowed_d2sd_keeps_both_drafters_windowed_and_decodes_losslessly(tiny):
    from infer.proposers.d2sd import D2SDProposer
    from tests.test_d2sd import _d2sd

    target, tokenizer = tiny
    drafter = _d2sd(tiny, f"drafter.attention_window={W}", f"drafter.attention_sinks={S}").eval()
    assert drafter.first.window == drafter.vp.window == Window(W, S)
    # the VP drafter's training blocks are windowed too (its blocks' context visibility)
    vp_batch, vp_teacher = _block_batch(tiny, drafter.vp)
    vp_batch.extra["position_offset"].zero_()
    with torch.no_grad():
        windowed = drafter.vp(vp_batch, vp_teacher)
    full = _d2sd(tiny).vp.eval()
    full.load_state_dict(drafter.vp.state_dict())
    with torch.no_grad():
        assert not torch.allclose(windowed, full(vp_batch, vp_teacher), atol=1e-4)
    prompt = tokenizer(PROMPTS[1]["prompt"] * 2, add_special_tokens=False)["input_ids"]
    plain = decode(target, prompt, 16, None)
    proposer = proposer_for(drafter, 0, Sampling(), branches=2)
    assert isinstance(proposer, D2SDProposer)
    assert decode(target, prompt, 16, None, proposer=proposer).tokens == plain.tokens
    assert len(prompt) > S + W
    for state in proposer.states:  # both drafters' caches: the sinks and the last W
        assert state.kv[0][0].shape[2] == S + W
