"""The tuner's predicted speedup against the speedup ``infer.eval`` measures, on the embedded target.

    python -m benchmarks.tuner_prediction [N_PROMPTS] [MAX_NEW_TOKENS] [REPEATS] [DRAFTER ...]

The tuner (``infer/tune.py``) predicts a setting's speedup from a T = 0 replay (exact τ on the
tuning prompts, the drafter's time measured) and a cost model (verification by tree size and
the loop's own work, timed once at one context length). Nothing else compares that prediction
with a measurement, so per contender this script:

1. tunes it on the eval set's last ``N_PROMPTS`` prompts (as ``infer.eval tune=true`` does,
   ``MAX_NEW_TOKENS`` tokens each), keeping the record in memory (no drafter folder is written);
2. evaluates the chosen settings at T = 0 on those same prompts (``REPEATS`` rotations, the
   median): τ must equal the replay's, so the gap left is the cost model's own error;
3. evaluates them on the set's first ``N_PROMPTS`` prompts (what ``infer.eval tune=true``
   reports): the cost model's error plus the change of prompts.

Contenders: prompt lookup; the draft LM as its recipe initialises it (the target's embeddings,
first 2 layers and head, untrained; built in seconds); the same draft LM after a short
distillation (``TRAIN``: 128 prompts x 64 tokens, 40 steps; a few minutes on one thread, reused
once ``runs/tuner_prediction/draft_lm/drafter`` exists); and any ``DRAFTER`` folders given. The
band (``BAND``) is what this benchmark calls a faithful prediction: measured speedup (prefill
excluded, as the cost model has no prefill) within ``BAND`` of predicted, as a ratio. Writes the
``tuner-prediction`` section of ``benchmarks/results/RESULTS.md``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.results import machine, write_section
from infer.contenders import Entry, load_contenders
from infer.eval import evaluate_many
from infer.tune import tune_drafter, tuning_prompts
from recipes import load_options
from recipes.schema import EvalConfig

BAND = (0.8, 1.25)  # measured / predicted speedup (prefill excluded) called a faithful prediction
OUT = Path("runs/tuner_prediction")
TRAIN = ["recipe=draft_lm", f"output_dir={OUT / 'draft_lm'}", "prompts.limit=128",
         "distill.max_new_tokens=64", "train.steps=40", "train.save_every=40", "train.threads=1",
         "final_eval.limit=0"]  # fmt: skip


def trained_draft_lm() -> str:
    """The briefly distilled draft LM (``TRAIN``), trained first when its folder is missing."""
    import train.drafter as entry

    folder = OUT / "draft_lm" / "drafter"
    if not (folder / "training.json").is_file() and entry.main(TRAIN) != 0:
        raise SystemExit(f"training failed: python train/drafter.py {' '.join(TRAIN)}")
    return str(folder)


def init_draft_lm(folder: Path) -> str:
    """The draft LM recipe's starting point on the embedded target (untrained), saved to
    ``folder``; the folder's path."""
    from models.draft_lm import DraftLM
    from models.drafter import TargetInfo
    from models.target import load_target
    from recipes import load_config

    cfg = load_config(["recipe=draft_lm"])
    target, tokenizer = load_target(cfg.target)
    info = TargetInfo.of(target, tokenizer, cfg.target)
    DraftLM.from_recipe(cfg.drafter, target, info).save_pretrained(folder)
    return str(folder)


def write_prompts(prompts: list, path: Path) -> str:
    """``prompts`` (``data.prompts.Prompt``) as a prompt file ``infer.eval`` reads; its path."""
    rows = [{"id": p.id, "category": p.category, "prompt": p.text} for p in prompts]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def measure(ckpt: str, label: str, options: EvalConfig, tuning_file: str) -> dict:
    """Tune ``ckpt`` on ``options.tune_prompts`` prompts, then evaluate the choice on those
    prompts and on the first ``options.limit``; the predicted and measured figures."""
    from models.drafter import COUNTS_NAME, resolve_drafter_folder
    from models.vocab import read_counts

    started = time.perf_counter()
    target, tokenizer, _, (contender,) = load_contenders([Entry(ckpt)], options)
    counts, command = None, ""
    if ckpt != "prompt-lookup":
        folder = resolve_drafter_folder(ckpt)
        counts = read_counts(folder) if (folder / COUNTS_NAME).is_file() else None
        if (folder / "training.json").is_file():
            command = json.loads((folder / "training.json").read_text()).get("command", "")
    record = tune_drafter(target, tokenizer, contender.drafter, options, False, counts)
    # the choice as the entry's own options; tuned=false: a tuned.json in the folder is ignored
    chosen = ["tuned=false", *(f"{k}={v}" for k, v in record["settings"].items())]
    entry = [Entry(ckpt, label, chosen)]
    same = evaluate_many(entry, replace(options, prompts=tuning_file, limit=0))["drafters"][0]
    other = evaluate_many(entry, options)["drafters"][0]
    figures = {"label": label, "settings": record["settings"], "device": record["device"],
               "predicted_tau": record["predicted"]["tau"],
               "predicted": record["predicted"]["predicted_speedup"],
               "predicted_ms": predicted_ms(record), "measured_ms": measured_ms(same["overall"]),
               "command": command, "seconds": time.perf_counter() - started}  # fmt: skip
    for name, result in (("same", same), ("other", other)):
        overall = result["overall"]
        figures[name] = {k: overall[k] for k in ("tau", "speedup", "speedup_excluding_prefill")}
        figures[name]["range"] = [overall.get("speedup_min"), overall.get("speedup_max")]
    return figures


def predicted_ms(record: dict) -> dict:
    """The milliseconds behind the chosen setting's prediction: a plain decoding step (the cost
    model's), a speculative cycle (predicted speedup = τ x plain step / cycle) and its drafting
    (the replay's timed drafts)."""
    from infer.costs import CostModel

    costs, chosen = CostModel.from_json(record["costs"]), record["predicted"]
    plain = 1000 * costs.plain_token_s()
    cycle = chosen["tau"] * plain / chosen["predicted_speedup"]
    draft = chosen["draft_ms_per_cycle"]
    return {"plain_step": plain, "draft": draft, "verify_and_loop": cycle - draft}


def measured_ms(overall: dict) -> dict:
    """The same milliseconds as ``infer.eval`` measured them (prefill left out)."""
    split = overall["time_split"]
    cycle = 1000 * overall["tau"] / overall["spec_tokens_per_s"]
    draft = cycle * split["draft"] / (1 - split["prefill"])
    return {"plain_step": 1000 / overall["plain_tokens_per_s"], "draft": draft,
            "verify_and_loop": cycle - draft}  # fmt: skip


def within(figures: dict, name: str) -> bool:
    ratio = figures[name]["speedup_excluding_prefill"] / figures["predicted"]
    return BAND[0] <= ratio <= BAND[1]


def report(rows: list[dict], options: EvalConfig, command: str) -> str:
    lines = [
        f"## The tuner's predicted speedup against the measured one (`{command}`)", "",
        f"Machine: {machine()}. Target `{options.target or 'stdlib-llama'}` (fp32, batch 1), "
        f"T = 0, {options.max_new_tokens} new tokens per prompt. Tuned on the eval set's last "
        f"{options.tune_prompts} prompts (`infer.tune`: T = 0 replay + cost model); measured "
        f"by `infer.eval` ({options.repeats} rotations, the median) on those same prompts "
        "(τ must equal the replay's: the gap left is the cost model's) and on the set's first "
        f"{options.limit} (what `infer.eval tune=true` reports). Measured speedup: Spec-Bench's, "
        "prefill excluded (the cost model has none), the prefill-included figure beside it. "
        f"Band: measured / predicted within {BAND[0]}–{BAND[1]}.", "",
        "| contender | chosen settings | predicted τ / speedup | same prompts: τ, speedup "
        "(no prefill), with prefill [range] | ratio | other prompts: τ, speedup (no prefill), "
        "with prefill [range] | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for r in rows:
        chosen = " ".join(f"{k}={v}" for k, v in r["settings"].items()) or "(defaults)"
        cells = [r["label"], chosen, f"{r['predicted_tau']:.2f} / {r['predicted']:.2f}x"]
        for name in ("same", "other"):
            f = r[name]
            spread = " [{:.2f}–{:.2f}]".format(*f["range"]) if f["range"][0] is not None else ""
            cells.append(f"{f['tau']:.2f}, {f['speedup_excluding_prefill']:.2f}x, "
                         f"{f['speedup']:.2f}x{spread}")  # fmt: skip
            ratio = f["speedup_excluding_prefill"] / r["predicted"]
            cells.append(f"{ratio:.2f}" + ("" if within(r, name) else " (outside the band)"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "", "Where the gap comes from, on the tuning prompts: milliseconds predicted by the cost "
        "model (and the replay's timed drafts) against those `infer.eval` measured (its time "
        "split; prefill left out). A plain step's time scales the predicted speedup up as "
        "much as a cycle's scales it down.", "",
        "| contender | plain step | speculative cycle | of which drafting | of which "
        "verification + loop work |", "| --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for r in rows:
        p, m = r["predicted_ms"], r["measured_ms"]
        pairs = [(p["plain_step"], m["plain_step"]),
                 (p["draft"] + p["verify_and_loop"], m["draft"] + m["verify_and_loop"]),
                 (p["draft"], m["draft"]), (p["verify_and_loop"], m["verify_and_loop"])]  # fmt: skip
        cells = [f"{a:.2f} / {b:.2f} ms" for a, b in pairs]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    trained = [f"- {r['label']}: `{r['command']}`" for r in rows if r["command"]]
    if trained:
        lines += ["", "Drafters trained with:", "", *trained]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    n_prompts = int(argv[0]) if argv else 8
    max_new = int(argv[1]) if len(argv) > 1 else 64
    repeats = int(argv[2]) if len(argv) > 2 else 3
    drafters = argv[3:]
    torch.set_num_threads(1)
    options = load_options(EvalConfig, [
        f"limit={n_prompts}", f"tune_prompts={n_prompts}", f"max_new_tokens={max_new}",
        f"repeats={repeats}", "threads=1", "card=false",
    ])  # fmt: skip
    from data.prompts import load_prompts

    tuning = tuning_prompts(load_prompts(options.prompts), n_prompts)
    tuning_file = write_prompts(tuning, OUT / "tuning_prompts.jsonl")
    contenders = [
        ("prompt lookup", "prompt-lookup"),
        ("draft LM at init (untrained)", init_draft_lm(OUT / "draft_lm_init")),
        ("draft LM, 40 steps", trained_draft_lm()),
    ]
    contenders += [(f"`{d}`", d) for d in drafters]  # fmt: skip
    rows = []
    for label, ckpt in contenders:
        rows.append(measure(ckpt, label, options, tuning_file))
        print(json.dumps(rows[-1]), flush=True)
    command = "python -m benchmarks.tuner_prediction " + " ".join(argv)
    text = report(rows, options, command.strip())
    print(text)
    write_section("tuner-prediction", text)


if __name__ == "__main__":
    main(sys.argv[1:])
