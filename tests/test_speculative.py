"""The speculative loop: stub proposers (accept all / none / some), trees, KV rollback, losslessness
of greedy decoding and of speculative sampling (statistical, with a negative control)."""

from __future__ import annotations

import pytest
import torch

from infer.accept import accept_sampling
from infer.decode import decode
from infer.proposers import StaticTree
from infer.proposers.prompt_lookup import PromptLookup
from infer.tree import DraftTree
from infer.verify import keep_accepted, verify_tree
from models.sampling import Sampling
from models.target import cache_arg, load_target

PROMPT = [5, 17, 42, 8, 99, 3, 17, 42]


class Oracle:
    """Proposes the true greedy continuation for the first ``right`` tokens, then wrong ones."""

    def __init__(self, truth: list[int], prompt_len: int, num_draft: int, right: int, vocab: int):
        self.truth, self.prompt_len = truth, prompt_len
        self.num_draft, self.right, self.vocab = num_draft, right, vocab

    def chain(self, context):
        done = len(context) - self.prompt_len
        true = self.truth[done : done + self.num_draft]
        return [t if i < self.right else (t + 1) % self.vocab for i, t in enumerate(true)]

    def propose(self, context):
        return DraftTree.chain(self.chain(context))


class WrongFirstBranch(Oracle):
    """A tree whose first branch is wrong at depth 1; the right chain is the second branch."""

    def propose(self, context):
        right = self.chain(context)
        if not right:
            return DraftTree.empty()
        wrong = [(right[0] + 1) % self.vocab, *right[1:]]
        return DraftTree.trie([wrong, right])


@pytest.mark.parametrize(("right", "expected_accepted"), [(4, 4), (0, 0), (2, 2)])
def test_stub_proposers_accept_all_none_some(tiny, right, expected_accepted):
    target, _ = tiny
    plain = decode(target, PROMPT, 24, eos_id=None)
    assert plain.accepted == [0] * 24 and plain.tau == 1.0
    oracle = Oracle(plain.tokens, len(PROMPT), 4, right, target.config.vocab_size)
    spec = decode(target, PROMPT, 24, eos_id=None, proposer=oracle)
    assert spec.tokens == plain.tokens  # lossless whatever the drafts
    # every full cycle accepts exactly `right` drafts (the last cycle may be cut by the budget)
    assert set(spec.accepted[:-1]) == {expected_accepted}
    assert spec.cycles == -(-24 // (expected_accepted + 1))


def test_a_tree_accepts_through_its_second_branch(tiny):
    target, _ = tiny
    plain = decode(target, PROMPT, 20, eos_id=None)
    proposer = WrongFirstBranch(plain.tokens, len(PROMPT), 4, 4, target.config.vocab_size)
    spec = decode(target, PROMPT, 20, eos_id=None, proposer=proposer)
    assert spec.tokens == plain.tokens
    assert set(spec.accepted[:-1]) == {4}


def test_rollback_leaves_the_cache_of_a_fresh_prefill(tiny):
    """Verify a tree, keep only a non-first branch: the KV cache equals a fresh prefill."""
    from transformers import DynamicCache

    target, _ = tiny
    cache = DynamicCache(config=target.config)
    target(input_ids=torch.tensor([PROMPT[:-1]]), **cache_arg(target, cache))
    tree = DraftTree.trie([[7, 8, 9], [7, 10], [11, 12, 13, 14]])  # nodes 0..7
    verify_tree(target, cache, len(PROMPT) - 1, PROMPT[-1], tree)
    path = [4, 5, 6]  # 11 -> 12 -> 13: the third branch, three deep
    assert [int(tree.tokens[i]) for i in path] == [11, 12, 13]
    keep_accepted(cache, len(PROMPT) - 1, path)
    fresh = DynamicCache(config=target.config)
    target(input_ids=torch.tensor([PROMPT + [11, 12, 13]]), **cache_arg(target, fresh))
    for kept, ref in zip(cache.layers, fresh.layers, strict=True):
        torch.testing.assert_close(kept.keys, ref.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kept.values, ref.values, atol=1e-5, rtol=1e-5)


def test_eos_and_budget_are_exact(tiny):
    target, _ = tiny
    plain = decode(target, PROMPT, 30, eos_id=None)
    eos = plain.tokens[9]  # pretend the 10th token is EOS
    first = plain.tokens.index(eos)
    oracle = Oracle(plain.tokens, len(PROMPT), 6, 6, target.config.vocab_size)
    spec = decode(target, PROMPT, 30, eos_id=eos, proposer=oracle)
    assert spec.tokens == plain.tokens[: first + 1]
    for budget in (1, 5, 7):
        assert decode(target, PROMPT, budget, None, proposer=oracle).tokens == plain.tokens[:budget]


def test_prompt_lookup_finds_earlier_ngrams():
    lookup = PromptLookup(num_draft=3, max_ngram=2)
    assert lookup.propose([1, 2, 3, 4, 9, 1, 2]).tokens.tolist() == [3, 4, 9]
    assert lookup.propose([5, 6, 7]).tokens.tolist() == []
    tree = StaticTree(lookup, 2).propose([1, 2, 3, 8, 1, 2, 5, 1, 2])  # two earlier "1 2"s
    assert tree.tokens.tolist() == [5, 1, 2, 3, 8, 1]  # the latest match first
    assert tree.parents.tolist() == [-1, 0, 1, -1, 3, 4]


def test_bad_settings_are_refused(tiny):
    target, _ = tiny
    with pytest.raises(ValueError, match="temperature=-1"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p=1.5: must be in \(0, 1\]"):
        Sampling(temperature=1, top_p=1.5)
    with pytest.raises(ValueError, match="top_k=-2"):
        Sampling(temperature=1, top_k=-2)
    limit = target.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the target's limit of {limit}"):
        decode(target, [1] * limit, 8, None)


# --- speculative sampling preserves the target distribution --------------------------------

V = 5
TARGET_TABLE = torch.softmax(
    torch.randn(V, V, generator=torch.Generator().manual_seed(1)) * 1.5, -1
)
DRAFT_TABLE = torch.softmax(torch.randn(V, V, generator=torch.Generator().manual_seed(2)) * 1.5, -1)


def _two_token_samples(n: int, mode: str, seed: int = 0) -> torch.Tensor:
    """Empirical joint distribution (V, V) of the first two emitted tokens after root 0, for a
    Markov target TARGET_TABLE with drafts from DRAFT_TABLE."""
    gen = torch.Generator().manual_seed(seed)
    sampling = Sampling(temperature=1.0)
    counts = torch.zeros(V, V)
    for _ in range(n):
        if mode == "tree":  # two i.i.d. children of the root, each with one sampled child
            firsts = torch.multinomial(DRAFT_TABLE[0], 2, replacement=True, generator=gen).tolist()
            seconds = [int(torch.multinomial(DRAFT_TABLE[f], 1, generator=gen)) for f in firsts]
            tree = DraftTree(
                torch.tensor([firsts[0], seconds[0], firsts[1], seconds[1]]),
                torch.tensor([-1, 0, -1, 2]),
                torch.stack(
                    [DRAFT_TABLE[0], DRAFT_TABLE[firsts[0]], DRAFT_TABLE[0], DRAFT_TABLE[firsts[1]]]
                ),
            )
        else:  # a chain of two sampled drafts
            first = int(torch.multinomial(DRAFT_TABLE[0], 1, generator=gen))
            second = int(torch.multinomial(DRAFT_TABLE[first], 1, generator=gen))
            tree = DraftTree.chain(
                [first, second], torch.stack([DRAFT_TABLE[0], DRAFT_TABLE[first]])
            )
        rows = [0, *tree.tokens.tolist()]  # the target distribution after each position
        logits = TARGET_TABLE[rows].log()
        if mode == "broken":  # negative control: accept every draft, no rejection
            path, bonus = [0, 1], int(torch.multinomial(TARGET_TABLE[rows[2]], 1, generator=gen))
        else:
            path, bonus = accept_sampling(tree, logits, sampling, gen)
        emitted = [int(tree.tokens[i]) for i in path] + [bonus]
        if len(emitted) < 2:  # only one token this cycle: draw the next from the target
            emitted.append(int(torch.multinomial(TARGET_TABLE[emitted[0]], 1, generator=gen)))
        counts[emitted[0], emitted[1]] += 1
    return counts / n


EXACT = TARGET_TABLE[0][:, None] * TARGET_TABLE  # p(x1 | 0) p(x2 | x1)


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_speculative_sampling_preserves_the_target_distribution(mode):
    empirical = _two_token_samples(60_000, mode)
    tv = 0.5 * (empirical - EXACT).abs().sum().item()
    assert tv < 0.015, tv  # sampling noise at this n is about 0.007


def test_negative_control_fails_the_same_bound():
    empirical = _two_token_samples(60_000, "broken")
    tv = 0.5 * (empirical - EXACT).abs().sum().item()
    assert tv > 0.05, tv  # accepting drafts blindly follows the draft, not the target


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_kernel_attention_path_equals_the_dense_mask(tiny, backend, monkeypatch):
    """Trees verified through the kernels (reference or Triton, forced) give the dense path's
    logits and the same decoded tokens. Triton needs head_dim >= 16: the embedded target, on
    CUDA where there is a GPU (Triton's own kernels), else on the CPU under TRITON_INTERPRET=1
    (which conftest sets only without CUDA; without it kernels.attention refuses Triton on CPU
    tensors, so a CPU target on a CUDA host would fail)."""
    from transformers import DynamicCache

    if backend == "reference":
        target = tiny[0]
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        target = load_target("stdlib-llama", "float32", device)[0]
    monkeypatch.setenv("DRAFTKIT_ATTENTION", backend)
    tree = DraftTree.trie([[7, 8, 9], [7, 10], [11, 12]])
    logits = {}
    for attention in ("dense", "kernel"):
        cache = DynamicCache(config=target.config)
        prefix = torch.tensor([PROMPT[:-1]], device=target.device)
        target(input_ids=prefix, **cache_arg(target, cache))
        logits[attention] = verify_tree(target, cache, len(PROMPT) - 1, PROMPT[-1], tree, attention)
    torch.testing.assert_close(logits["kernel"], logits["dense"], atol=1e-4, rtol=1e-4)
    plain = decode(target, PROMPT, 8, None)
    lookup = StaticTree(PromptLookup(num_draft=3, max_ngram=2), 2)
    assert (
        decode(target, PROMPT, 8, None, proposer=lookup, attention="kernel").tokens == plain.tokens
    )
    target.set_attn_implementation("sdpa")  # leave the shared fixture as it was
