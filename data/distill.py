"""Distillation datasets: the target regenerates responses to a prompt set.

    python -m data.distill recipe=NAME [target=...] [prompts.source=...] [distill.out=DIR]

Output (``distill.out``, default ``<output_dir>/data``):
    shards/shard-00000/ ...   one ``datasets`` Arrow folder per shard of prompts (resume unit)
    dataset/                  all shards concatenated (``datasets.load_from_disk``)
    manifest.json             target and tokenizer fingerprints, settings, counts, checksums

Each row: ``input_ids`` (prompt + response, int32), ``loss_mask`` (int8, 1 exactly on response
tokens), ``prompt_len``, ``source_id``, ``category``; optionally ``topk_ids`` (int32) /
``topk_logprobs`` (fp16), ``(R, K)`` with one row per response token, and ``hidden_states``
(fp16, ``(T, L, H)``: every token, the chosen layers in ``distill.hidden_layers`` order).
Read the arrays with ``dataset.with_format("numpy", dtype=None)`` (plain ``"numpy"`` upcasts
integers to int64 and floats to float32).
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

import numpy as np
import torch
from tqdm.auto import tqdm

from data.generate import Sampling, generate
from data.prompts import Prompt, load_prompts, render_prompt
from models.target import target_fingerprint, tokenizer_hash
from recipes.cli import apply_threads, check_folder, command, summary
from recipes.schema import Config, DistillConfig

MANIFEST_VERSION = 2
# how each stored column is laid out (T tokens of the row, R response tokens, K top-k,
# L chosen hidden layers, H hidden size); recorded in build.json and manifest.json
LAYOUT = {
    "input_ids": "T int32",
    "loss_mask": "T int8",
    "topk_ids": "R,K int32",
    "topk_logprobs": "R,K float16",
    "hidden_states": "T,L,H float16",
}
# teacher-signal forwards take rows up to this many (right-padded) tokens at a time
SIGNAL_BATCH_TOKENS = 4096
# response positions whose logits go through the output head at a time (top-k)
HEAD_CHUNK = 1024


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


def row_features(cfg: DistillConfig, hidden_size: int):
    """The ``datasets`` features of a shard's rows (teacher-signal columns when enabled)."""
    from datasets import Array2D, Array3D, Features, Sequence, Value

    features = {
        "input_ids": Sequence(Value("int32")),
        "loss_mask": Sequence(Value("int8")),
        "prompt_len": Value("int32"),
        "source_id": Value("string"),
        "category": Value("string"),
    }
    if cfg.topk_logprobs:
        features["topk_ids"] = Array2D(shape=(None, cfg.topk_logprobs), dtype="int32")
        features["topk_logprobs"] = Array2D(shape=(None, cfg.topk_logprobs), dtype="float16")
    if cfg.hidden_layers:
        shape = (None, len(cfg.hidden_layers), hidden_size)
        features["hidden_states"] = Array3D(shape=shape, dtype="float16")
    return Features(features)


def _signal_batches(rows: list[dict], max_tokens: int) -> list[list[int]]:
    """Row indices grouped for the teacher forwards: longest first, so a batch's rows have
    similar lengths (little padding), at most ``max_tokens`` padded tokens per batch."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    batches: list[list[int]] = []
    for i in order:
        width = len(rows[batches[-1][0]]["input_ids"]) if batches else 0  # its longest row
        if batches and (len(batches[-1]) + 1) * width <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def teacher_signals(
    model, rows: list[dict], cfg: DistillConfig, max_tokens: int = SIGNAL_BATCH_TOKENS
) -> None:
    """Add top-k logprobs and hidden states to ``rows`` (in place), from batched forwards.

    Rows of similar length are right-padded into one forward: attention is causal, so a real
    token never sees the padding after it and needs no mask, and positions start at 0 as in a
    forward of the row alone. Logits are computed only where top-k is stored (the positions
    that predict response tokens): the output head is applied to those hidden states.
    """
    device = next(model.parameters()).device
    k, layers = cfg.topk_logprobs, list(cfg.hidden_layers)
    head = model.get_output_embeddings()
    for batch in _signal_batches(rows, max_tokens):
        lengths = [len(rows[i]["input_ids"]) for i in batch]
        ids = torch.zeros((len(batch), max(lengths)), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, : lengths[r]] = torch.as_tensor(np.asarray(rows[i]["input_ids"]))
        last = torch.tensor([ids.shape[1] - 1], device=device)  # an index: see data.generate
        out = model(
            input_ids=ids.to(device),
            output_hidden_states=True,
            logits_to_keep=last,
            use_cache=False,
        )
        states = out.hidden_states
        if layers:
            chosen = torch.stack([states[j] for j in layers], dim=2).half().cpu()  # (B, T, L, H)
            for r, i in enumerate(batch):
                rows[i]["hidden_states"] = chosen[r, : lengths[r]].numpy()
        if not k:
            continue
        # logits at t-1 predict token t: response tokens are predicted from prompt_len-1 on
        spans = [
            range(rows[i]["prompt_len"] - 1, n - 1) for i, n in zip(batch, lengths, strict=True)
        ]
        which = torch.tensor([r for r, span in enumerate(spans) for _ in span], device=device)
        where = torch.tensor([t for span in spans for t in span], device=device)
        check = head(states[-1][:, -1]).float()  # (B, H): 2-D, contiguous rows
        if torch.allclose(check, out.logits[:, -1].float(), rtol=1e-3, atol=1e-3):
            picked = states[-1][which, where]  # the head alone makes the logits (Llama, Qwen...)
            chunks = (head(picked[c : c + HEAD_CHUNK]) for c in range(0, len(picked), HEAD_CHUNK))
        else:  # the model scales or caps its logits after the head: take them from its forward
            logits = model(input_ids=ids.to(device), use_cache=False).logits[which, where]
            chunks = (logits[c : c + HEAD_CHUNK] for c in range(0, len(logits), HEAD_CHUNK))
        top_ids, top_logprobs = _topk_logprobs(chunks, k)
        start = 0
        for r, i in enumerate(batch):
            end = start + len(spans[r])
            rows[i]["topk_ids"] = top_ids[start:end]
            rows[i]["topk_logprobs"] = top_logprobs[start:end]
            start = end


def _topk_logprobs(chunks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids (int32) and log-probabilities (fp16) of ``(N, V)`` logit chunks of any dtype,
    computed in float32 one chunk at a time."""
    ids, values = [], []
    for chunk in chunks:
        chunk = chunk.float()
        top = chunk.topk(k, dim=-1)
        ids.append(top.indices.int().cpu())
        values.append((top.values - chunk.logsumexp(-1, keepdim=True)).half().cpu())
    return torch.cat(ids).numpy(), torch.cat(values).numpy()


def build_shard(
    model, tokenizer, items, cfg: DistillConfig, seed: int, on_batch=None
) -> list[dict]:
    """Regenerate the responses of one shard's prompts; returns its rows in prompt order.

    Generation batches are formed from the prompts sorted by token length (longest first, so
    a batch needs little left padding); the rows are put back in the order of ``items``.
    ``on_batch(prompts, response_tokens)`` is called after every generated batch (progress)."""
    sampling = Sampling(
        temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens
    )
    generator = torch.Generator().manual_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(items)), key=lambda i: -len(items[i][1]))
    responses: list[list[int]] = [[] for _ in items]
    for b in range(0, len(order), cfg.batch_size):
        batch = order[b : b + cfg.batch_size]
        prompts = [items[i][1] for i in batch]
        made = generate(model, prompts, sampling, tokenizer.eos_token_id, pad_id, generator)
        if on_batch is not None:
            on_batch(len(batch), sum(len(r) for r in made))
        for i, response in zip(batch, made, strict=True):
            responses[i] = response
    rows = []
    for (prompt, ids), response in zip(items, responses, strict=True):
        rows.append(
            {
                "input_ids": np.asarray(ids + response, dtype=np.int32),
                "loss_mask": np.repeat(np.int8([0, 1]), [len(ids), len(response)]),
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


def check_version(dataset_dir: Path | str, recorded: dict) -> None:
    """Refuse a dataset (manifest.json or build.json) written with another layout version."""
    version = recorded.get("version", 1)
    if version != MANIFEST_VERSION:
        age = "an older" if version < MANIFEST_VERSION else "a newer"
        raise ValueError(
            f"dataset {dataset_dir} was built by {age} draftkit (manifest version {version}); "
            "delete it or choose another distill.out to rebuild"
        )


def check_manifest(dataset_dir: Path | str, fingerprint: dict, tok_hash: str) -> dict:
    """Refuse a dataset built by another draftkit version, target or tokenizer; returns its
    manifest."""
    manifest = json.loads((Path(dataset_dir) / "manifest.json").read_text())
    check_version(dataset_dir, manifest)
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


def check_dataset_folder(cfg: Config, target_config, tokenizer) -> bool:
    """Pre-flight: refuse, writing nothing, a dataset folder this run cannot use (a file, not
    writable, another toolkit's files, a dataset of another draftkit version, target or
    tokenizer; the weights are compared once they are loaded). Returns whether a finished
    dataset is there to reuse."""
    from models.target import config_hash

    out, key = dataset_dir(cfg), "distill.out" if cfg.distill.out else "output_dir"
    check_folder(out, key)
    if not out.is_dir() or not any(out.iterdir()):
        return False
    recorded = next((out / n for n in ("manifest.json", "build.json") if (out / n).is_file()), None)
    if recorded is None:
        found = ", ".join(sorted(p.name for p in out.iterdir())[:8])
        raise ValueError(
            f"{out} is not a draftkit dataset (no manifest.json or build.json; found: {found}); "
            "give distill.out a new or empty folder, or the folder a draftkit build wrote"
        )
    try:
        settings = json.loads(recorded.read_text())
        check_version(out, settings)
        built = settings["target"]
        theirs = (built["target"], built["config_sha256"], settings["tokenizer_sha256"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{recorded} is unreadable or incomplete ({exc}); delete {out}") from exc
    ours = (cfg.target, config_hash(target_config), tokenizer_hash(tokenizer))
    for name, mine, found in zip(("target", "target config", "tokenizer"), ours, theirs,
                                 strict=True):  # fmt: skip
        if mine != found:
            raise ValueError(
                f"{out} holds a dataset built with another {name} ({found[:40]}, this run: "
                f"{mine[:40]}); give distill.out a new folder or rebuild with that target"
            )
    return recorded.name == "manifest.json"


def preflight_build(cfg: Config, target_config, tokenizer) -> tuple[bool, int]:
    """Pre-flight of the data build, before the target's weights load: the dataset folder
    (``check_dataset_folder``), the teacher layers, and the prompt source read whole (every line
    parsed, rows and column present). Returns (a finished dataset is there to reuse, the number
    of prompts the build would read; 0 when it is reused)."""
    if check_dataset_folder(cfg, target_config, tokenizer):
        return True, 0
    n_layers = target_config.num_hidden_layers
    bad = [i for i in cfg.distill.hidden_layers if i > n_layers]
    if bad:
        raise ValueError(
            f"distill.hidden_layers {bad}: the target has {n_layers} layers, valid hidden-state "
            f"indices are 0..{n_layers} (0 = the embeddings, {n_layers} = the final output)"
        )
    p = cfg.prompts
    prompts = load_prompts(p.source, p.split, p.prompt_column, p.category_column, p.id_column,
                           p.limit)  # fmt: skip
    if not any(prompt.text.strip() for prompt in prompts):
        raise ValueError(f"every prompt of '{p.source}' (column '{p.prompt_column}') is empty")
    return False, len(prompts)


def dataset_dir(cfg: Config) -> Path:
    """``distill.out``, or ``<output_dir>/data`` when it is empty."""
    return Path(cfg.distill.out or Path(cfg.output_dir) / "data")


def _settings(cfg: Config, fingerprint: dict, tok_hash: str) -> dict:
    """What decides the dataset's content; a resumed build must match it exactly."""
    return {
        "version": MANIFEST_VERSION,
        "layout": LAYOUT,
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
    old = json.loads(settings_file.read_text()) if settings_file.exists() else settings
    check_version(out, old)
    if old != settings:
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
    features = row_features(dcfg, model.config.get_text_config().hidden_size)

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
        datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp))
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
    from data.teacher_cache import with_teacher_cache
    from models.target import load_target, meta_target, read_target
    from recipes import load_config

    cfg = load_config(argv)
    apply_threads(cfg.train.threads)
    _, target_config, tokenizer = read_target(cfg.target)  # pre-flight: no weights, no data yet
    with torch.device("meta"):
        cfg = with_teacher_cache(cfg, meta_target(target_config), tokenizer)
    preflight_build(cfg, target_config, tokenizer)
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
