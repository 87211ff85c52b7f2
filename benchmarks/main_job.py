"""The README main job's drafter beside prompt lookup and Hugging Face's own, in one run.

    python -m benchmarks.main_job [CKPT] [--limit 16] [--tokens 64] [--repeats 3]

CKPT (default ``runs/d2sd/drafter``) is what ``accelerate launch train/drafter.py recipe=d2sd``
wrote. One ``infer.eval`` run on held-out ``stdlib-eval`` prompts, greedy: D²SD, its drafter 1
alone, draftkit's prompt lookup and HF's prompt lookup (``compare=true``), every prompt decoded
plainly once and by each contender once, the order rotated, ``--repeats`` rotations (the
speedup is their median, with the range). Writes the ``main_job`` section of
``benchmarks/results/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.results import machine, write_section
from infer.contenders import Entry
from infer.eval import comparison_rows, evaluate_many
from infer.report import comparison_markdown
from recipes import load_options
from recipes.schema import EvalConfig


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.main_job")
    parser.add_argument("ckpt", nargs="?", default="runs/d2sd/drafter")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    folder = Path(args.ckpt)
    options = load_options(EvalConfig, [
        f"limit={args.limit}", f"max_new_tokens={args.tokens}", f"repeats={args.repeats}",
        "compare=true", "out=runs/main_job_eval", "card=false",
    ])  # fmt: skip
    entries = [
        Entry(str(folder), "D²SD (K of the folder)"),
        Entry(str(folder), "drafter 1 alone (K=0)", ["branches=0"]),
        Entry("prompt-lookup", "prompt lookup"),
    ]
    run = evaluate_many(entries, options)
    run = {**run, "comparison": comparison_rows(run)}
    table = comparison_markdown(run).split("\n", 2)[2]
    training = json.loads((folder / "training.json").read_text())
    data, metrics = training["data"], training["metrics"]
    text = "\n".join([
        "## The main job against prompt lookup (`python -m benchmarks.main_job`)",
        "",
        f"Measured on {machine()}: the drafter of `{training['command']}` "
        f"({data['rows']:,} prompts, {data['response_tokens']:,} response tokens; drafter 1 "
        f"{metrics['stages']['first']['steps']} steps, held-out chain-walk τ "
        f"{metrics['heldout_tau']:.2f}), {args.limit} held-out prompts x {args.tokens} tokens, "
        f"greedy, {args.repeats} rotations in one run.",
        "",
        table.strip(),
    ])  # fmt: skip
    write_section("main_job", text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
