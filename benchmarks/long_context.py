"""Long contexts: draft cost per cycle, τ and speedup against the prompt's length, for drafters
attending to the whole context and the same families windowed (``models/window.py``).

    python -m benchmarks.long_context [N_PROMPTS] [MAX_NEW_TOKENS] [LENGTH ...]

On the embedded target (1,024 positions), each of the first ``N_PROMPTS`` ``stdlib-long``
prompts (whole held-out modules) is cut to its first LENGTH tokens (default 128 256 512 960),
and decoded greedily for ``MAX_NEW_TOKENS`` tokens plainly and with every drafter, in an order
rotated per prompt. Drafters are the families benchmark's full-attention draft LM and DFlash
(B = 8) and the same recipes trained with ``drafter.attention_window=64
drafter.attention_sinks=4`` on the same data (trained here when their folder holds no drafter),
all with their default settings. Speedup is Spec-Bench's (mean tokens/s over plain decoding's
mean tokens/s at the same length); draft time is the proposer's, ``observe`` included.

Writes the ``long-context`` section of ``benchmarks/results/RESULTS.md`` and
``long_context_draft_cost.png``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from benchmarks.families import ensure_trained
from benchmarks.results import RESULTS_DIR, machine, write_section
from data.prompts import load_prompts
from infer.decode import decode
from infer.proposers import proposer_for
from models.drafter import TargetInfo, load_drafter
from models.sampling import Sampling
from models.target import load_target

TARGET = "stdlib-llama"
TRAIN = "python train/drafter.py distill.out=runs/bench_data final_eval.limit=0"
WINDOW = "drafter.attention_window=64 drafter.attention_sinks=4"
DRAFTERS = [  # label, folder, recipe (the full-attention ones are the families benchmark's)
    ("draft LM, full", "runs/draft_lm_small", "recipe=draft_lm"),
    ("draft LM, window 64 + 4 sinks", "runs/draft_lm_window", f"recipe=draft_lm {WINDOW}"),
    ("dflash B=8, full", "runs/dflash_b8", "recipe=dflash drafter.block_size=8"),
    ("dflash B=8, window 64 + 4 sinks", "runs/dflash_window",
     f"recipe=dflash drafter.block_size=8 {WINDOW}"),
]  # fmt: skip


def measure(target, tokenizer, drafters, prompts, lengths, max_new) -> dict:
    """{length: {label: per-prompt results}} with plain decoding under ``"plain"``."""
    labels = ["plain", *(label for label, _ in drafters)]
    out = {n: {label: [] for label in labels} for n in lengths}
    for n in lengths:
        for i, text in enumerate(prompts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n]
            order = labels[i % len(labels) :] + labels[: i % len(labels)]
            for label in order:
                drafter = dict(drafters).get(label)
                proposer = None if drafter is None else proposer_for(drafter, 0, Sampling())
                result = decode(target, ids, max_new, None, proposer=proposer)
                out[n][label].append(result)
            reference = out[n]["plain"][-1].tokens
            for label in labels[1:]:
                if out[n][label][-1].tokens != reference:
                    raise AssertionError(f"{label} at {n} tokens differs from plain decoding")
        print(f"context {n}: done", flush=True)
    return out


def summarise(results: list) -> dict:
    decode_s = [r.total_s - r.prefill_s for r in results]
    tokens = [len(r.tokens) for r in results]
    cycles = sum(r.cycles for r in results)
    return {
        "tau": sum(tokens) / max(1, cycles),
        "tok_s": statistics.fmean(t / s for t, s in zip(tokens, decode_s, strict=True)),
        "draft_ms": 1000 * sum(r.draft_s for r in results) / max(1, cycles),
        "verify_ms": 1000 * sum(r.verify_s for r in results) / max(1, cycles),
    }


def plot(table: dict, lengths: list, labels: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cost, tau) = plt.subplots(1, 2, figsize=(10, 4))
    for label in labels:
        style = "-" if "window" in label else "--"
        cost.plot(lengths, [table[n][label]["draft_ms"] for n in lengths], style, marker="o",
                  label=label)  # fmt: skip
        tau.plot(lengths, [table[n][label]["tau"] for n in lengths], style, marker="o", label=label)
    cost.set(xlabel="context tokens", ylabel="draft ms per cycle", title="draft cost")
    tau.set(xlabel="context tokens", ylabel="τ (tokens per target forward)", title="τ")
    cost.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    n_prompts = int(argv[0]) if argv else 8
    max_new = int(argv[1]) if len(argv) > 1 else 48
    lengths = [int(a) for a in argv[2:]] or [128, 256, 512, 960]
    folders = [(label, ensure_trained(TRAIN, folder, recipe)) for label, folder, recipe in DRAFTERS]
    target, tokenizer = load_target(TARGET)
    limit = target.config.max_position_embeddings
    if max(lengths) + max_new > limit:
        raise SystemExit(f"lengths + {max_new} new tokens exceed the target's {limit} positions")
    info = TargetInfo.of(target, tokenizer, TARGET)
    drafters = [(label, load_drafter(f, info, target).eval()) for label, f in folders]
    prompts = [p.text for p in load_prompts("stdlib-long", limit=n_prompts)]
    with torch.no_grad():
        decode(target, tokenizer("import os\n")["input_ids"], 8, None)  # warm-up
        raw = measure(target, tokenizer, drafters, prompts, lengths, max_new)
    table = {n: {label: summarise(rs) for label, rs in raw[n].items()} for n in lengths}
    labels = [label for label, _ in drafters]
    plot(table, lengths, labels, RESULTS_DIR / "long_context_draft_cost.png")
    lines = [
        f"`python -m benchmarks.long_context {n_prompts} {max_new} {' '.join(map(str, lengths))}`"
        f" on {machine()}: the embedded target, the first {n_prompts} `stdlib-long` prompts cut "
        f"to each context length, {max_new} new tokens, T = 0, default settings; every run was "
        "token-identical to plain decoding. Draft ms per cycle includes `observe`; speedup is "
        "Spec-Bench's (mean tokens/s over plain decoding's, decoding only, no prefill).",
        "",
        "| context | drafter | draft ms / cycle | τ | speedup |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in lengths:
        plain = table[n]["plain"]["tok_s"]
        lines.append(f"| {n} | plain decoding | | 1.00 | 1.00× ({plain:.1f} tok/s) |")
        for label in labels:
            row = table[n][label]
            lines.append(f"| {n} | {label} | {row['draft_ms']:.2f} | {row['tau']:.2f} | "
                         f"{row['tok_s'] / plain:.2f}× |")  # fmt: skip
    first, last = lengths[0], lengths[-1]
    lines += ["", f"From {first} to {last} context tokens:", ""]
    for label in labels:
        a, b = table[first][label], table[last][label]
        lines.append(f"- {label}: draft cost ×{b['draft_ms'] / a['draft_ms']:.2f}, "
                     f"τ {100 * (b['tau'] / a['tau'] - 1):+.1f}%")  # fmt: skip
    lines += ["", "![draft cost and τ against context length](long_context_draft_cost.png)"]
    text = "## Long contexts: full against windowed drafters\n\n" + "\n".join(lines)
    print(text)
    write_section("long-context", text)


if __name__ == "__main__":
    main(sys.argv[1:])
