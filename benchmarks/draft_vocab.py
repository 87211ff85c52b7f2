"""A reduced draft vocabulary (FR-Spec style) against the whole one, side by side.

    python -m benchmarks.draft_vocab CKPT [key=value ...]

CKPT is a drafter folder with ``vocab_counts.safetensors`` (written by training, or by
``python -m models.vocab DATASET CKPT``); the options are ``infer.eval``'s (e.g.
``prompts=chat-eval dtype=bfloat16 limit=12 max_new_tokens=48``).

1. The drafter's cost per call, by vocabulary size: one forward of one token over a 200-token
   cache for the draft LM, every head's vocabulary projection for Medusa / Hydra (the median of
   30, after warm-up), on the target's device and dtype.
2. One ``infer.eval`` run: the drafter with its whole vocabulary and with the ``VOCABS`` most
   frequent tokens of its training responses, each at ``NUM_DRAFTS`` draft lengths, against
   plain decoding on the same prompts (order rotated per prompt); τ, speedup and losslessness.
   Its eval.json goes to ``out`` (default ``runs/draft_vocab_eval``).

Writes the ``draft-vocab`` section of ``benchmarks/results/RESULTS.md``.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace

import torch

from benchmarks.results import machine, write_section
from infer.contenders import Entry
from infer.eval import comparison_rows, evaluate_many, write_comparison
from infer.report import comparison_markdown
from infer.verify import crop
from models.drafter import TargetInfo, load_drafter, read_drafter_config, resolve_drafter_folder
from models.target import cache_arg, load_target
from models.vocab import frequent_ids, read_counts, restrict_vocab
from recipes import load_options
from recipes.schema import EvalConfig

VOCABS = (0, 4096, 1024)  # 0: the whole vocabulary
NUM_DRAFTS = (1, 2, 3)


@torch.no_grad()
def draft_call_ms(drafter, target, vocab_ids) -> float:
    """Median ms of one drafting call: the draft LM's one-token step over a 200-token cache, or
    every head's vocabulary projection of a heads drafter on one hidden state."""
    from transformers import DynamicCache

    if vocab_ids is not None:
        restrict_vocab(drafter, vocab_ids)
    device = target.device
    if drafter.drafter_type == "draft_lm":
        cache = DynamicCache(config=drafter.lm.config)
        drafter.lm(input_ids=torch.arange(200, device=device)[None] % 1000 + 100,
                   **cache_arg(drafter.lm, cache), use_cache=True, logits_to_keep=1)  # fmt: skip

        def call():
            drafter.lm(input_ids=torch.tensor([[123]], device=device), **cache_arg(drafter.lm, cache),
                       use_cache=True, logits_to_keep=1)  # fmt: skip
            crop(cache, 200)
    else:
        hidden = torch.randn(1, 1, drafter.target.hidden_size, device=device, dtype=target.dtype)

        def call():
            for head in getattr(drafter, "lm_heads", []):
                head(hidden)

    times = []
    for i in range(40):
        start = time.perf_counter()
        call()
        if i >= 10:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    ckpt, overrides = argv[0], argv[1:]
    options = load_options(EvalConfig, ["card=false", "out=runs/draft_vocab_eval", *overrides])
    folder = resolve_drafter_folder(ckpt)
    counts = read_counts(folder)
    meta = read_drafter_config(folder)
    name = options.target or meta["target"]["id"]
    target, tokenizer = load_target(name, options.dtype.value, options.device)
    info = TargetInfo.of(target, tokenizer, name)
    costs = []
    for vocab in VOCABS:
        drafter = load_drafter(folder, info).to(target.device, target.dtype)
        ids = frequent_ids(counts, vocab) if vocab else None
        costs.append((vocab, draft_call_ms(drafter, target, ids)))
        print(f"vocab {vocab or 'whole'}: {costs[-1][1]:.2f} ms a drafting call", flush=True)
        del drafter
    del target

    entries = [
        Entry(
            ckpt,
            f"{v or 'whole'} vocab, num_draft={n}",
            [f"num_draft={n}", f"draft_vocab={v}", "tuned=false"],
        )  # fmt: skip
        for v in VOCABS
        for n in NUM_DRAFTS
    ]
    entries.append(Entry("prompt-lookup", "prompt lookup (defaults)"))
    run = evaluate_many(entries, replace(options, tuned=False))
    write_comparison(run, entries, options)
    total = int(counts.sum())
    coverage = []
    for vocab in VOCABS[1:]:
        share = int(counts[frequent_ids(counts, vocab)].sum()) / total
        coverage.append(f"{vocab}: {100 * share:.1f}%")
    whole = costs[0][1]
    lines = [
        f"## Reduced draft vocabulary (`python -m benchmarks.draft_vocab {' '.join(argv)}`)",
        "",
        f"Machine: {machine()}. Drafter `{ckpt}` ({meta['drafter_type']}), target "
        f"`{run['drafters'][0]['settings']['target']}` in {options.dtype.value}. The subsets are "
        "the most frequent tokens of the drafter's training responses; their share of those "
        f"responses' tokens: {', '.join(coverage)}.",
        "",
        "| draft vocabulary | ms a drafting call | against the whole |",
        "| --- | --- | --- |",
        *[f"| {v or 'whole'} | {ms:.2f} | {ms / whole:.2f}x |" for v, ms in costs],
        "",
        comparison_markdown({**run, "comparison": comparison_rows(run)}).split("\n", 2)[2],
    ]
    text = "\n".join(lines)
    print(text)
    write_section("draft-vocab", text)


if __name__ == "__main__":
    main(sys.argv[1:])
