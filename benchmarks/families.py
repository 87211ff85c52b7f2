"""Every drafter family on one target in one run, tuned to this machine and not.

    python -m benchmarks.families [N_PROMPTS] [MAX_NEW_TOKENS] [TUNE_PROMPTS] [TARGET] [ONLY]

TARGET is ``stdlib-llama`` (the embedded default) or ``smollm2-135m-instruct`` (``SETUPS``).
ONLY, a comma-separated list of family labels, runs those families (and prompt lookup) alone,
into a section and plot of their own (``families-<labels>``), e.g. a newly added family.

1. Each family's drafter is reused when its folder holds a finished drafter, else trained with
   its recipe on the target's shared distillation data (the command is the setup's ``train`` +
   the family's overrides).
2. Each is tuned on this machine (``infer/tune.py``: cost curve, T = 0 replay of its settings
   grid on the eval set's last ``TUNE_PROMPTS`` prompts), which writes its ``tuned.json``.
3. One ``infer.eval`` run (``evaluate_many``, the target in the setup's dtype) at T = 0 on the
   set's first ``N_PROMPTS`` prompts: every drafter tuned and with its defaults, D²SD with the
   paper's defaults (K = 4, the deepest branches its VP block allows), prompt lookup, plain
   decoding and the Hugging Face peers, all on the same prompts with the order rotated per
   prompt; then, where the setup asks for it, one more run at T = 1 with the tuned drafters.

Writes the setup's section of ``benchmarks/results/RESULTS.md`` (the comparisons, the tuned choices
with predicted against measured speedup) and its speedup-against-τ plot; every drafter folder
gets its comparison row and tuned settings in its model card.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.results import RESULTS_DIR, machine, write_section
from infer.contenders import Entry
from infer.eval import comparison_rows, evaluate_many, write_comparison
from infer.report import comparison_markdown
from infer.tune import record_measured, tune, verify_ms
from recipes import load_options
from recipes.schema import EvalConfig


@dataclass
class Setup:
    """One target's comparison: its eval prompt set, how its drafters are trained (``train`` +
    each family's overrides; trained when the folder holds no finished drafter), and which
    temperatures are measured (T = 1 with the tuned drafters only)."""

    prompts: str
    train: str
    families: list  # (label, folder, recipe and overrides)
    temperatures: tuple = (0.0,)
    section: str = "families"
    plot: str = "families_speedup_tau.png"
    dtype: str = "float32"  # the target's (and drafters') dtype in tuning and evaluation


SMOL = "smollm2-135m-instruct"
# one dataset for every family: cached top-8 logprobs (draft LM) and the hidden states of layers
# 2, 15, 28 (dflash) and 30 (= the final norm: heads), so no training step runs the target
SMOL_DATA = ("distill.out=runs/smollm2/data distill.topk_logprobs=8 "
             "distill.hidden_layers=[2,15,28,30] final_eval.limit=0")  # fmt: skip
SETUPS = {
    "stdlib-llama": Setup(
        "stdlib-eval",
        "python train/drafter.py distill.out=runs/bench_data final_eval.limit=0",
        [
            ("draft LM", "runs/draft_lm_small", "recipe=draft_lm"),
            ("dflash B=8", "runs/dflash_b8", "recipe=dflash drafter.block_size=8"),
            ("deer B=16", "runs/deer", "recipe=deer"),
            ("d2sd", "runs/d2sd_v2", "recipe=d2sd"),
            ("medusa", "runs/medusa", "recipe=medusa train.steps=80 train.batch_size=8"),
            ("hydra++", "runs/hydra_pp", "recipe=hydra drafter.variant=hydra++ train.steps=80 "
             "train.batch_size=8"),
            ("falcon", "runs/falcon", "recipe=falcon train.steps=80 train.batch_size=8"),
            ("hidden transfer", "runs/hidden_transfer",
             "recipe=hidden_transfer train.steps=80 train.batch_size=8"),
            ("eagle3", "runs/eagle3", "recipe=eagle3"),
        ],
        temperatures=(0.0, 1.0),
    ),
    SMOL: Setup(
        "chat-eval",
        f"python train/drafter.py target={SMOL} {SMOL_DATA}",
        [
            ("draft LM", "runs/smollm2/draft_lm", "recipe=draft_lm drafter.loss=fkl_topk"),
            # block drafters read the cached layers (0-based decoder layers 1, 14, 27 are the
            # HF hidden-state indices 2, 15, 28); 8 blocks per sequence keep a step short
            ("dflash B=8", "runs/smollm2/dflash", "recipe=dflash drafter.block_size=8 "
             "drafter.num_anchors=8 drafter.target_layers=[1,14,27] train.steps=180"),
            ("medusa", "runs/smollm2/medusa", "recipe=medusa drafter.loss=ce train.steps=60"),
            ("hidden transfer", "runs/smollm2/hidden_transfer",
             "recipe=hidden_transfer train.steps=60"),
            # falcon, hydra++ (fkl) and d2sd (its confidence target) run the target online
            ("falcon", "runs/smollm2/falcon", "recipe=falcon train.steps=50 drafter.csgd_steps=50"),
            ("hydra++", "runs/smollm2/hydra_pp", "recipe=hydra drafter.variant=hydra++ "
             "train.steps=40"),
            ("d2sd", "runs/smollm2/d2sd", "recipe=d2sd drafter.num_anchors=8 "
             "drafter.target_layers=[1,14,27] train.steps=40"),
        ],
        temperatures=(0.0, 1.0),
        section="families-smollm2",
        plot="families_smollm2_speedup_tau.png",
        # on this CPU (AVX512-BF16) verification is far cheaper in bfloat16: 9 tokens cost 1.2x
        # a one-token step against 1.6x in float32 (``python -m benchmarks.verify_cost``)
        dtype="bfloat16",
    ),
}  # fmt: skip
DEFAULT_SECTIONS = {setup.section for setup in SETUPS.values()}


def ensure_trained(train: str, folder: str, recipe: str) -> str:
    """The drafter folder of ``folder``, trained first (``train`` + ``recipe``) when it holds no
    finished drafter."""
    drafter = Path(folder) / "drafter"
    if not (drafter / "config.json").is_file():
        command = f"{train} {recipe} output_dir={folder}"
        print(f"training: {command}", flush=True)
        subprocess.run(command.split(), check=True)
    return str(drafter)


def tuned(ckpt: str, options) -> dict:
    """The drafter's ``tuned.json`` when it was tuned on this machine with these tuning prompts
    and length (a rerun after an interruption), else a fresh tuning."""
    path = Path(ckpt, "tuned.json")
    if path.is_file():
        record = json.loads(path.read_text())
        same = {"set": options.prompts, "n": options.tune_prompts,
                "max_new_tokens": options.max_new_tokens}  # fmt: skip
        here = device_name_here(options.dtype.value)
        if record.get("prompts") == same and record.get("device") == here:
            print(f"reusing {path} (tuned {record['tuned_at']})", flush=True)
            return record
    return tune(ckpt, options)


def device_name_here(dtype: str) -> str:
    """``infer.costs.device_name`` of the device a target of ``dtype`` would load on here."""
    from types import SimpleNamespace

    import torch

    from infer.costs import device_name

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device_name(SimpleNamespace(device=device, dtype=getattr(torch, dtype)))


def main(argv: list[str]) -> None:
    n_prompts = int(argv[0]) if argv else 16
    max_new = int(argv[1]) if len(argv) > 1 else 64
    tune_prompts = int(argv[2]) if len(argv) > 2 else 8
    target = argv[3] if len(argv) > 3 else "stdlib-llama"
    setup = SETUPS[target]
    if len(argv) > 4:
        only = [label.strip() for label in argv[4].split(",")]
        unknown = sorted(set(only) - {label for label, _, _ in setup.families})
        if unknown:
            raise SystemExit(f"unknown families {unknown}: {[f[0] for f in setup.families]}")
        slug = "-".join(label.split()[0].lower().strip("+") for label in only)
        setup = replace(setup, families=[f for f in setup.families if f[0] in only],
                        section=f"{setup.section}-{slug}",
                        plot=setup.plot.replace(".png", f"_{slug}.png"))  # fmt: skip
    base = [f"limit={n_prompts}", f"max_new_tokens={max_new}", f"tune_prompts={tune_prompts}",
            f"prompts={setup.prompts}", "compare=true", f"out=runs/families_eval/{target}",
            f"dtype={setup.dtype}"]  # fmt: skip
    options = load_options(EvalConfig, base)
    entries, records = [], {}
    for label, folder, recipe in setup.families:
        ckpt = ensure_trained(setup.train, folder, recipe)
        records[label] = tuned(ckpt, options)
        entries.append(Entry(ckpt, f"{label}, tuned"))
        entries.append(Entry(ckpt, f"{label}, defaults", ["tuned=false"]))
        if label == "d2sd":
            config = json.loads(Path(ckpt, "config.json").read_text())
            depth = config["drafter"]["vp"]["block_size"] - 1
            entries.append(Entry(ckpt, f"d2sd, paper defaults (K=4, B₂-1={depth})",
                                 ["tuned=false", "branches=4", f"branch_depth={depth}"]))  # fmt: skip
    lookup = replace(options, target=target)
    records["prompt lookup"] = tune("prompt-lookup", lookup)
    entries.append(Entry("prompt-lookup", "prompt lookup, tuned",
                         [f"{k}={v}" for k, v in records["prompt lookup"]["settings"].items()]))  # fmt: skip
    entries.append(Entry("prompt-lookup", "prompt lookup, defaults"))
    sections = []
    for temperature in setup.temperatures:
        now = replace(options, temperature=temperature)
        ran = entries if temperature == 0 else [e for e in entries if e.label.endswith("tuned")]
        run = evaluate_many(ran, now)
        out = write_comparison(  # eval.json of each temperature in its own folder
            run, ran, replace(now, card=temperature == 0, out=f"{options.out}/t{temperature:g}")
        )
        if temperature == 0:
            shutil.copyfile(out / "speedup_tau.png", RESULTS_DIR / setup.plot)
            measured = {r["settings"]["label"]: r for r in run["drafters"]}
            for result in run["drafters"]:
                if result["settings"]["label"].endswith("tuned"):
                    record_measured(result)
        sections.append((temperature, run))
    text = _report(setup, target, sections, records, measured, tune_prompts, max_new)
    print(text)
    write_section(setup.section, text)


def _report(setup, target, sections, records, measured, tune_prompts, max_new) -> str:
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
    verify = verify_ms(next(iter(records.values()))["costs"])
    which = "Every family"
    if setup.section not in DEFAULT_SECTIONS:  # a subset (ONLY)
        which = "Families " + ", ".join(label for label, _, _ in setup.families)
    lines = [
        f"## {which} on `{target}`, one run per temperature "
        f"(`python -m benchmarks.families ... {target}`)",
        "",
        f"Machine: {machine()}. Target `{target}` ({setup.dtype}, batch 1; the drafters too). "
        f"Tuning: {tune_prompts} held-out prompts (the eval set's last), {max_new} tokens, "
        f"T = 0; verification ms by tree size on this machine: {verify}.",
    ]
    for temperature, run in sections:
        rows = comparison_rows(run)
        best = max(rows, key=lambda r: r["speedup"])
        peers = run.get("peers", {})
        best_peer = max((n for n in peers if n != "HF generate"),
                        key=lambda n: peers[n]["tokens_per_s"], default=None)  # fmt: skip
        body = comparison_markdown({**run, "comparison": rows}).split("\n", 2)[2]
        lines += ["", f"### T = {temperature:g}", "", body.strip(), ""]
        lines.append(
            f"Fastest: **{best['drafter']}**, {best['speedup']:.2f}x over plain decoding "
            f"(τ {best['tau']:.2f})"
            + (f"; {best['spec_tokens_per_s'] / peers[best_peer]['tokens_per_s']:.2f}x the "
               f"tokens/s of HF's best peer ({best_peer}, "
               f"{peers[best_peer]['tokens_per_s']:.1f} tok/s)." if best_peer else ".")
        )  # fmt: skip
    lines += [
        "",
        "Tuned settings, predicted (cost model + T = 0 replay on the tuning prompts) against "
        "measured at T = 0 (other prompts):",
        "",
        *tuning,
        "",
        f"![speedup against τ]({setup.plot})",
        "",
        "Drafters trained with:",
        "",
        *(f"- `{folder}`: {trained_with(folder)}" for _, folder, _ in setup.families),
    ]
    return "\n".join(lines)


def trained_with(folder: str) -> str:
    """The command that trained ``folder``'s drafter (its ``training.json``); a checkpoint
    exported from a run without one (e.g. a learning curve's) says where it comes from."""
    drafter = Path(folder, "drafter")
    record = drafter / "training.json"
    if record.is_file():
        return f"`{json.loads(record.read_text())['command']}`"
    return f"no training.json: `{drafter.resolve()}` (e.g. a learning-curve checkpoint)"


if __name__ == "__main__":
    main(sys.argv[1:])
