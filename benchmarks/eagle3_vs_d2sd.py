"""EAGLE-3 beside D²SD (and the draft LM) on the embedded target, in one run.

    python -m benchmarks.eagle3_vs_d2sd EAGLE3 D2SD [DRAFT_LM] [--limit 16] [--tokens 64] [--repeats 3]

The D²SD and DFlash papers rank D²SD above EAGLE-3 (Qwen3-8B on an H200: τ 7.05 against 5.91).
This puts the two families' drafters trained here side by side: one ``infer.eval`` run on
held-out ``stdlib-eval`` prompts, greedy, every prompt decoded plainly once and by each
contender once, the order rotated, ``--repeats`` rotations (the speedup is their median, with
the range). Contenders: EAGLE-3 as a chain of its ``num_draft`` and as EAGLE-2's dynamic tree
(budget 16, top-4); D²SD with the folder's K and its drafter 1 alone; the draft LM when given.
The header says how much each drafter was trained (response tokens seen, steps), which the two
papers' comparison holds equal and this one does not. Writes the ``eagle3-vs-d2sd`` section of
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


def trained(folder: str) -> str:
    """How much the drafter in ``folder`` was trained: from its ``training.json``, or for a
    learning-curve checkpoint (``runs/curves/<run>/exported/step-N``) from the curve's record."""
    path = Path(folder, "training.json")
    if path.is_file():
        record = json.loads(path.read_text())
        metrics = record["metrics"]
        steps = metrics.get("steps") or metrics.get("stages", {}).get("first", {}).get("steps")
        return (f"`{record['command']}`: {record['data']['rows']:,} prompts; {steps} steps, "
                f"{metrics['tokens'] / 1e6:.2f}M response tokens seen in "
                f"{metrics['seconds'] / 60:.0f} min")  # fmt: skip
    step = int(Path(folder).name.removeprefix("step-"))
    curve = Path(folder).parents[1] / "curve.jsonl"
    for line in curve.read_text().splitlines():
        point = json.loads(line)
        if point["step"] == step:
            return (f"`{folder}` (learning curve, one thread): {step} steps, "
                    f"{point['response_tokens_seen'] / 1e6:.2f}M response tokens seen in "
                    f"{point['train_seconds'] / 60:.0f} min; the curve's eval τ "
                    f"{point['eval_tau']:.2f} on 24 prompts")  # fmt: skip
    raise ValueError(f"{folder}: no training.json and no step {step} in {curve}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eagle3_vs_d2sd")
    parser.add_argument("eagle3")
    parser.add_argument("d2sd")
    parser.add_argument("draft_lm", nargs="?")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    options = load_options(EvalConfig, [
        f"limit={args.limit}", f"max_new_tokens={args.tokens}", f"repeats={args.repeats}",
        "out=runs/eagle3_vs_d2sd", "card=false", "tuned=false",
    ])  # fmt: skip
    entries = [
        Entry(args.eagle3, "EAGLE-3 chain"),
        Entry(args.eagle3, "EAGLE-3 tree (budget 16, top-4)", ["tree_budget=16", "tree_topk=4"]),
        Entry(args.d2sd, "D²SD (K of the folder)"),
        Entry(args.d2sd, "D²SD drafter 1 alone (K=0)", ["branches=0"]),
    ]
    if args.draft_lm:
        entries.append(Entry(args.draft_lm, "draft LM"))
    run = evaluate_many(entries, options)
    run = {**run, "comparison": comparison_rows(run)}
    table = comparison_markdown(run).split("\n", 2)[2]
    lines = [
        "## EAGLE-3 beside D²SD (`python -m benchmarks.eagle3_vs_d2sd`)",
        "",
        f"Measured on {machine()}, {args.limit} held-out prompts x {args.tokens} tokens, "
        f"greedy, {args.repeats} rotations in one run, every drafter with its default settings "
        "(untuned). Trained:",
        "",
        f"- EAGLE-3: {trained(args.eagle3)}",
        f"- D²SD: {trained(args.d2sd)}",
    ]
    if args.draft_lm:
        lines.append(f"- draft LM: {trained(args.draft_lm)}")
    write_section("eagle3-vs-d2sd", "\n".join([*lines, "", table.strip()]))
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
