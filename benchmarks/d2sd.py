"""D²SD against its own ablations, one run, same prompts (the paper's Tables 5-7 on our CPU).

    python -m benchmarks.d2sd [CKPT] [--limit 16] [--tokens 64] [--repeats 3] [--seeds 3]

CKPT (default ``runs/d2sd/drafter``) is a drafter trained by ``recipe=d2sd``. Each temperature
is one ``infer.eval`` run (``evaluate_many``): every prompt decoded plainly once and by every
contender, the order rotated, on the bundled held-out eval prompts; each contender one flag:

- drafter 1 alone (``branches=0``): the plain DFlash drafter inside the folder;
- D²SD as trained and tuned (K of the drafter, ``confidence=auto``: what training measured to
  rank rejections better, branches re-anchored at their alternative with ``anchor=drafter1``);
- re-anchoring by a second VP pass (``anchor=vp``), and the old exclusion (``anchor=none``: the
  tail drafted without the alternative);
- the trained head and the softmax confidence (the paper's ranking) forced;
- K naive branches re-sampled from drafter 1 instead of the VP drafter;
- K = 1 and K = 4, and the tuner's choice of block length, K and branch depth (the folder's
  ``tuned.json`` from ``python -m infer.eval CKPT tune=true``; the defaults without one).

At T = 0 the run repeats ``--repeats`` rotations (τ is exact and the same in each; the speedup
is the median with its range); at T = 1 it runs ``--seeds`` seeds (τ and speedup: median and
range over the seeds; rejection sampling, so no token check). Beside the tables: the per-slot
AUROC and ECE of the head, the softmax and the constant base rate on held-out cycle roots, as
training measured them (``training.json``). Writes the ``d2sd`` section of
``benchmarks/results/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.results import machine, write_section
from infer.contenders import Entry
from infer.eval import evaluate_many
from infer.report import SPEEDUP_NOTE
from recipes import load_options
from recipes.schema import EvalConfig

T0 = [  # (label, infer.eval options)
    ("drafter 1 alone", ["branches=0"]),
    ("D²SD (trained defaults)", []),
    ("D²SD, anchor=vp (two VP passes)", ["anchor=vp"]),
    ("D²SD, anchor=none (old exclusion)", ["anchor=none"]),
    ("D²SD, head confidence", ["confidence=head"]),
    ("D²SD, softmax confidence", ["confidence=softmax"]),
    ("naive branches (from drafter 1)", ["branch_drafter=naive"]),
    ("D²SD K=1", ["branches=1"]),
    ("D²SD K=4", ["branches=4"]),
    ("D²SD at the tuner's choice (tuned.json)", ["tuned=true"]),
]
T1 = [
    ("drafter 1 alone", ["branches=0"]),
    ("D²SD (trained defaults)", []),
    ("D²SD, anchor=none (old exclusion)", ["anchor=none"]),
    ("D²SD, sample-matching", ["acceptance=matching"]),
]


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{fmt.format(mid)} [{fmt.format(low)}–{fmt.format(high)}]"


def _run(ckpt: str, rows, base: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    """label -> the contender's overall figures, one per seed."""
    figures: dict[str, list[dict]] = {label: [] for label, _ in rows}
    for seed in seeds:
        options = load_options(EvalConfig, [*base, f"seed={seed}", "card=false", "tuned=false",
                                            "out=runs/d2sd_bench"])  # fmt: skip
        entries = [Entry(ckpt, label, extra) for label, extra in rows]
        run = evaluate_many(entries, options)
        for label, result in zip(figures, run["drafters"], strict=True):
            figures[label].append(result["overall"])
            print(label, seed, f"τ {result['overall']['tau']:.2f}",
                  f"{result['overall']['speedup']:.2f}x", flush=True)  # fmt: skip
    return figures


def _table(temperature: float, figures: dict[str, list[dict]], rows) -> list[str]:
    lines = []
    for label, extra in rows:
        runs = figures[label]
        speeds = [s for r in runs for s in r.get("speedup_repeats", [r["speedup"]])]
        lossless = runs[0]["lossless"]
        same = (f"{sum(r['lossless']['identical'] for r in runs)}/"
                f"{sum(r['lossless']['checked'] for r in runs)}") if lossless else "n/a"  # fmt: skip
        split = runs[0]["time_split"]
        lines.append(
            f"| {temperature:g} | {label} | `{' '.join(extra) or '-'}` | "
            f"{_spread([r['tau'] for r in runs])} | {_spread(speeds)}x | "
            f"{split['draft']:.0%} / {split['verify']:.0%} | {same} |"
        )
    return lines


def _tuned(path: Path) -> list[str]:
    if not path.is_file():
        return ["", "No tuned.json: the tuner's row ran the trained defaults."]
    tuned = json.loads(path.read_text())
    chosen = " ".join(f"{k}={v}" for k, v in tuned.get("settings", {}).items()) or "the defaults"
    return ["", f"The tuner's choice on {tuned.get('device', 'this device')}: {chosen}."]


def _calibration(training: dict) -> list[str]:
    cal = training["metrics"].get("stages", {}).get("first", {}).get("calibration")
    if not isinstance(cal, dict) or "constant" not in cal:
        return []
    slots = len(cal["accept"])
    head = "| confidence | " + " | ".join(f"slot {k + 1}" for k in range(slots)) + " | mean |"
    lines = [
        "",
        f"Calibration at held-out cycle roots (training's `after_stage`: {cal['blocks']} blocks "
        f"of drafter 1 where greedy decoding starts a cycle, temperatures fitted on "
        f"{cal['fit_blocks']}, scored on the other {cal['scored_blocks']}; head trained for "
        f"{', '.join(cal['head_rule'])}; the cumulative product c_1..c_k against the target "
        f"accepting slots 1..k). Prefix acceptance there: "
        + ", ".join(f"{a:.2f}" for a in cal["accept"])
        + f". Default chosen: `confidence={cal['confidence']}`.",
    ]
    for metric in ("auroc", "ece"):
        lines += ["", f"{metric.upper()}:", "", head, "| --- " * (slots + 2) + "|"]
        for key in ("head", "head_uncalibrated", "softmax", "constant"):
            values = cal[key][metric]
            cells = " | ".join("n/a" if v != v else f"{v:.3f}" for v in values)
            mean = cal[key].get(f"mean_{metric}")
            lines.append(f"| {key} | {cells} | {'n/a' if mean != mean else f'{mean:.3f}'} |")
    return lines


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.d2sd")
    parser.add_argument("ckpt", nargs="?", default="runs/d2sd/drafter")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    if not Path(args.ckpt, "config.json").is_file():
        raise SystemExit(f"{args.ckpt}: no drafter; train one with train/drafter.py recipe=d2sd")
    base = [f"limit={args.limit}", f"max_new_tokens={args.tokens}"]
    greedy = _run(args.ckpt, T0, [*base, "temperature=0", f"repeats={args.repeats}"], [0])
    sampled = _run(args.ckpt, T1, [*base, "temperature=1"], list(range(args.seeds)))
    training = json.loads(Path(args.ckpt, "training.json").read_text())
    alone = greedy["drafter 1 alone"][0]["tau"]
    ratios = ", ".join(f"{label}: {figures[0]['tau'] / alone:.2f}x"
                       for label, figures in greedy.items() if label != "drafter 1 alone")  # fmt: skip
    lines = [
        "## D²SD and its ablations (`python -m benchmarks.d2sd`)",
        "",
        f"Machine: {machine()}. Embedded target `stdlib-llama` (fp32, batch 1), drafter "
        f"`{args.ckpt}`, {args.limit} held-out eval prompts (round-robin over 4 categories), "
        f"{args.tokens} new tokens; one run per temperature, every contender against the same "
        f"plain decoding. T = 0: {args.repeats} rotations (speedup median [range]); T = 1: "
        f"{args.seeds} seeds (τ and speedup median [range]). τ = tokens per target forward. "
        f"{SPEEDUP_NOTE}",
        "",
        "| T | proposer | flags | τ | speedup | draft / verify time | identical to plain |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *_table(0.0, greedy, T0),
        *_table(1.0, sampled, T1),
        "",
        f"τ over drafter 1 alone at T = 0: {ratios}.",
        *_tuned(Path(args.ckpt, "tuned.json")),
        *_calibration(training),
        "",
        f"Trained with: `{training['command']}`",
    ]
    text = "\n".join(lines)
    print(text)
    write_section("d2sd", text)


if __name__ == "__main__":
    main(sys.argv[1:])
