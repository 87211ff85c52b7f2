"""Speedup check of a drafter: ``python -m infer.eval CKPT [key=value ...]``.

CKPT is a drafter folder, a Hub id of one, or ``prompt-lookup`` (training-free). The drafter's
``config.json`` names its target (``target=`` overrides; a drafter made for another vocabulary,
width or tokenizer is refused). Every prompt is decoded plainly and speculatively by the same
engine (``infer/decode.py``), alternating which goes first; the report gives τ, acceptance per
draft position, the accepted-length histogram, tokens/s, speedup (prefill included and excluded),
the draft / verify / other time split and the losslessness check, per category and overall.
Outputs in ``out`` (default ``<CKPT>/eval`` for a local drafter, else ``eval-<name>``):
``eval.json``, ``eval.md``, ``acceptance.png``; for a local drafter its model card is updated.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from infer.decode import DecodeResult, check_prompt, decode
from infer.proposers import PromptLookup, StaticTree, proposer_for
from infer.report import PromptRecord, acceptance_png, markdown, report
from models.sampling import Sampling
from recipes import load_options
from recipes.cli import command, summary
from recipes.schema import EvalConfig

NEAR_TIE = 0.125  # top-2 logit gap under which a low-precision mismatch counts as a near-tie


def _load(ckpt: str, options: EvalConfig):
    """(target, tokenizer, drafter or None, display names)."""
    from models.drafter import TargetInfo, load_drafter
    from models.target import load_target
    from recipes.schema import DEFAULT_TARGET

    if ckpt == "prompt-lookup":
        name = options.target or DEFAULT_TARGET
        target, tokenizer = load_target(name, options.dtype.value, options.device)
        return target, tokenizer, None, name
    from models.drafter import read_drafter_config, resolve_drafter_folder

    meta = read_drafter_config(resolve_drafter_folder(ckpt))
    name = options.target or meta["target"]["id"]
    target, tokenizer = load_target(name, options.dtype.value, options.device)
    drafter = load_drafter(ckpt, TargetInfo.of(target, tokenizer, name))
    return target, tokenizer, drafter.to(target.device, target.dtype), name


def spread(prompts: list, limit: int) -> list:
    """The first ``limit`` prompts taken round-robin over categories (0 = all)."""
    if not limit or limit >= len(prompts):
        return prompts
    queues: dict[str, list] = {}
    for p in prompts:
        queues.setdefault(p.category, []).append(p)
    picked, turn = [], 0
    while len(picked) < limit:
        queue = list(queues.values())[turn % len(queues)]
        if queue:
            picked.append(queue.pop(0))
        turn += 1
    return picked


def family_settings(options: EvalConfig) -> dict:
    """The family options (``FAMILY_SETTINGS``) the user changed from their defaults."""
    from infer.proposers import FAMILY_SETTINGS

    defaults = EvalConfig()
    names = {name for names in FAMILY_SETTINGS.values() for name in names}
    return {
        name: getattr(getattr(options, name), "value", getattr(options, name))
        for name in sorted(names)
        if getattr(options, name) != getattr(defaults, name)
    }


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


def _near_tie(target, prompt: list[int], plain: list[int], spec: list[int]) -> bool:
    """Whether the first differing token sits on a top-2 near-tie of the target's logits."""
    at = next(i for i, (a, b) in enumerate(zip(plain + [-1], spec + [-2], strict=False)) if a != b)
    ids = torch.tensor([prompt + plain[:at]], device=target.device)
    with torch.no_grad():
        top2 = target(input_ids=ids).logits[0, -1].float().topk(2).values
    return bool(top2[0] - top2[1] <= NEAR_TIE)


def evaluate(ckpt: str, options: EvalConfig) -> dict:
    from data.prompts import load_prompts, render_prompt

    if options.threads:
        torch.set_num_threads(options.threads)
    sampling = Sampling(options.temperature, options.top_k, options.top_p)
    target, tokenizer, drafter, target_name = _load(ckpt, options)
    num_draft = options.num_draft or (drafter.config["num_draft"] if drafter else 8)

    settings = family_settings(options)

    def make_proposer(seed: int):
        generator = torch.Generator().manual_seed(seed)
        base = (
            proposer_for(drafter, num_draft, sampling, generator, **settings)
            if drafter is not None
            else PromptLookup(num_draft)
        )
        return StaticTree(base, options.tree_width) if options.proposer.value == "tree" else base

    prompts = spread(load_prompts(options.prompts), options.limit)
    encoded = []
    for p in prompts:
        ids = tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
        check_prompt(target, ids, options.max_new_tokens)
        encoded.append(ids)
    eos = tokenizer.eos_token_id
    decode(target, encoded[0][:8], 4, eos, sampling, make_proposer(0))  # warm-up
    records, confidences = [], []
    for i, (p, ids) in enumerate(tqdm(list(zip(prompts, encoded, strict=True)), desc="eval")):
        runs: dict[str, DecodeResult] = {}
        for mode in ("plain", "spec") if i % 2 == 0 else ("spec", "plain"):
            proposer = make_proposer(options.seed + i) if mode == "spec" else None
            generator = torch.Generator().manual_seed(options.seed + i)
            runs[mode] = decode(
                target, ids, options.max_new_tokens, eos, sampling, proposer, generator,
                options.attention.value,
            )  # fmt: skip
            confidences += getattr(proposer, "calibration", [])
        identical = runs["plain"].tokens == runs["spec"].tokens if sampling.greedy else None
        near_tie = None
        if identical is False:
            near_tie = _near_tie(target, ids, runs["plain"].tokens, runs["spec"].tokens)
        records.append(PromptRecord(p.category, runs["plain"], runs["spec"], identical, near_tie))
    result = report(records, num_draft)
    if confidences:
        result["calibration"] = calibration_report(confidences)
    result["settings"] = {
        "drafter": ckpt, "target": target_name, "proposer": options.proposer.value,
        "num_draft": num_draft, "prompts": options.prompts, "n_prompts": len(prompts),
        **{k: getattr(v, "value", v) for k, v in asdict(options).items()
           if k not in ("target", "prompts", "out", "proposer", "num_draft")},
        "device": torch.cuda.get_device_name() if target.device.type == "cuda" else
                  f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "python": platform.python_version()},
    }  # fmt: skip
    if options.compare:
        from infer.peers import run_peers

        ours = [r.spec.tokens for r in records]
        result["peers"] = run_peers(
            target, getattr(drafter, "lm", None), encoded, ours,
            options.max_new_tokens, eos, tokenizer.pad_token_id, sampling,
        )  # fmt: skip
    return result


def write_outputs(result: dict, ckpt: str, options: EvalConfig) -> Path:
    local = Path(ckpt).is_dir()
    out = Path(options.out or (Path(ckpt) / "eval" if local else f"eval-{Path(ckpt).name}"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(result))
    acceptance_png(result, out / "acceptance.png")
    if local and options.card and (Path(ckpt) / "config.json").is_file():
        from models.hub import write_model_card

        overall = result["overall"]
        card = {k: v for k, v in overall.items() if not isinstance(v, dict | list)}
        card.update({f"setting.{k}": v for k, v in result["settings"].items()
                     if not isinstance(v, dict)})  # fmt: skip
        (Path(ckpt) / "eval.json").write_text(json.dumps(card, indent=2) + "\n")
        write_model_card(ckpt)
    return out


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
    options = load_options(EvalConfig, argv[1:])
    started = time.perf_counter()
    result = evaluate(argv[0], options)
    out = write_outputs(result, argv[0], options)
    print(markdown(result))
    overall = result["overall"]
    wrote = {
        "report": out / "eval.md",
        "figures": out / "eval.json",
        "plot": out / "acceptance.png",
    }
    if (Path(argv[0]) / "eval.json").is_file() and options.card:
        wrote["model card"] = Path(argv[0]) / "README.md"
    summary(
        f"evaluated {argv[0]} on {result['settings']['n_prompts']} prompts in "
        f"{time.perf_counter() - started:.0f}s",
        wrote,
        f"tau {overall['tau']:.2f}, speedup {overall['speedup']:.2f}x",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
