"""D²SD against its own ablations, one run, same prompts (the paper's Tables 5-7 on our CPU).

    python -m benchmarks.d2sd [CKPT] [N_PROMPTS] [MAX_NEW_TOKENS]

CKPT (default ``runs/d2sd/drafter``) is a drafter trained by ``recipe=d2sd``. Every row is
``infer.eval`` on the bundled held-out eval prompts, against plain decoding in the same engine
(alternating which runs first), each ablation one flag:

- drafter 1 alone (``branches=0``): the plain DFlash drafter inside the folder;
- D²SD with K = 1, 2, 4 branches re-drafted by the VP drafter, ranked by the trained head;
- the same with the softmax confidence (the paper's ranking), and with K naive branches
  re-sampled from drafter 1 instead of the VP drafter;
- at T = 1: lossless rejection sampling over the tree (every node carries its draft
  distribution) against the paper's sample-matching, for D²SD and drafter 1 alone.

The T = 0 D²SD run also reports the confidence calibration (ECE of the cumulative product
against realised prefix acceptance) of the trained head and of the softmax. Writes the
``d2sd`` section of ``benchmarks/RESULTS.md``.
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

ROWS = [  # (temperature, label, infer.eval options)
    (0.0, "drafter 1 alone", ["branches=0"]),
    (0.0, "D²SD K=1", ["branches=1"]),
    (0.0, "D²SD K=2", ["branches=2"]),
    (0.0, "D²SD K=4", ["branches=4"]),
    (0.0, "drafter 1 alone, first 3 slots", ["branches=0", "num_draft=3"]),
    (0.0, "D²SD K=2, depth 3", ["branches=2", "num_draft=3"]),
    (0.0, "D²SD K=2, softmax confidence", ["branches=2", "confidence=softmax"]),
    (0.0, "naive K=2 (re-sampled from drafter 1)", ["branches=2", "branch_drafter=naive"]),
    (1.0, "drafter 1 alone, rejection sampling", ["branches=0"]),
    (1.0, "drafter 1 alone, sample-matching", ["branches=0", "acceptance=matching"]),
    (1.0, "D²SD K=2, rejection sampling", ["branches=2"]),
    (1.0, "D²SD K=2, sample-matching", ["branches=2", "acceptance=matching"]),
]


def _row(temperature: float, label: str, overall: dict) -> str:
    lossless = overall["lossless"]
    same = f"{lossless['identical']}/{lossless['checked']}" if lossless else "n/a (sampling)"
    split = overall["time_split"]
    return (
        f"| {temperature:g} | {label} | {overall['tau']:.2f} | {overall['speedup']:.2f}x | "
        f"{overall['speedup_excluding_prefill']:.2f}x | {split['draft']:.0%} / "
        f"{split['verify']:.0%} | {same} |"
    )


def main(argv: list[str]) -> None:
    ckpt = argv[0] if argv else "runs/d2sd/drafter"
    n_prompts = int(argv[1]) if len(argv) > 1 else 16
    max_new = int(argv[2]) if len(argv) > 2 else 64
    if not Path(ckpt, "config.json").is_file():
        raise SystemExit(f"{ckpt}: no drafter; train one with train/drafter.py recipe=d2sd")
    rows, calibration, taus = [], None, {}
    for temperature, label, extra in ROWS:
        options = load_options(
            EvalConfig,
            [f"limit={n_prompts}", f"max_new_tokens={max_new}", f"temperature={temperature}",
             "card=false", "tuned=false", *extra],
        )  # fmt: skip
        result = evaluate(ckpt, options)
        taus[(temperature, label)] = result["overall"]["tau"]
        if calibration is None and result.get("calibration") and "branches=2" in extra:
            calibration = result["calibration"]
        rows.append(_row(temperature, label, result["overall"]))
        print(rows[-1], flush=True)
    training = json.loads(Path(ckpt, "training.json").read_text())
    alone = taus[(0.0, "drafter 1 alone")]
    ratios = ", ".join(
        f"{label}: {tau / alone:.2f}x"
        for (t, label), tau in taus.items()
        if t == 0.0 and label.startswith("D²SD")
    )
    lines = [
        "## D²SD and its ablations (`python -m benchmarks.d2sd`)",
        "",
        f"Machine: {machine()}. Embedded target `stdlib-llama` (fp32, batch 1), drafter "
        f"`{ckpt}`, {n_prompts} held-out eval prompts (round-robin over 4 categories), {max_new} "
        "new tokens, one run; every row against plain decoding in the same engine; τ = tokens "
        f"per target forward. {SPEEDUP_NOTE}",
        "",
        "| T | proposer | τ | speedup | speedup (no prefill) | draft / verify time | "
        "identical to plain |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"τ over drafter 1 alone at T = 0: {ratios}.",
    ]
    if calibration:
        head, soft = calibration["head"], calibration["softmax"]
        lines += [
            "",
            f"Confidence calibration at T = 0 (D²SD K=2 run, {calibration['cycles']} cycles; "
            "cumulative product of c_1..c_k against the target accepting slots 1..k, per slot, "
            "averaged over slots):",
            "",
            "| confidence | mean ECE (20 bins) | mean Brier | AUROC slot 1 |",
            "| --- | --- | --- | --- |",
            f"| trained head (calibrated) | {head['mean_ece']:.3f} | {head['mean_brier']:.3f} | "
            f"{head['per_slot'][0]['auroc']:.3f} |",
            f"| softmax | {soft['mean_ece']:.3f} | {soft['mean_brier']:.3f} | "
            f"{soft['per_slot'][0]['auroc']:.3f} |",
        ]
    lines += ["", f"Trained with: `{training['command']}`"]
    text = "\n".join(lines)
    print(text)
    write_section("d2sd", text)


if __name__ == "__main__":
    main(sys.argv[1:])
