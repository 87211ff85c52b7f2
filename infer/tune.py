"""Drafting settings tuned to this device: ``python -m infer.eval CKPT tune=true``.

1. **Costs** (``measure_costs``): the target's time to verify the root plus n nodes, for n over
   0..64, and the loop's own work per cycle, timed on this device (``infer/costs.py``).
2. **Acceptance** (``replay``): the held-out tuning prompts (the prompt set's last
   ``tune_prompts``, round-robin over categories, so not the first ones ``limit`` evaluates) are
   decoded plainly once at T = 0. Because greedy speculative decoding emits exactly those
   tokens, every candidate setting can then be replayed without the target: each cycle the
   proposer drafts from the true context (and the target features of one forward over the
   whole sequence), its tree is matched against the greedy continuation, and the accepted
   length advances the root just as verification would. τ is thus exact for that setting on
   those prompts, the drafter's time is timed for real, and only verification and the loop's
   work come from the cost model.
3. **Choice** (``costs.best``): the candidate with the most predicted tokens/s per token of plain
   decoding. The grid per family (``grid``) covers the block length (``num_draft``), D²SD's K
   and branch depth (B₂ - 1), best-first tree budgets with and without the per-cycle cost cut,
   head tree sizes and Falcon's passes and width; the drafter's defaults are always a candidate.
   Drafters with a vocabulary projection of their own and the token counts of their training
   data (``models/vocab.py``) also replay every candidate with reduced draft vocabularies
   (``draft_vocab``, ``VOCAB_SIZES``): fewer rows to score per drafted token, drafts only from
   the subset.

The choice, the cost curve, every candidate's figures and the device go into the drafter folder's
``tuned.json``; ``infer.eval`` then uses those settings unless told otherwise, and records the
measured speedup beside the predicted one.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from infer.costs import CostModel, Replay, best, device_name, measure_costs
from infer.decode import _clock, decode
from infer.proposers import proposer_for
from infer.proposers.prompt_lookup import PromptLookup
from infer.tree import DraftTree
from infer.verify import TargetFeatures
from models.sampling import Sampling
from models.target import cache_arg


def grid(drafter) -> list[dict]:
    """Candidate settings of a drafter's family (None: prompt lookup); {} = its defaults."""
    family = drafter.drafter_type if drafter is not None else "prompt_lookup"
    if family == "prompt_lookup":
        return [{}] + [{"num_draft": n} for n in (1, 2, 3, 4, 6, 12, 16)]
    if family == "draft_lm":
        return [{}] + [{"num_draft": n} for n in (1, 2, 3, 5, 6, 8)]
    if family in ("dflash", "deer"):
        m = drafter.block_size - 1
        chains = [{"num_draft": n} for n in sorted({1, 2, 3, 4, 6, m}) if n <= m]
        trees = [{"num_draft": m, "tree_budget": b} for b in (4, 8, 16, 32, 64)]
        return [{}, *chains, *trees, {"num_draft": m, "tree_budget": 64, "cost_cut": True}]
    if family == "d2sd":
        m, vp = drafter.first.block_size - 1, drafter.vp.block_size - 1
        out = [{}]
        for n in sorted({2, 4, m}):
            if n > m:
                continue
            out.append({"num_draft": n, "branches": 0})
            for k in (1, 2, 4):
                for depth in sorted({n, max(n, vp)}):
                    out.append({"num_draft": n, "branches": k, "branch_depth": depth})
        return out
    if family == "eagle3":
        chains = [{"num_draft": n} for n in (1, 2, 3, 4, 6, 8)]
        trees = [{"num_draft": d, "tree_budget": b, "tree_topk": k}
                 for d in (4, 6) for b in (8, 16, 32) for k in (2, 4)]  # fmt: skip
        return [{}, *chains, *trees]
    if family in ("medusa", "hydra", "hidden_transfer"):
        return [{}] + [{"tree_nodes": n} for n in (1, 2, 4, 8, 16, 32, 64)]
    if family == "falcon":
        k = drafter.k
        return [{}] + [
            {"num_draft": p * k, "falcon_width": w} for p in (1, 2, 3, 4) for w in (1, 2, 3)
        ]
    return [{}]


VOCAB_SIZES = (1024, 4096)  # draft_vocab candidates (the most frequent training-response tokens)


def vocab_variants(drafter, counts) -> dict:
    """``{draft_vocab: drafter}``: the drafter itself (0) and, when it scores drafts with a
    vocabulary projection of its own and ``counts`` are known, a copy restricted to each of
    ``VOCAB_SIZES`` smaller than its vocabulary."""
    import copy

    from models.vocab import frequent_ids, restrict_vocab

    variants = {0: drafter}
    if drafter is None or counts is None:
        return variants
    for n in VOCAB_SIZES:
        if n >= counts.numel():
            continue
        variant = copy.deepcopy(drafter)
        try:
            restrict_vocab(variant, frequent_ids(counts, n))
        except ValueError:  # drafts through the target's LM head: nothing to restrict
            return variants
        variants[n] = variant
    return variants


def _proposer(drafter, settings: dict, costs: CostModel):
    settings = dict(settings)
    num_draft = settings.pop("num_draft", 0)
    if drafter is None:
        return PromptLookup(num_draft or 8)
    return proposer_for(drafter, num_draft, Sampling(), None, costs, **settings)


def _accepted(tree: DraftTree, continuation: list[int]) -> int:
    """Longest path from the root whose tokens equal ``continuation`` (what greedy
    verification accepts when the target's argmax is that continuation)."""
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(tree.parents.tolist()):
        children.setdefault(parent, []).append(i)
    tokens, node, length = tree.tokens.tolist(), -1, 0
    while length < len(continuation):
        node = next((c for c in children.get(node, []) if tokens[c] == continuation[length]), None)
        if node is None:
            break
        length += 1
    return length


@torch.no_grad()
def replay(target, drafter, settings: dict, sequences: list, costs: CostModel) -> Replay:
    """Greedy speculative decoding of every (prompt, greedy tokens, features, target cache or
    None) in ``sequences`` with ``settings``, verification replaced by matching against the
    greedy tokens."""
    nodes, accepted, draft_s, tokens = [], [], 0.0, 0
    for prompt, greedy, features, cache in sequences:
        proposer = _proposer(drafter, settings, costs)
        full = prompt + greedy
        if features is not None:
            proposer.begin(target)
            if len(prompt) > 1:
                proposer.observe(features[: len(prompt) - 1])
        if cache is not None:  # the whole sequence's; the proposer reads the committed entries
            proposer.attach_cache(cache)
        p, emitted = len(prompt) - 1, 0  # p: the root's position
        while emitted < len(greedy):
            start = _clock(target.device)
            tree = proposer.propose(full[: p + 1])
            draft_s += _clock(target.device) - start
            a = _accepted(tree, full[p + 1 : len(full)])
            nodes.append(len(tree))
            accepted.append(a)
            if features is not None:
                start = _clock(target.device)
                proposer.observe(features[p : p + 1 + a])
                draft_s += _clock(target.device) - start
            emitted += a + 1
            p += a + 1
        tokens += len(greedy)
    return Replay(dict(settings), tokens, nodes, accepted, draft_s)


def tuning_prompts(prompts: list, n: int) -> list:
    """The last ``n`` prompts of the set, round-robin over categories (``spread`` reversed)."""
    from infer.contenders import spread

    return spread(list(reversed(prompts)), n)


@torch.no_grad()
def tune_drafter(target, tokenizer, drafter, options, progress: bool = True, counts=None) -> dict:
    """Measure, replay every candidate of ``grid(drafter)`` (each also with the reduced draft
    vocabularies ``counts`` allow) and choose; returns the record ``tuned.json`` holds."""
    from transformers import DynamicCache

    from data.prompts import encode_prompt, load_prompts

    prompts = tuning_prompts(load_prompts(options.prompts), options.tune_prompts)
    probe = _proposer(drafter, {}, None)
    layers = list(getattr(probe, "target_layers", None) or [])
    sequences = []
    for p in prompts:
        ids = encode_prompt(tokenizer, p)
        greedy = decode(target, ids, options.max_new_tokens, tokenizer.eos_token_id).tokens
        features, cache = None, None
        if layers:
            taps = TargetFeatures(target, layers)
            if hasattr(probe, "attach_cache"):  # drafts read the target's KV cache
                cache = DynamicCache(config=target.config)
            with taps:
                full = torch.tensor([ids + greedy], device=target.device)
                target(input_ids=full, **cache_arg(target, cache), use_cache=cache is not None,
                       logits_to_keep=1)  # fmt: skip
            features = taps.take()
        sequences.append((ids, greedy, features, cache))
    # verification timed at the mean context of a cycle on these prompts
    costs = measure_costs(
        target, int(statistics.fmean(len(s[0]) + len(s[1]) / 2 for s in sequences))
    )
    variants = vocab_variants(drafter, counts)
    candidates = [
        {**c, **({"draft_vocab": v} if v else {})} for v in variants for c in grid(drafter)
    ]
    replays = []
    bar = tqdm(candidates, desc="tune", disable=not progress)
    for settings in bar:
        family = {k: v for k, v in settings.items() if k != "draft_vocab"}
        variant = variants[settings.get("draft_vocab", 0)]
        replays.append(replay(target, variant, family, sequences, costs))
        replays[-1].settings = dict(settings)
        bar.set_postfix(tau=f"{replays[-1].tau:.2f}")
    chosen = best(replays, costs)
    default = replays[0]

    def row(r: Replay) -> dict:
        return {"settings": r.settings, "tau": r.tau, "draft_ms_per_cycle":
                1000 * r.draft_s / max(1, r.cycles), "mean_nodes": statistics.fmean(r.nodes),
                "predicted_speedup": r.predicted_speedup(costs)}  # fmt: skip

    return {
        "settings": chosen.settings,
        "device": device_name(target),
        "predicted": row(chosen),
        "defaults": row(default),
        "candidates": [row(r) for r in replays],
        "costs": costs.to_json(),
        "prompts": {
            "set": options.prompts,
            "n": len(prompts),
            "max_new_tokens": options.max_new_tokens,
        },  # fmt: skip
        "tuned_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def tune(ckpt: str, options, explicit=()) -> dict:
    """Tune ``ckpt`` on this device; a drafter folder gets ``tuned.json``. Returns the record."""
    from infer.contenders import Entry, load_contenders
    from models.drafter import COUNTS_NAME, TUNED_NAME, resolve_drafter_folder
    from models.vocab import read_counts

    # the whole vocabulary is tuned from; a draft_vocab already chosen is a candidate again
    options = replace(options, draft_vocab=0, tuned=False)
    target, tokenizer, _, (contender,) = load_contenders([Entry(ckpt)], options, explicit)
    counts = None
    if ckpt != "prompt-lookup":
        folder = resolve_drafter_folder(ckpt)
        counts = read_counts(folder) if (folder / COUNTS_NAME).is_file() else None
    started = time.perf_counter()
    record = tune_drafter(target, tokenizer, contender.drafter, options, counts=counts)
    print(tuning_markdown(record, ckpt))
    print(f"tuned in {time.perf_counter() - started:.0f}s", flush=True)
    if ckpt != "prompt-lookup" and Path(ckpt).is_dir():
        (Path(ckpt) / TUNED_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return record


def record_measured(result: dict) -> None:
    """After a tuned drafter's evaluation: its measured speedup beside the predicted one in
    ``tuned.json`` (printed too)."""
    from models.drafter import TUNED_NAME

    meta = result["settings"]
    path = Path(meta["drafter"]) / TUNED_NAME
    if not meta.get("tuned_on") or not path.is_file():
        return
    record = json.loads(path.read_text())
    overall = result["overall"]
    record["measured"] = {
        "speedup": overall["speedup"], "speedup_ratio_mean": overall["speedup_ratio_mean"],
        "tau": overall["tau"], "n_prompts": meta["n_prompts"], "prompts": meta["prompts"],
        "max_new_tokens": meta["max_new_tokens"], "temperature": meta["temperature"],
        "device": meta["device"],
    }  # fmt: skip
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"{meta['label']}: predicted speedup {record['predicted']['predicted_speedup']:.2f}x "
        f"(tau {record['predicted']['tau']:.2f}), measured {overall['speedup']:.2f}x "
        f"(tau {overall['tau']:.2f})",
        flush=True,
    )


def verify_ms(costs: dict) -> str:
    """A saved cost curve (``CostModel.to_json``) as "size: ms" pairs."""
    pairs = zip(costs["sizes"], costs["verify_s"], strict=True)
    return ", ".join(f"{n}: {1000 * s:.1f}" for n, s in pairs)


def tuning_markdown(record: dict, ckpt: str) -> str:
    costs = record["costs"]
    verify = verify_ms(costs)
    lines = [
        f"Tuning `{ckpt}` on {record['device']} ({record['prompts']['n']} held-out prompts, "
        f"{record['prompts']['max_new_tokens']} tokens, T = 0 replay).",
        "",
        f"Verification ms by tree size: {verify}; loop work {1000 * costs['other_s']:.1f} ms "
        "per cycle.",
        "",
        "| settings | τ | draft ms / cycle | nodes / cycle | predicted speedup |",
        "| --- | --- | --- | --- | --- |",
    ]
    chosen = record["settings"]
    for r in sorted(record["candidates"], key=lambda r: -r["predicted_speedup"]):
        name = " ".join(f"{k}={v}" for k, v in r["settings"].items()) or "(defaults)"
        mark = " **chosen**" if r["settings"] == chosen else ""
        lines.append(
            f"| {name}{mark} | {r['tau']:.2f} | {r['draft_ms_per_cycle']:.1f} | "
            f"{r['mean_nodes']:.1f} | {r['predicted_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"
