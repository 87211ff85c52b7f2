"""Train a drafter: ``accelerate launch train/drafter.py recipe=NAME [key=value ...]``.

Builds, from the recipe: the frozen target, the drafter (by registered ``drafter.type``), the
distillation dataset and the objective, then runs the one training loop under the configured
topology. Outputs in ``output_dir``: ``checkpoints/`` (resume), ``log.jsonl``, and ``drafter/``
(Hugging Face format: ``config.json``, ``model.safetensors``, ``training.json``, ``README.md``),
pushed to the Hub when ``hub.repo_id`` is set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from enum import Enum
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data.distill import dataset_dir, ensure_dataset
from models.drafter import TargetInfo, build_drafter
from models.target import load_target, target_fingerprint
from models.vocab import response_token_counts, write_counts
from recipes import available_recipes, load_config
from recipes.cli import apply_threads, command, summary
from recipes.schema import Config
from train.batches import MicroBatches, collate, load_rows, teacher_signals
from train.engine import Topology, init_distributed, make_engine, resolve_topology, shard_target
from train.heldout import heldout_metrics, split_heldout
from train.loop import run_loop
from train.preflight import preflight
from train.tracking import start_wandb

USAGE = """usage: accelerate launch train/drafter.py recipe=NAME [key=value ...]

recipes: {recipes}
common overrides: target=NAME_OR_PATH  target_dtype=bfloat16  train.lr=1e-4  output_dir=DIR
the full schema with defaults: recipes/schema.py; recipe files: recipes/recipe/*.yaml"""

# settings that change what a run computes; resuming with any of them changed is refused
RESUME_KEYS = ("seed", "target_dtype", "drafter", "train.steps", "train.batch_size",
               "train.grad_accum", "train.lr", "train.min_lr_ratio", "train.warmup_steps",
               "train.weight_decay", "train.grad_clip", "train.max_seq_len")  # fmt: skip


def plain(value):
    """Config dataclasses/enums -> JSON-able values."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        return {
            k: v for key, sub in value.items() for k, v in _flatten(f"{prefix}.{key}", sub).items()
        }
    return {prefix: value}


def fingerprint(cfg: Config, target, tokenizer_sha: str, data_dir: Path, topo: Topology) -> dict:
    """Flat dict of what a resumed run must share with the checkpoint."""
    tree = plain(cfg)
    found = {"recipe": cfg.recipe, "topology": topo.kind, "world_size": topo.world}
    for key in RESUME_KEYS:
        node = tree
        for part in key.split("."):
            node = node[part]
        found.update(_flatten(key, node))
    target_fp = target_fingerprint(target, cfg.target)
    found.update({f"target.{k}" if k != "target" else "target": v for k, v in target_fp.items()})
    found["tokenizer_sha256"] = tokenizer_sha
    manifest = (data_dir / "manifest.json").read_bytes()
    found["dataset.manifest_sha256"] = hashlib.sha256(manifest).hexdigest()
    return found


def train_drafter(cfg: Config, target, tokenizer, topo: Topology, device, command: str) -> Path:
    """Train ``cfg.drafter.type`` on the dataset at ``distill.out``, stage by stage (most
    families have one stage; see ``Drafter.stages``); returns the drafter folder (written by
    process 0 when training finished; unchanged when SIGTERM stopped it)."""
    out_dir, data_dir = Path(cfg.output_dir), dataset_dir(cfg)
    info = TargetInfo.of(target, tokenizer, cfg.target)
    torch.manual_seed(cfg.seed)  # the same initial drafter on every process
    drafter = build_drafter(cfg.drafter, target, tokenizer, cfg.target, cfg.recipe)
    n_train = sum(p.numel() for p in drafter.parameters() if p.requires_grad)
    rows, manifest = load_rows(data_dir)
    # held-out rows: the family's own need (D²SD calibrates on them), else up to a quarter of
    # the rows for the held-out metrics (``train/heldout.py``); whole source modules go
    n_heldout = drafter.heldout_rows()
    if n_heldout >= len(rows):
        raise ValueError(
            f"drafter.heldout_rows={n_heldout}: the dataset has only {len(rows)} rows; "
            "hold out fewer or build more (prompts.limit)"
        )
    n_heldout = n_heldout or min(cfg.drafter.heldout_rows, len(rows) // 4)
    kept, held = split_heldout([str(s) for s in rows["source_id"]], n_heldout)
    if len(kept) < cfg.train.batch_size:  # a few modules hold every row: the last rows instead
        kept, held = (
            list(range(len(rows) - n_heldout)),
            list(range(len(rows) - n_heldout, len(rows))),
        )
    train_rows = rows.select(kept) if held else rows
    counts = response_token_counts(train_rows, info.vocab_size)
    drafter.fit_data(counts)  # e.g. EAGLE-3's draft vocabulary (restored again on resume)
    heldout_rows = [rows[i] for i in held]
    n_heldout = len(held)
    hidden_layers = manifest["teacher_signals"]["hidden_layers"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    micro_batches = MicroBatches(
        train_rows, cfg.train.batch_size, cfg.seed, topo.rank, topo.world, pad_id,
        cfg.train.max_seq_len, hidden_layers, cfg.train.grad_accum,
    )  # fmt: skip
    stamp = fingerprint(cfg, target, info.tokenizer_sha256, data_dir, topo)
    if cfg.train.shard_target:
        full = sum(p.numel() for p in target.parameters())
        target = shard_target(topo, target)
        held = sum(p.ds_tensor.numel() for p in target.module.parameters())
        print(f"target sharded with ZeRO-3: process {topo.rank} holds {held} of {full} weights")
    if topo.rank == 0:
        print(
            f"drafter {cfg.drafter.type}: {n_train / 1e6:.2f}M trainable parameters, "
            f"loss {cfg.drafter.loss.value}, topology {topo.kind} x{topo.world}, "
            f"mixed precision {topo.mixed_precision}; {len(train_rows)} rows"
            + (f" (+{n_heldout} held out)" if n_heldout else "")
        )

    def heldout(module):
        for i in range(0, len(heldout_rows), cfg.train.batch_size):
            part = heldout_rows[i : i + cfg.train.batch_size]
            batch = collate(part, pad_id, cfg.train.max_seq_len, hidden_layers).to(device)
            yield batch, teacher_signals(target, batch, module)

    on_log, finish = None, lambda: None
    if topo.rank == 0:
        on_log, finish = start_wandb(cfg.wandb, out_dir.name, plain(cfg), out_dir)
    folder, weights, results = out_dir / "drafter", {}, {}
    names = {id(m): name for name, m in drafter.named_modules()}
    try:
        for stage in drafter.stages():
            module = stage.module
            train_cfg = dataclasses.replace(cfg.train, steps=stage.steps or cfg.train.steps)
            engine = make_engine(
                topo, module, train_cfg, device, cfg.train.batch_size // topo.world
            )
            if stage.name and topo.rank == 0:
                print(f"stage {stage.name}: {train_cfg.steps} steps")

            def loss_fn(model, batch, module=module):
                batch = module.prepare_batch(batch.to(device))
                teacher = teacher_signals(target, batch, module)
                output = model(batch, teacher)  # under the engine's autocast (bf16 matmuls)
                with torch.autocast(device.type, enabled=False):  # losses in float32
                    return module.objective(output, batch, teacher)

            def evaluate(model):  # the chain walk on the held-out rows
                return heldout_metrics(model, heldout(model))

            result = run_loop(
                train_cfg, engine, loss_fn, micro_batches, module.loss_positions, out_dir,
                evaluate=evaluate if heldout_rows else None,
                fingerprint={**stamp, "stage": stage.name}, on_log=on_log, stage=stage.name,
            )  # fmt: skip
            if result.interrupted:
                return folder
            prefix = names[id(module)] + "." if names[id(module)] else ""
            with engine.full_parameters():
                extra = drafter.after_stage(stage.name, heldout(module))
                state = module.export_state_dict()
                weights.update({prefix + k: v.detach().cpu().clone() for k, v in state.items()})
            results[stage.name] = (result, extra)
    finally:
        finish()
    if topo.rank == 0:
        drafter.save_pretrained(folder, state_dict=weights)
        write_counts(folder, counts)  # what draft_vocab= reads: the training rows' responses
        summary = training_summary(cfg, command, manifest, results, topo)
        summary["data"]["heldout_rows"] = n_heldout
        summary["data"]["train_response_tokens"] = int(counts.sum())
        summary["metrics"]["num_draft"] = drafter.config.get("num_draft", cfg.drafter.num_draft)
        (folder / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    engine.barrier()
    return folder


def training_summary(cfg: Config, command: str, manifest: dict, results: dict, topo) -> dict:
    """``results``: stage name -> (LoopResult, after_stage figures); the headline metrics are
    the first stage's (the drafter that drafts first), the time and tokens the whole run's."""
    result = next(iter(results.values()))[0]
    metrics = {
        "steps": result.step,
        "tokens": sum(r.tokens for r, _ in results.values()),
        "seconds": round(sum(r.seconds for r, _ in results.values()), 1),
        "train_loss": result.train_loss,
        "top1_agreement": result.metrics.get("top1"),
        # the chain walk on held-out rows (``train/heldout.py``); None for families without one
        "heldout_tau": result.eval_metrics.get("heldout_tau"),
        "num_draft": cfg.drafter.num_draft,
        "topology": topo.kind,
        "world_size": topo.world,
        "mixed_precision": topo.mixed_precision,
    }
    if len(results) > 1 or any(extra for _, extra in results.values()):
        metrics["stages"] = {
            name: {"steps": r.step, "seconds": round(r.seconds, 1), "train_loss": r.train_loss,
                   "top1_agreement": r.metrics.get("top1"),
                   "heldout_tau": r.eval_metrics.get("heldout_tau"),
                   **extra}
            for name, (r, extra) in results.items()
        }  # fmt: skip
    data = {
        "prompts": manifest["prompts"]["source"],
        "rows": manifest["rows"],
        "response_tokens": manifest["response_tokens"],
        "temperature": manifest["generation"]["temperature"],
        "max_new_tokens": manifest["generation"]["max_new_tokens"],
        "manifest_sha256": hashlib.sha256(
            json.dumps(manifest, sort_keys=True).encode()
        ).hexdigest(),
    }
    return {"recipe": cfg.recipe, "command": command, "config": plain(cfg), "data": data,
            "metrics": metrics}  # fmt: skip


def publish(cfg: Config, folder: Path) -> None:
    """Write the model card; push to ``hub.repo_id`` when set."""
    from models.hub import push_drafter, write_model_card

    if cfg.hub.export_format:
        from models.export import export

        served = export(folder, cfg.hub.export_format, folder / f"served-{cfg.hub.export_format}")
        print(f"exported the drafter as {cfg.hub.export_format} -> {served}")
    write_model_card(folder)
    if cfg.hub.repo_id:
        url = push_drafter(folder, cfg.hub.repo_id, private=cfg.hub.private)
        print(f"pushed drafter to {url}")


@command
def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(recipes=", ".join(available_recipes())))
        return 0 if argv else 2
    cfg = load_config(argv)  # every key, type, choice and range is checked here, before any work
    topo = resolve_topology(cfg.train)
    plan = preflight(cfg)  # the target's config and tokenizer, the drafter on meta, the files
    threads = apply_threads(cfg.train.threads)
    device = init_distributed(topo)
    target, tokenizer = load_target(cfg.target, cfg.target_dtype.value, str(device))
    if topo.rank == 0:
        n_params = sum(p.numel() for p in target.parameters())
        print(
            f"recipe {cfg.recipe}: target {cfg.target} ({type(target).__name__}, "
            f"{n_params / 1e6:.1f}M parameters, vocab {len(tokenizer)}, "
            f"{str(target.dtype).removeprefix('torch.')}) on {device}"
            + (f" ({threads} threads)" if device.type == "cpu" else "")
            + f"; outputs -> {cfg.output_dir}"
        )
    barrier = torch.distributed.barrier if topo.world > 1 else (lambda: None)
    if not plan.dataset_ready:
        cfg = plan.cfg  # the teacher signals the drafter reads, cached by the data build
    data_dir = ensure_dataset(cfg, target, tokenizer, topo.rank, topo.world, barrier)
    barrier()
    started = time.time()
    command_line = "accelerate launch train/drafter.py " + " ".join(argv)
    folder = train_drafter(cfg, target, tokenizer, topo, device, command_line)
    if topo.rank == 0:
        out_dir = Path(cfg.output_dir)
        finished = (folder / "training.json").is_file()
        summary(
            f"trained {cfg.drafter.type} in {time.time() - started:.0f}s"
            if finished
            else "stopped early: rerun the same command to resume",
            {
                "drafter": folder if finished else "(not written yet)",
                "checkpoints": out_dir / "checkpoints",
                "log": out_dir / "log.jsonl",
                "dataset": data_dir,
            },
            f"next: python -m infer.eval {folder}" if finished else "",
        )
    if topo.rank == 0 and (folder / "training.json").is_file():
        if cfg.final_eval.limit:
            final_evaluation(cfg, folder)
        publish(cfg, folder)  # after the final evaluation: its tuned.json and eval.json go too
    if topo.world > 1:
        torch.distributed.destroy_process_group()
    return 0


def final_evaluation(cfg: Config, folder: Path) -> list[dict]:
    """``infer.eval`` of the new drafter and its ``eval_variants`` in one run (same prompts,
    one plain-decoding baseline) on ``final_eval.limit`` prompts of ``final_eval.prompts``; with
    ``final_eval.tune`` the drafting settings are first tuned to this device (``tuned.json``)
    and the untuned drafter is a row too. Prints one table and writes ``<folder>/eval/`` (the
    drafter's own report and model card)."""
    from infer.contenders import Entry
    from infer.eval import evaluate_many, write_outputs
    from infer.tune import record_measured, tune
    from models.drafter import load_drafter
    from recipes import load_options
    from recipes.schema import EvalConfig

    options = load_options(EvalConfig, [
        f"limit={cfg.final_eval.limit}", f"max_new_tokens={cfg.final_eval.max_new_tokens}",
        f"threads={torch.get_num_threads()}", f"prompts={cfg.final_eval.prompts}",
        f"repeats={cfg.final_eval.repeats}",
    ])  # fmt: skip
    entries = [Entry(str(folder), "drafter")]
    if cfg.final_eval.tune:
        tune(str(folder), options)
        entries.append(Entry(str(folder), "drafter, untuned", ["tuned=false"]))
    for label, extra in load_drafter(folder).eval_variants().items():
        entries.append(Entry(str(folder), label, [*extra, "tuned=false"]))
    run = evaluate_many(entries, options)
    write_outputs(run["drafters"][0], str(folder), options)
    record_measured(run["drafters"][0])
    rows = []
    for entry, result in zip(entries, run["drafters"], strict=True):
        overall, lossless = result["overall"], result["overall"]["lossless"]
        rows.append({"run": entry.label, "drafting": result["settings"]["drafting"],
                     "tau": overall["tau"], "speedup": overall["speedup"],
                     "speedup_range": [overall[k] for k in ("speedup_min", "speedup_max")
                                       if k in overall],
                     "speedup_excluding_prefill": overall["speedup_excluding_prefill"],
                     "lossless": f"{lossless['identical']}/{lossless['checked']}"
                     if lossless else "sampling"})  # fmt: skip
    repeats = cfg.final_eval.repeats
    print(
        f"\n{cfg.drafter.type} on {cfg.final_eval.limit} prompts of {cfg.final_eval.prompts}, "
        f"{cfg.final_eval.max_new_tokens} new tokens, greedy, in one run against plain decoding "
        "(tau 1.00, speedup 1.00x; Spec-Bench speedup"
        + (f"; the median of {repeats} rotations [min-max])\n" if repeats > 1 else ")\n")
    )
    print("| run | drafting | tau | speedup | speedup (no prefill) | lossless |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        spread = " [{:.2f}-{:.2f}]".format(*r["speedup_range"]) if r["speedup_range"] else ""
        print(f"| {r['run']} | {r['drafting']} | {r['tau']:.2f} | {r['speedup']:.2f}x{spread} | "
              f"{r['speedup_excluding_prefill']:.2f}x | {r['lossless']} |")  # fmt: skip
    (folder / "final_eval.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
