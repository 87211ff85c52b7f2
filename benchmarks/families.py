"""Every drafter family on the embedded target in one run, tuned to this machine and not.

    python -m benchmarks.families [N_PROMPTS] [MAX_NEW_TOKENS] [TUNE_PROMPTS]

1. Each family's drafter below is reused when its folder holds a finished drafter, else trained
   with its recipe on the shared distillation data (``runs/bench_data``; the command is
   ``TRAIN`` + the family's overrides, about 5-12 min each on the 2-core CPU).
2. Each is tuned on this machine (``infer/tune.py``: cost curve, T = 0 replay of its settings
   grid on the eval set's last ``TUNE_PROMPTS`` prompts), which writes its ``tuned.json``.
3. One ``infer.eval`` run (``evaluate_many``) at T = 0 on the set's first ``N_PROMPTS``
   prompts: every drafter tuned and with its defaults, D²SD with the paper's defaults (K = 4,
   the deepest branches its VP block allows), prompt lookup, plain decoding and the Hugging Face
   peers, all on the same prompts with the order rotated per prompt.

Writes the ``families`` section of ``benchmarks/RESULTS.md`` (the comparison, the tuned choices
with predicted against measured speedup) and ``benchmarks/families_speedup_tau.png``; every
drafter folder gets its comparison row and tuned settings in its model card.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.results import machine, write_section
from infer.eval import Entry, comparison_rows, evaluate_many, write_comparison
from infer.report import comparison_markdown
from infer.tune import record_measured, tune
from recipes import load_options
from recipes.schema import EvalConfig

TRAIN = "python train/drafter.py distill.out=runs/bench_data final_eval.limit=0"
FAMILIES = [  # (label, folder, recipe and overrides when it must be trained)
    ("draft LM", "runs/draft_lm_small", "recipe=draft_lm"),
    ("dflash B=8", "runs/dflash_b8", "recipe=dflash drafter.block_size=8"),
    ("deer B=16", "runs/deer", "recipe=deer"),
    ("d2sd", "runs/d2sd_v2", "recipe=d2sd"),
    ("medusa", "runs/medusa", "recipe=medusa train.steps=80 train.batch_size=8"),
    ("hydra++", "runs/hydra_pp", "recipe=hydra drafter.variant=hydra++ train.steps=80 "
     "train.batch_size=8"),
    ("falcon", "runs/falcon", "recipe=falcon train.steps=80 train.batch_size=8"),
]  # fmt: skip
PLOT = Path(__file__).resolve().parent / "families_speedup_tau.png"


def ensure_trained(folder: str, recipe: str) -> str:
    drafter = Path(folder) / "drafter"
    if not (drafter / "config.json").is_file():
        command = f"{TRAIN} {recipe} output_dir={folder}"
        print(f"training: {command}", flush=True)
        subprocess.run(command.split(), check=True)
    return str(drafter)


def main(argv: list[str]) -> None:
    n_prompts = int(argv[0]) if argv else 16
    max_new = int(argv[1]) if len(argv) > 1 else 64
    tune_prompts = int(argv[2]) if len(argv) > 2 else 8
    base = [f"limit={n_prompts}", f"max_new_tokens={max_new}", f"tune_prompts={tune_prompts}",
            "compare=true", "out=runs/families_eval"]  # fmt: skip
    options = load_options(EvalConfig, base)
    entries, tuned_labels, records = [], {}, {}
    for label, folder, recipe in FAMILIES:
        ckpt = ensure_trained(folder, recipe)
        records[label] = tune(ckpt, options)
        entries.append(Entry(ckpt, f"{label}, tuned"))
        tuned_labels[f"{label}, tuned"] = label
        entries.append(Entry(ckpt, f"{label}, defaults", ["tuned=false"]))
        if label == "d2sd":
            config = json.loads(Path(ckpt, "config.json").read_text())
            depth = config["drafter"]["vp"]["block_size"] - 1
            entries.append(Entry(ckpt, f"d2sd, paper defaults (K=4, B₂-1={depth})",
                                 ["tuned=false", "branches=4", f"branch_depth={depth}"]))  # fmt: skip
    lookup = tune("prompt-lookup", options)
    records["prompt lookup"] = lookup
    entries.append(Entry("prompt-lookup", "prompt lookup, tuned",
                         [f"{k}={v}" for k, v in lookup["settings"].items()]))  # fmt: skip
    entries.append(Entry("prompt-lookup", "prompt lookup, defaults"))
    run = evaluate_many(entries, options)
    out = write_comparison(run, entries, options)
    shutil.copyfile(out / "speedup_tau.png", PLOT)
    measured = {r["settings"]["label"]: r for r in run["drafters"]}
    for label in tuned_labels:
        record_measured(measured[label])
    tuning = ["| family | chosen settings | predicted τ | measured τ | predicted speedup | "
              "measured speedup | defaults' predicted speedup |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for label, record in records.items():
        overall = measured[f"{label}, tuned"]["overall"]
        chosen = " ".join(f"{k}={v}" for k, v in record["settings"].items()) or "(defaults)"
        tuning.append(
            f"| {label} | {chosen} | {record['predicted']['tau']:.2f} | {overall['tau']:.2f} | "
            f"{record['predicted']['predicted_speedup']:.2f}x | {overall['speedup']:.2f}x | "
            f"{record['defaults']['predicted_speedup']:.2f}x |"
        )
    rows = comparison_rows(run)
    best = max(rows, key=lambda r: r["speedup"])
    peers = run.get("peers", {})
    best_peer = max(
        (name for name in peers if name != "HF generate"),
        key=lambda n: peers[n]["tokens_per_s"],
        default=None,
    )
    body = comparison_markdown({**run, "comparison": rows}).split("\n", 2)[2]
    costs = next(iter(records.values()))["costs"]
    verify = ", ".join(
        f"{n}: {1000 * s:.1f}" for n, s in zip(costs["sizes"], costs["verify_s"], strict=True)
    )
    lines = [
        "## Every family, one run (`python -m benchmarks.families`)",
        "",
        f"Machine: {machine()}. Embedded target `stdlib-llama` (fp32, batch 1), T = 0. "
        f"Tuning: {tune_prompts} held-out prompts (the eval set's last), {max_new} tokens; "
        f"verification ms by tree size on this machine: {verify}.",
        "",
        body.strip(),
        "",
        f"Fastest: **{best['drafter']}**, {best['speedup']:.2f}x over plain decoding "
        f"(τ {best['tau']:.2f})"
        + (
            f"; {best['spec_tokens_per_s'] / peers[best_peer]['tokens_per_s']:.2f}x the tokens/s "
            f"of HF's best peer ({best_peer}, {peers[best_peer]['tokens_per_s']:.1f} tok/s)."
            if best_peer
            else "."
        ),
        "",
        "Tuned settings, predicted (cost model + T = 0 replay on the tuning prompts) against "
        "measured (the run above, other prompts):",
        "",
        *tuning,
        "",
        "![speedup against τ](families_speedup_tau.png)",
        "",
        "Drafters trained with:",
        "",
        *(
            f"- `{folder}`: `{json.loads(Path(folder, 'drafter', 'training.json').read_text())['command']}`"
            for _, folder, _ in FAMILIES
        ),
    ]
    text = "\n".join(lines)
    print(text)
    write_section("families", text)


if __name__ == "__main__":
    main(sys.argv[1:])
