"""Block-diffusion drafters against the draft LM and prompt lookup, one run, same prompts.

    python -m benchmarks.block_drafters [N_PROMPTS] [MAX_NEW_TOKENS]

Runs ``infer.eval`` at T=0 and T=1 on the bundled held-out eval prompts (round-robin over the
four categories) for every drafter below that exists, each against plain decoding in the same
engine (alternating which runs first), and writes the table to ``benchmarks/results/RESULTS.md``.
The drafters share one distillation dataset (512 prompts x 128 tokens of the embedded target):

    python train/drafter.py recipe=dflash output_dir=runs/dflash_b16 distill.out=runs/bench_data
    python train/drafter.py recipe=dflash output_dir=runs/dflash_b8 distill.out=runs/bench_data \\
        drafter.block_size=8
    python train/drafter.py recipe=dflash output_dir=runs/dflash_b32 distill.out=runs/bench_data \\
        drafter.block_size=32
    python train/drafter.py recipe=deer output_dir=runs/deer distill.out=runs/bench_data
    python train/drafter.py recipe=draft_lm output_dir=runs/draft_lm_small \\
        distill.out=runs/bench_data prompts.limit=512 distill.max_new_tokens=128 train.steps=150
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

DRAFTERS = [  # (label, checkpoint, extra infer.eval options)
    ("dflash B=8", "runs/dflash_b8/drafter", []),
    ("dflash B=16", "runs/dflash_b16/drafter", []),
    ("dflash B=16, first 4 slots", "runs/dflash_b16/drafter", ["num_draft=4"]),
    ("dflash B=32", "runs/dflash_b32/drafter", []),
    ("deer B=16", "runs/deer/drafter", []),
    ("deer B=16, first 4 slots", "runs/deer/drafter", ["num_draft=4"]),
    ("draft LM (γ=4)", "runs/draft_lm_small/drafter", []),
    ("prompt lookup (8)", "prompt-lookup", []),
]


def _row(temperature: float, label: str, overall: dict, draft_len: int) -> str:
    lossless = overall["lossless"]
    same = f"{lossless['identical']}/{lossless['checked']}" if lossless else "n/a (sampling)"
    return (
        f"| {temperature:g} | {label} | {draft_len} | {overall['tau']:.2f} | "
        f"{overall['speedup']:.2f}x | {overall['speedup_excluding_prefill']:.2f}x | "
        f"{overall['spec_tokens_per_s']:.1f} | {overall['plain_tokens_per_s']:.1f} | {same} |"
    )


def run_drafters(drafters: list, n_prompts: int, max_new: int) -> tuple[list, dict, list]:
    """``infer.eval`` at T = 0 and T = 1 of every (label, checkpoint, options) whose checkpoint
    exists, same prompts; returns (table rows, checkpoint -> training command, missing)."""
    present = [run for run in drafters
               if run[1] == "prompt-lookup" or Path(run[1], "config.json").is_file()]  # fmt: skip
    missing = sorted({ckpt for _, ckpt, _ in drafters} - {ckpt for _, ckpt, _ in present})
    rows, commands = [], {}
    for temperature in (0.0, 1.0):
        for label, ckpt, extra in present:
            options = load_options(
                EvalConfig,
                [f"limit={n_prompts}", f"max_new_tokens={max_new}", f"temperature={temperature}",
                 "card=false", "tuned=false", *extra],
            )  # fmt: skip
            result = evaluate(ckpt, options)
            rows.append(
                _row(temperature, label, result["overall"], result["settings"]["num_draft"])
            )
            print(rows[-1], flush=True)
            if ckpt != "prompt-lookup":
                commands[ckpt] = json.loads(Path(ckpt, "training.json").read_text())["command"]
    return rows, commands, missing


def drafter_section(title: str, intro: str, rows: list, commands: dict, missing: list) -> str:
    """A RESULTS.md section: title, intro, the rows of ``run_drafters`` and how each was
    trained."""
    return "\n".join(
        [
            title,
            "",
            f"{intro} {SPEEDUP_NOTE}",
            "",
            "| T | drafter | draft | τ | speedup | speedup (no prefill) | tok/s | plain tok/s | "
            "identical to plain |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            "Trained with:",
            "",
            *(f"- `{ckpt}`: `{command}`" for ckpt, command in commands.items()),
            *([f"- not present (not run): {', '.join(missing)}"] if missing else []),
        ]
    )


def main(argv: list[str]) -> None:
    n_prompts = int(argv[0]) if argv else 32
    max_new = int(argv[1]) if len(argv) > 1 else 96
    rows, commands, missing = run_drafters(DRAFTERS, n_prompts, max_new)
    text = drafter_section(
        "## Block-diffusion drafters (`python -m benchmarks.block_drafters`)",
        f"Machine: {machine()}. Embedded target `stdlib-llama` (fp32, batch 1), {n_prompts} "
        f"held-out eval prompts (round-robin over 4 categories), {max_new} new tokens, one run, "
        "plain and speculative decoding in our engine, alternating which runs first; τ = "
        "tokens per target forward (bonus token included); draft = tokens proposed per cycle.",
        rows, commands, missing,
    )  # fmt: skip
    print(text)
    write_section("block_drafters", text)


if __name__ == "__main__":
    main(sys.argv[1:])
