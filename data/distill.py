"""Distillation datasets: the target regenerates responses to a prompt set.

    python -m data.distill recipe=NAME [target=...] [prompts.source=...] [distill.out=DIR]

Output (``distill.out``, default ``<output_dir>/data``):
    shards/shard-00000/ ...   one ``datasets`` Arrow folder per shard of prompts (resume unit)
    dataset/                  all shards concatenated (``datasets.load_from_disk``)
    manifest.json             target and tokenizer fingerprints, settings, counts, checksums

Each row: ``input_ids`` (prompt + response), ``loss_mask`` (1 exactly on response tokens),
``prompt_len``, ``source_id``, ``category``; optionally ``topk_ids``/``topk_logprobs`` per
response token and ``hidden_states`` (fp16, chosen layers only).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.generate import Sampling, generate
from data.prompts import Prompt, check_source, load_prompts, render_prompt
from models.target import target_fingerprint, tokenizer_hash
from recipes.cli import command, summary
from recipes.schema import Config, DistillConfig

MANIFEST_VERSION = 1


def screen(
    prompts: list[Prompt], tokenizer, max_prompt_tokens: int
) -> tuple[list[tuple[Prompt, list[int]]], Counter]:
    """Tokenize the rendered prompts; drop bad input, counting each drop by reason."""
    kept, drops = [], Counter()
    for prompt in prompts:
        if prompt.missing:
            drops["missing_prompt"] += 1
            continue
        if not prompt.text.strip():
            drops["empty"] += 1
            continue
        text = render_prompt(tokenizer, prompt)
        try:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            undecodable = "\ufffd" in text or tokenizer.decode(ids) != text
        except (UnicodeError, TypeError):
            undecodable = True
        if undecodable:
            drops["undecodable"] += 1
        elif len(ids) > max_prompt_tokens:
            drops["too_long"] += 1
        else:
            kept.append((prompt, ids))
    return kept, drops


def projected_signal_bytes(cfg: DistillConfig, hidden_size: int, prompt_tokens: int, n: int):
    """Upper bound on the teacher-signal bytes: every response at max_new_tokens."""
    response_tokens = n * cfg.max_new_tokens
    topk = response_tokens * cfg.topk_logprobs * (4 + 2)  # int32 id + fp16 logprob
    hidden = (prompt_tokens + response_tokens) * len(cfg.hidden_layers) * hidden_size * 2
    return topk + hidden


@torch.no_grad()
def teacher_signals(model, rows: list[dict], cfg: DistillConfig) -> None:
    """Add top-k logprobs and hidden states to ``rows`` from one target forward per row."""
    device = next(model.parameters()).device
    for row in rows:
        ids = torch.tensor([row["input_ids"]], device=device)
        out = model(input_ids=ids, output_hidden_states=bool(cfg.hidden_layers))
        start = row["prompt_len"]
        if cfg.topk_logprobs:
            # logits at t-1 predict token t: the response tokens are predicted from start-1 on
            logprobs = torch.log_softmax(out.logits[0, start - 1 : -1].float(), dim=-1)
            top = logprobs.topk(cfg.topk_logprobs, dim=-1)
            row["topk_ids"] = top.indices.int().cpu().tolist()
            row["topk_logprobs"] = top.values.half().cpu().tolist()
        if cfg.hidden_layers:
            states = torch.stack([out.hidden_states[i][0] for i in cfg.hidden_layers], dim=0)
            row["hidden_states"] = states.half().cpu().numpy()  # (layers, T, hidden)


def build_shard(
    model, tokenizer, items, cfg: DistillConfig, seed: int, on_batch=None
) -> list[dict]:
    """Regenerate the responses of one shard's prompts; returns its rows.

    ``on_batch(prompts, response_tokens)`` is called after every generated batch (progress)."""
    sampling = Sampling(
        temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens
    )
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(0, len(items), cfg.batch_size):
        batch = items[i : i + cfg.batch_size]
        responses = generate(
            model,
            [ids for _, ids in batch],
            sampling,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            generator,
        )
        if on_batch is not None:
            on_batch(len(batch), sum(len(r) for r in responses))
        for (prompt, ids), response in zip(batch, responses, strict=True):
            rows.append(
                {
                    "input_ids": ids + response,
                    "loss_mask": [0] * len(ids) + [1] * len(response),
                    "prompt_len": len(ids),
                    "source_id": prompt.id,
                    "category": prompt.category,
                }
            )
    if cfg.topk_logprobs or cfg.hidden_layers:
        teacher_signals(model, rows, cfg)
    return rows


def _dir_checksum(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix == ".arrow":
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def check_manifest(dataset_dir: Path | str, fingerprint: dict, tok_hash: str) -> dict:
    """Refuse a dataset built by another target or tokenizer; returns its manifest."""
    manifest = json.loads((Path(dataset_dir) / "manifest.json").read_text())
    built = manifest["target"]
    for key in ("target", "config_sha256", "weights_sha256"):
        if built[key] != fingerprint[key]:
            raise ValueError(
                f"dataset {dataset_dir} was built by target {built['target']} "
                f"({key} {built[key][:12]}), not by {fingerprint['target']} "
                f"({key} {fingerprint[key][:12]}); rebuild it with this target"
            )
    if manifest["tokenizer_sha256"] != tok_hash:
        raise ValueError(
            f"dataset {dataset_dir} was built with tokenizer {manifest['tokenizer_sha256'][:12]}, "
            f"but the target's tokenizer is {tok_hash[:12]}; rebuild it with this tokenizer"
        )
    return manifest


def dataset_dir(cfg: Config) -> Path:
    """``distill.out``, or ``<output_dir>/data`` when it is empty."""
    return Path(cfg.distill.out or Path(cfg.output_dir) / "data")


def _settings(cfg: Config, fingerprint: dict, tok_hash: str) -> dict:
    """What decides the dataset's content; a resumed build must match it exactly."""
    return {
        "version": MANIFEST_VERSION,
        "target": fingerprint,
        "tokenizer_sha256": tok_hash,
        "prompts": asdict(cfg.prompts),
        "generation": {
            k: getattr(cfg.distill, k)
            for k in ("max_new_tokens", "temperature", "top_p", "shard_size", "max_prompt_tokens")
        },
        "teacher_signals": {
            "topk_logprobs": cfg.distill.topk_logprobs,
            "hidden_layers": list(cfg.distill.hidden_layers),
        },
        "seed": cfg.seed,
    }


def build_dataset(
    cfg: Config, model, tokenizer, rank: int = 0, world: int = 1, barrier=lambda: None
) -> Path:
    """Build (or finish) the distillation dataset; returns its directory.

    Every process of a multi-process launch generates the shards ``i`` with
    ``i % world == rank``; rank 0 then joins them and writes the manifest. A killed build
    loses at most the shards in progress: finished shards are skipped when rerun.
    """
    import datasets

    dcfg = cfg.distill
    out = dataset_dir(cfg)
    fingerprint, tok_hash = target_fingerprint(model, cfg.target), tokenizer_hash(tokenizer)
    settings = _settings(cfg, fingerprint, tok_hash)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(
        cfg.prompts.source, cfg.prompts.split, cfg.prompts.prompt_column,
        cfg.prompts.category_column, cfg.prompts.id_column, cfg.prompts.limit,
    )  # fmt: skip
    kept, drops = screen(prompts, tokenizer, dcfg.max_prompt_tokens)
    dropped = sum(drops.values())
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(drops.items())) or "none"
    print(f"prompts: {len(prompts)} read, {len(kept)} kept, {dropped} dropped ({summary})")
    if prompts and dropped / len(prompts) > dcfg.max_drop_rate:
        raise ValueError(
            f"{dropped} of {len(prompts)} prompts are bad input ({summary}), above "
            f"distill.max_drop_rate={dcfg.max_drop_rate}; fix the prompt set or raise the limit"
        )
    signal_bytes = projected_signal_bytes(
        dcfg, model.config.hidden_size, sum(len(ids) for _, ids in kept), len(kept)
    )
    if signal_bytes:
        print(f"teacher signals: projected at most {signal_bytes / 2**30:.2f} GiB")
        if signal_bytes > dcfg.max_signal_gb * 2**30:
            raise ValueError(
                f"teacher signals would take up to {signal_bytes / 2**30:.1f} GiB, above "
                f"distill.max_signal_gb={dcfg.max_signal_gb}; choose fewer hidden_layers, a "
                "smaller topk_logprobs, or compute teacher signals online during training"
            )

    settings_file = out / "build.json"  # written once the inputs are known to be good
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        old = json.loads(settings_file.read_text())
        changed = sorted(k for k in settings if settings[k] != old.get(k))
        raise ValueError(
            f"{out} holds a partly built dataset made with other {', '.join(changed)}; use a new "
            "distill.out, or delete that folder to start over"
        )
    if rank == 0:
        settings_file.write_text(json.dumps(settings, indent=2))
    barrier()

    shards = [kept[i : i + dcfg.shard_size] for i in range(0, len(kept), dcfg.shard_size)]
    mine = [i for i in range(len(shards)) if i % world == rank]
    todo = [i for i in mine if not (out / "shards" / f"shard-{i:05d}").is_dir()]
    print(f"process {rank}/{world}: {len(todo)} of its {len(mine)} shards to build: {todo}")
    total = sum(len(shards[i]) for i in mine)
    bar = tqdm(
        total=total, initial=total - sum(len(shards[i]) for i in todo), desc="distill",
        unit="prompt", dynamic_ncols=True,
    )  # fmt: skip
    new_tokens, started = 0, time.perf_counter()

    def on_batch(n_prompts: int, n_tokens: int) -> None:
        nonlocal new_tokens
        new_tokens += n_tokens
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):.0f}")
        bar.update(n_prompts)

    for index in todo:
        seed = cfg.seed * 100_003 + index
        rows = build_shard(model, tokenizer, shards[index], dcfg, seed, on_batch)
        tmp = out / "shards" / f".tmp-shard-{index:05d}"
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
        tmp.rename(out / "shards" / f"shard-{index:05d}")  # atomic: a shard is whole or absent
    bar.close()
    barrier()  # every process's shards are on disk before rank 0 joins them
    if rank == 0:
        _finish(out, len(shards), settings, len(prompts), drops)
    return out


def _finish(out: Path, n_shards: int, settings: dict, n_prompts: int, drops: Counter) -> None:
    """Join the shards into ``dataset/`` and write ``manifest.json``."""
    import datasets

    names = [f"shard-{i:05d}" for i in range(n_shards)]
    missing = [n for n in names if not (out / "shards" / n).is_dir()]
    if missing:
        raise RuntimeError(f"shards not built yet: {', '.join(missing[:5])}; rerun to finish")
    parts = [datasets.load_from_disk(str(out / "shards" / n)) for n in names]
    joined = datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_list([])
    tmp = out / ".tmp-dataset"
    shutil.rmtree(tmp, ignore_errors=True)
    joined.save_to_disk(str(tmp))
    shutil.rmtree(out / "dataset", ignore_errors=True)
    tmp.rename(out / "dataset")
    mask_sums = [sum(m) for m in joined["loss_mask"]] if len(joined) else []
    manifest = {
        **settings,
        "rows": len(joined),
        "prompt_tokens": int(sum(joined["prompt_len"])) if len(joined) else 0,
        "response_tokens": int(sum(mask_sums)),
        "prompts_read": n_prompts,
        "dropped": dict(sorted(drops.items())),
        "shards": {n: _dir_checksum(out / "shards" / n) for n in names},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(
        f"dataset: {manifest['rows']} rows, {manifest['response_tokens']} response tokens, "
        f"{sum(drops.values())} prompts dropped -> {out / 'dataset'}"
    )


def ensure_dataset(
    cfg: Config, model, tokenizer, rank: int = 0, world: int = 1, barrier=lambda: None
) -> Path:
    """The recipe stage: reuse the dataset at ``distill.out`` when it is finished and was made by
    this target and tokenizer (refused otherwise), else build or finish it."""
    out = dataset_dir(cfg)
    if (out / "manifest.json").is_file():
        check_manifest(out, target_fingerprint(model, cfg.target), tokenizer_hash(tokenizer))
        print(f"dataset: reusing {out / 'dataset'}")
        return out
    return build_dataset(cfg, model, tokenizer, rank, world, barrier)


def process_group() -> tuple[int, int, Callable[[], None]]:
    """(rank, world size, barrier) from the launcher's environment (torchrun or accelerate).

    Reads ``WORLD_SIZE``/``RANK`` and starts a gloo (CPU) or NCCL process group itself: with
    several CPU processes accelerate's own state reports a world of one, so every process would
    build every shard.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, lambda: None
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier


@command
def main(argv: list[str]) -> int:
    from models.target import load_target, resolve_target
    from recipes import load_config

    cfg = load_config(argv)
    resolve_target(cfg.target)
    check_source(cfg.prompts.source)
    rank, world, barrier = process_group()
    started = time.perf_counter()
    model, tokenizer = load_target(cfg.target, cfg.target_dtype.value, cfg.train.device)
    out = build_dataset(cfg, model, tokenizer, rank, world, barrier)
    if rank == 0:
        manifest = json.loads((out / "manifest.json").read_text())
        summary(
            f"built the distillation dataset in {time.perf_counter() - started:.0f}s",
            {"dataset": out / "dataset", "manifest": out / "manifest.json"},
            f"{manifest['rows']} rows, {manifest['response_tokens']} response tokens",
        )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
