"""Draft heads (Medusa, Hydra, Hydra++) and Falcon beside dflash and the draft LM, one run.

    python -m benchmarks.heads [N_PROMPTS] [MAX_NEW_TOKENS]

Every drafter below that exists is run through ``infer.eval`` at T = 0 and T = 1 on the same
bundled held-out eval prompts, each against plain decoding in the same engine (alternating which
runs first); writes the ``heads`` section of ``benchmarks/results/RESULTS.md``. They share the
distillation data of ``benchmarks/block_drafters.py`` (``runs/bench_data``):

    S="distill.out=runs/bench_data train.steps=80 train.batch_size=8"
    python train/drafter.py recipe=medusa output_dir=runs/medusa $S
    python train/drafter.py recipe=hydra output_dir=runs/hydra $S
    python train/drafter.py recipe=hydra output_dir=runs/hydra_pp $S drafter.variant=hydra++
    python train/drafter.py recipe=falcon output_dir=runs/falcon_csgd80 $S drafter.csgd_steps=80
    python train/drafter.py recipe=falcon output_dir=runs/falcon_nocsgd $S drafter.csgd_steps=0

(80 steps at batch 8 each, a fifth of the draft LM's 150 x 16 sequences: what fitted the session.)
"""

from __future__ import annotations

import sys

from benchmarks.block_drafters import drafter_section, run_drafters
from benchmarks.results import machine, write_section

DRAFTERS = [  # (label, checkpoint, extra infer.eval options)
    ("medusa (4 heads, 60-node tree)", "runs/medusa/drafter", []),
    ("hydra (4 heads, 60-node tree)", "runs/hydra/drafter", []),
    ("hydra++ (4 heads, 60-node tree)", "runs/hydra_pp/drafter", []),
    ("falcon k=2, CSGD (3 passes, width 3)", "runs/falcon_csgd80/drafter", []),
    ("falcon k=2, no CSGD", "runs/falcon_nocsgd/drafter", []),
    ("dflash B=8 (chain)", "runs/dflash_b8/drafter", []),
    ("draft LM (γ=4, chain)", "runs/draft_lm_small/drafter", []),
]


def main(argv: list[str]) -> None:
    n_prompts = int(argv[0]) if argv else 16
    max_new = int(argv[1]) if len(argv) > 1 else 64
    rows, commands, missing = run_drafters(DRAFTERS, n_prompts, max_new)
    text = drafter_section(
        "## Draft heads and Falcon (`python -m benchmarks.heads`)",
        f"Machine: {machine()}. Embedded target `stdlib-llama` (fp32, batch 1), {n_prompts} "
        f"held-out eval prompts (round-robin over 4 categories), {max_new} new tokens, one "
        "run; every row against plain decoding in the same engine. τ = tokens per target "
        "forward; draft = the tree's depth (heads, Falcon) or the chain's length. T = 1 verifies "
        "the heads' and Falcon's deterministic candidates by token matching (lossless).",
        rows, commands, missing,
    )  # fmt: skip
    print(text)
    write_section("heads", text)


if __name__ == "__main__":
    main(sys.argv[1:])
