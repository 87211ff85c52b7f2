"""Does an exportable (Qwen3-style, q/k RMSNorm) DFlash drafter train as well as one built of the
target's own layers? D²SD's drafter 1 setting (B = 8, 2 layers, CE, lr 1e-3, batch 8) on the
5,118-row distillation dataset of the main job, 600 steps each, then one ``infer.eval`` run of
both on 16 held-out prompts with 3 rotations.

    python -m benchmarks.layer_style train     # both runs side by side (1 torch thread each)
    python -m benchmarks.layer_style report    # the eval run and its RESULTS.md section

``DATA`` must be a finished dataset of the embedded target with hidden states 2 and 6 (the main
job's ``runs/<name>/data``; ``accelerate launch train/drafter.py recipe=d2sd`` builds one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.results import write_section

STYLES = ("target", "qwen3")
DATA = os.environ.get("LAYER_STYLE_DATA", "runs/d2sd-10x2/data")
STEPS = 600


def run_dir(style: str) -> Path:
    return Path(f"runs/layer-style-{style}")


def train() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "train/drafter.py",
                "recipe=dflash",
                "drafter.block_size=8",
                "drafter.num_layers=2",
                "drafter.loss=ce",
                "train.lr=1e-3",
                "train.batch_size=8",
                f"train.steps={STEPS}",
                "train.save_every=300",
                "train.eval_every=150",
                f"distill.out={DATA}",
                f"output_dir={run_dir(style)}",
                f"drafter.layer_style={style}",
                "final_eval.limit=0",
                "train.threads=1",
            ],
            env=env,
        )  # fmt: skip
        for style in STYLES
    ]
    if any(job.wait() for job in jobs):
        raise SystemExit("a training run failed")


def walk(style: str) -> list[tuple[int, float]]:
    lines = (run_dir(style) / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r["heldout_tau"]) for r in records if "heldout_tau" in r]


def report() -> None:
    out = Path("runs/layer-style-eval")
    subprocess.run(
        [sys.executable, "-m", "infer.eval", *(str(run_dir(s) / "drafter") for s in STYLES),
         "limit=16", "repeats=3", "tuned=false", f"out={out}", "card=false", "threads=2"],
        check=True,
    )  # fmt: skip
    run = json.loads((out / "eval.json").read_text())
    lines = [
        "## Drafter layer style: the target's layers against exportable Qwen3-style layers",
        "",
        f"`python -m benchmarks.layer_style` ({time.strftime('%Y-%m-%d')}, 2-core CPU; training "
        "1 thread per run, the two side by side; eval in one run, 2 threads). dflash B = 8, "
        f"2 layers, CE, lr 1e-3, batch 8, {STEPS} steps on the main job's 5,118 rows; one seed.",
        "",
        "| layers | held-out walk τ (150 / 300 / 450 / 600 steps) | infer.eval τ | speedup "
        "[3 rotations] | draft share |",
        "| --- | --- | --- | --- | --- |",
    ]
    for style, result in zip(STYLES, run["drafters"], strict=True):
        o = result["overall"]
        taus = " / ".join(f"{t:.2f}" for _, t in walk(style))
        share = o.get("time_split", {}).get("draft")
        lines.append(
            f"| {style} | {taus} | {o['tau']:.2f} | {o['speedup']:.2f}x "
            f"[{o.get('speedup_min', o['speedup']):.2f}–{o.get('speedup_max', o['speedup']):.2f}] "
            f"| {f'{share:.0%}' if share is not None else '–'} |"
        )
    write_section("layer_style", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    {"train": train, "report": report}[sys.argv[1] if len(sys.argv) > 1 else "report"]()
