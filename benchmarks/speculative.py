"""Speculative decoding on the embedded target: ours vs plain decoding vs Hugging Face peers.

    python -m benchmarks.speculative [DRAFTER] [N_PROMPTS] [MAX_NEW_TOKENS]

DRAFTER (default ``runs/draft_lm_small/drafter``) is a ``draft_lm`` distilled from the embedded
target; make it with

    python train/drafter.py recipe=draft_lm output_dir=runs/draft_lm_small prompts.limit=512 \\
        distill.max_new_tokens=128 train.steps=150

Runs ``infer.eval`` at T=0 and T=1 on the bundled held-out eval prompts (round-robin over the
four categories): the draft LM as a chain and as a static tree, and prompt lookup; each against
plain decoding in the same engine, and, in the same runs, HF ``generate``, HF assisted
generation with the same draft model and HF prompt-lookup decoding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.results import machine, write_section
from infer.eval import evaluate
from infer.report import SPEEDUP_NOTE
from recipes import load_options
from recipes.schema import EvalConfig


def main(argv: list[str]) -> None:
    drafter = argv[0] if argv else "runs/draft_lm_small/drafter"
    n_prompts = int(argv[1]) if len(argv) > 1 else 32
    max_new = int(argv[2]) if len(argv) > 2 else 96
    if not Path(drafter, "config.json").is_file():
        sys.exit(f"no drafter at {drafter}: make it with the command in this module's docstring")
    runs = [  # (label, checkpoint, options, run the HF peers)
        ("draft LM chain (γ=4)", drafter, ["temperature=0"], True),
        ("draft LM tree (γ=4, top-2 per position)", drafter, ["temperature=0", "proposer=tree"], False),
        ("prompt lookup (8)", "prompt-lookup", ["temperature=0"], False),
        ("draft LM chain (γ=4)", drafter, ["temperature=1"], True),
        ("prompt lookup (8)", "prompt-lookup", ["temperature=1"], False),
    ]  # fmt: skip
    rows, peer_rows = [], []
    for label, ckpt, extra, peers in runs:
        options = load_options(
            EvalConfig,
            [
                f"limit={n_prompts}",
                f"max_new_tokens={max_new}",
                f"compare={peers}",
                "tuned=false",
                *extra,
            ],
        )
        result = evaluate(ckpt, options)
        f, temp = result["overall"], options.temperature
        lossless = f["lossless"]
        same = f"{lossless['identical']}/{lossless['checked']}" if lossless else "n/a (sampling)"
        rows.append(
            f"| {temp:g} | {label} | {f['tau']:.2f} | {f['speedup']:.2f}x | "
            f"{f['speedup_excluding_prefill']:.2f}x | {f['spec_tokens_per_s']:.1f} | "
            f"{f['plain_tokens_per_s']:.1f} | {same} |"
        )
        print(rows[-1], flush=True)
        for name, peer in result.get("peers", {}).items():
            identical = (
                "n/a" if peer["identical"] is None else f"{peer['identical']}/{peer['checked']}"
            )
            peer_rows.append(
                f"| {temp:g} | {name} | {peer['tokens_per_s']:.1f} | {peer['speedup']:.2f}x | "
                f"{identical} |"
            )
            print(peer_rows[-1], flush=True)
    training = json.loads(Path(drafter, "training.json").read_text())
    text = "\n".join(
        [
            "## Speculative decoding (`python -m benchmarks.speculative`)",
            "",
            f"Machine: {machine()}. Embedded target `stdlib-llama` (fp32, batch 1), "
            f"{n_prompts} held-out eval prompts (round-robin over 4 categories), "
            f"{max_new} new tokens. Drafter: `{drafter}` (`{training.get('command', '?')}`). "
            "Plain and speculative decoding in our engine, alternating which runs first; τ = "
            f"tokens per target forward. {SPEEDUP_NOTE}",
            "",
            "| T | ours | τ | speedup | speedup (no prefill) | tok/s | plain tok/s | "
            "identical to plain |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            "Hugging Face peers on the same prompts in the same runs as the draft-LM rows above "
            "(HF defaults; speedup vs HF `generate`):",
            "",
            "| T | peer | tok/s | speedup vs HF generate | identical to ours |",
            "| --- | --- | --- | --- | --- |",
            *peer_rows,
        ]
    )
    print(text)
    write_section("speculative", text)


if __name__ == "__main__":
    main(sys.argv[1:])
