"""Speedup check of drafters: ``python -m infer.eval CKPT [CKPT ...] [key=value ...]``.

CKPT is a drafter folder, a Hub id of one, or ``prompt-lookup`` (training-free). The drafters'
``config.json`` name their target, which must be the same for all (``target=`` overrides; a
drafter made for another vocabulary, width or tokenizer is refused). Every prompt is decoded
plainly once and by every drafter once, by the same engine (``infer/decode.py``), the order
rotated from prompt to prompt; the report gives τ, acceptance per draft position, the
accepted-length histogram, tokens/s, speedup (Spec-Bench's headline definition, prefill included
and excluded, with the mean of per-prompt time ratios beside it), the draft / verify / other time
split and the losslessness check, per category and overall.

A drafter folder's ``tuned.json`` (``tune=true``: ``infer/tune.py`` measures this device's costs
and the drafter's acceptance and picks the drafting settings) is used unless ``tuned=false``;
options you set win over it.

Outputs in ``out``: for one drafter (default ``<CKPT>/eval`` for a local drafter, else
``eval-<name>``) ``eval.json``, ``eval.md``, ``acceptance.png``; for several (default
``eval-compare``) ``eval.json``, ``eval.md`` and ``speedup_tau.png``. A local drafter's model
card is updated (with its comparison row when compared with others).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from infer.contenders import PER_DRAFTER, Entry, costs_for, load_contenders, spread
from infer.costs import device_name
from infer.decode import DecodeResult, check_prompt, decode
from infer.proposers import NEEDS_COSTS
from infer.report import (
    PromptRecord,
    acceptance_png,
    comparison_markdown,
    lossless_text,
    markdown,
    report,
    specbench_speedup,
    speedup_tau_png,
)  # fmt: skip
from models.sampling import Sampling
from recipes import load_options
from recipes.cli import check_folder, command, summary
from recipes.schema import EvalConfig


def calibration_report(confidences: list) -> dict:
    """Per-slot calibration (``models/calibration.py``) of the head's and the softmax's
    confidence against drafter 1's realised prefix acceptance at T = 0."""
    from models.calibration import slot_calibration

    head = torch.stack([h for h, _, _ in confidences])
    soft = torch.stack([s for _, s, _ in confidences])
    hits = torch.stack([a for _, _, a in confidences])
    out = {"cycles": int(hits.shape[0])}
    for name, c in (("head", head), ("softmax", soft)):
        rows = slot_calibration(c, hits)
        out[name] = {
            "per_slot": rows,
            "mean_ece": sum(r["ece"] for r in rows) / len(rows),
            "mean_brier": sum(r["brier"] for r in rows) / len(rows),
        }
    return out


def _parting_gap(target, prompt: list[int], plain: list[int], spec: list[int]) -> float:
    """The target's top-2 logit gap at the first token where the two runs differ."""
    at = next(i for i, (a, b) in enumerate(zip(plain + [-1], spec + [-2], strict=False)) if a != b)
    ids = torch.tensor([prompt + plain[:at]], device=target.device)
    with torch.no_grad():
        top2 = target(input_ids=ids, logits_to_keep=1).logits[0, -1].float().topk(2).values
    return float(top2[0] - top2[1])


def evaluate_many(entries: list[Entry], options: EvalConfig, explicit=()) -> dict:
    """Every contender and plain decoding on the same prompts in one run: per prompt, plain
    decoding once and each contender once, the order rotated from prompt to prompt. Returns
    ``{"drafters": [report per contender], "settings": {...}, "peers": {...}}``; each report
    has the shape of ``evaluate``'s, against the shared plain runs."""
    from data.prompts import encode_prompt, load_prompts

    if options.threads:
        torch.set_num_threads(options.threads)
    sampling = Sampling(options.temperature, options.top_k, options.top_p)
    target, tokenizer, target_name, contenders = load_contenders(entries, options, explicit)
    for c in contenders:
        if any(c.settings().get(name) for name in NEEDS_COSTS):
            c.costs = costs_for(c, target)
    prompts = spread(load_prompts(options.prompts), options.limit)
    encoded = []
    for p in prompts:
        ids = encode_prompt(tokenizer, p)
        check_prompt(target, ids, options.max_new_tokens)
        encoded.append(ids)
    eos = tokenizer.eos_token_id
    for c in contenders:  # warm-up
        decode(target, encoded[0][:8], 4, eos, sampling, c.proposer(sampling, 0))
    records = {c.label: [] for c in contenders}
    rotations = {c.label: [[] for _ in range(options.repeats)] for c in contenders}
    confidences = {c.label: [] for c in contenders}
    order = [None, *contenders]  # None: plain decoding
    work = [(rep, i, p, ids) for rep in range(options.repeats)
            for i, (p, ids) in enumerate(zip(prompts, encoded, strict=True))]  # fmt: skip
    for rep, i, p, ids in tqdm(work, desc="eval"):
        turn = (i + rep) % len(order)
        runs: dict[str | None, DecodeResult] = {}
        for c in order[turn:] + order[:turn]:
            proposer = c.proposer(sampling, options.seed + i) if c is not None else None
            generator = torch.Generator().manual_seed(options.seed + i)
            runs[c.label if c else None] = decode(
                target, ids, options.max_new_tokens, eos, sampling, proposer, generator,
                options.attention.value,
            )  # fmt: skip
            if c is not None:
                confidences[c.label] += getattr(proposer, "calibration", [])
        plain = runs[None]
        for c in contenders:
            spec = runs[c.label]
            identical = plain.tokens == spec.tokens if sampling.greedy else None
            gap = None
            if identical is False:
                gap = _parting_gap(target, ids, plain.tokens, spec.tokens)
            records[c.label].append(PromptRecord(p.category, plain, spec, identical, gap))
            rotations[c.label][rep].append(records[c.label][-1])
    shared = {
        "target": target_name, "prompts": options.prompts, "n_prompts": len(prompts),
        **{k: getattr(v, "value", v) for k, v in asdict(options).items()
           if k not in ("target", "prompts", "out", *PER_DRAFTER)},
        "device": device_name(target),
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "python": platform.python_version()},
    }  # fmt: skip
    results = []
    for c in contenders:
        result = report(records[c.label], c.num_draft)
        if options.repeats > 1:  # the median rotation's speedup, and the range
            speeds = [specbench_speedup(r) for r in rotations[c.label]]
            result["overall"].update(speedup=statistics.median(speeds), speedup_repeats=speeds,
                                     speedup_min=min(speeds), speedup_max=max(speeds))  # fmt: skip
            for figures in [result["overall"], *result["per_category"].values()]:
                figures["prompts"] //= options.repeats  # prompts; lossless counts every run
        if confidences[c.label]:
            result["calibration"] = calibration_report(confidences[c.label])
        result["settings"] = {
            "drafter": c.ckpt, "label": c.label, "family": c.family,
            "proposer": c.options.proposer.value, "num_draft": c.num_draft,
            "drafting": c.describe(), **c.settings(), **shared,
        }  # fmt: skip
        if c.tuned:
            result["settings"]["tuned_on"] = c.tuned.get("device", "")
        results.append(result)
    out = {"drafters": results, "settings": shared}
    if options.compare:
        from infer.peers import run_peers

        draft_lm = next((c.drafter.lm for c in contenders if c.family == "draft_lm"), None)
        ours = [r.spec.tokens for r in records[contenders[0].label]]
        out["peers"] = run_peers(
            target, draft_lm, encoded, ours, options.max_new_tokens, eos,
            tokenizer.pad_token_id, sampling,
        )  # fmt: skip
        out["peers_plain_tokens_per_s"] = results[0]["overall"]["plain_tokens_per_s"]
    return out


def evaluate(ckpt: str | Entry, options: EvalConfig, explicit=()) -> dict:
    """The report of one drafter against plain decoding (``evaluate_many`` of one)."""
    run = evaluate_many([ckpt if isinstance(ckpt, Entry) else Entry(ckpt)], options, explicit)
    result = run["drafters"][0]
    if "peers" in run:
        result["peers"] = run["peers"]
    return result


def comparison_rows(run: dict) -> list[dict]:
    """One row per contender (overall figures), the contenders' order."""
    rows = []
    for result in run["drafters"]:
        overall, meta = result["overall"], result["settings"]
        rows.append({
            "drafter": meta["label"], "family": meta["family"], "drafting": meta["drafting"],
            **{k: overall[k] for k in ("tau", "speedup", "speedup_ratio_mean",
                                       "speedup_excluding_prefill", "spec_tokens_per_s",
                                       "plain_tokens_per_s")},
            "lossless": lossless_text(overall["lossless"]),
            "speedup_range": [overall[k] for k in ("speedup_min", "speedup_max") if k in overall],
            "time_split": overall["time_split"],
            "per_category": {c: {"tau": f["tau"], "speedup": f["speedup"]}
                             for c, f in result["per_category"].items()},
        })  # fmt: skip
    return rows


def write_outputs(result: dict, ckpt: str, options: EvalConfig) -> Path:
    local = Path(ckpt).is_dir()
    out = Path(options.out or (Path(ckpt) / "eval" if local else f"eval-{Path(ckpt).name}"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(result))
    acceptance_png(result, out / "acceptance.png")
    if local and options.card and (Path(ckpt) / "config.json").is_file():
        _card(Path(ckpt), result)
    return out


def _card(folder: Path, result: dict, comparison: list[dict] | None = None) -> None:
    """The drafter folder's measured figures (``eval.json``, and ``comparison.json`` when it
    was compared with others in one run), then its model card."""
    from models.hub import write_model_card

    overall = result["overall"]
    card = {k: v for k, v in overall.items() if not isinstance(v, dict | list)}
    card.update({f"setting.{k}": v for k, v in result["settings"].items()
                 if not isinstance(v, dict)})  # fmt: skip
    (folder / "eval.json").write_text(json.dumps(card, indent=2) + "\n")
    if comparison is not None:
        label = result["settings"]["label"]
        rows = [{k: v for k, v in row.items() if k not in ("time_split", "per_category")}
                | {"this drafter": row["drafter"] == label} for row in comparison]  # fmt: skip
        meta = result["settings"]
        record = {"rows": rows, "device": meta["device"], "prompts": meta["prompts"],
                  "n_prompts": meta["n_prompts"], "max_new_tokens": meta["max_new_tokens"],
                  "temperature": meta["temperature"]}  # fmt: skip
        (folder / "comparison.json").write_text(json.dumps(record, indent=2) + "\n")
    write_model_card(folder)


def write_comparison(run: dict, entries: list[Entry], options: EvalConfig) -> Path:
    """``eval.json``, ``eval.md`` and ``speedup_tau.png`` of a multi-drafter run in ``out``
    (default ``eval-compare``); every local drafter's folder gets its row and model card."""
    out = Path(options.out or "eval-compare")
    out.mkdir(parents=True, exist_ok=True)
    run = {**run, "comparison": comparison_rows(run)}
    (out / "eval.json").write_text(json.dumps(run, indent=2) + "\n")
    (out / "eval.md").write_text(comparison_markdown(run))
    speedup_tau_png(run, out / "speedup_tau.png")
    if options.card:  # a folder's first entry gives its eval.json (tuned, when it is)
        done = set()
        for entry, result in zip(entries, run["drafters"], strict=True):
            folder = Path(entry.ckpt)
            if folder not in done and (folder / "config.json").is_file():
                _card(folder, result, run["comparison"])
                done.add(folder)
    return out


def preflight(ckpts: list[str], options: EvalConfig) -> None:
    """What can refuse a run, checked before any target or drafter weights load: every drafter
    folder (its config fields and weights file; a Hub id is downloaded), the ``target=`` named,
    the prompt set read whole, and the output folder."""
    from data.prompts import load_prompts
    from models.drafter import read_drafter_config, resolve_drafter_folder
    from models.target import read_target

    if not ckpts:
        raise ValueError("no drafter to evaluate: give one or more CKPT (or prompt-lookup)")
    for ckpt in ckpts:
        if ckpt != "prompt-lookup":
            read_drafter_config(resolve_drafter_folder(ckpt))
    if options.target:
        read_target(options.target)
    load_prompts(options.prompts)
    if len(ckpts) > 1:
        check_folder(options.out or "eval-compare", "out")
    elif Path(ckpts[0]).is_dir() or options.out:
        check_folder(options.out or Path(ckpts[0]) / "eval", "out")


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(checkpoints, key=value options): checkpoints come first."""
    ckpts = [a for a in argv if "=" not in a]
    items = [a for a in argv if "=" in a]
    if argv[: len(ckpts)] != ckpts:
        raise ValueError(f"checkpoints come before the options: got {' '.join(argv)}")
    return ckpts, items


@command
def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(
            "options (key=value):",
            ", ".join(
                f"{f.name}={getattr(f.default, 'value', f.default)}" for f in fields(EvalConfig)
            ),
        )
        return 0 if argv else 2
    ckpts, items = _split_argv(argv)
    options = load_options(EvalConfig, items)
    explicit = {item.split("=", 1)[0] for item in items}
    preflight(ckpts, options)
    started = time.perf_counter()
    records = {}  # the settings just tuned: evaluated even where no tuned.json can be written
    if options.tune:
        from infer.tune import tune

        records = {ckpt: tune(ckpt, options, explicit) for ckpt in ckpts}
    entries = [Entry(ckpt, tuned=records.get(ckpt)) for ckpt in ckpts]
    if len(entries) == 1:
        result = evaluate(entries[0], options, explicit)
        run = {"drafters": [result], "settings": result["settings"]}
        out = write_outputs(result, ckpts[0], options)
        print(markdown(result))
        wrote = {"report": out / "eval.md", "figures": out / "eval.json",
                 "plot": out / "acceptance.png"}  # fmt: skip
        details = f"tau {result['overall']['tau']:.2f}, speedup {result['overall']['speedup']:.2f}x"
    else:
        run = evaluate_many(entries, options, explicit)
        out = write_comparison(run, entries, options)
        print((out / "eval.md").read_text())
        wrote = {"report": out / "eval.md", "figures": out / "eval.json",
                 "plot": out / "speedup_tau.png"}  # fmt: skip
        top = max(run["drafters"], key=lambda r: r["overall"]["speedup"])
        details = (f"fastest: {top['settings']['label']} (tau {top['overall']['tau']:.2f}, "
                   f"speedup {top['overall']['speedup']:.2f}x)")  # fmt: skip
    if options.tune:
        from infer.tune import record_measured

        for result in run["drafters"]:
            record_measured(result)
    if options.card:
        wrote |= {f"model card ({c})": Path(c) / "README.md" for c in ckpts
                  if (Path(c) / "eval.json").is_file()}  # fmt: skip
    summary(
        f"evaluated {', '.join(ckpts)} on {run['settings']['n_prompts']} prompts in "
        f"{time.perf_counter() - started:.0f}s",
        wrote,
        details,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
