"""The one training loop: optimiser, warmup + cosine schedule, clipping, accumulation, atomic
checkpoints with auto-resume, progress bar and a JSONL metrics log.

Callers supply the model, a ``loss_fn(model, batch) -> (loss, n_tokens)`` and a batch source
that can start at any batch index (so a resumed run sees exactly the batches it would have).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recipes.schema import TrainConfig

LossFn = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, int]]
BatchSource = Callable[[int], Iterator[torch.Tensor]]  # start batch index -> batches


@dataclass
class LoopResult:
    step: int
    train_loss: float  # mean over the last log window
    tokens: int
    seconds: float
    eval_metrics: dict[str, float]


def cosine_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to ``cfg.lr * cfg.min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    found = [p for p in ckpt_dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, state: dict, keep_last: int):
    """Write ``step-N`` atomically (a temp directory renamed into place), keep the last N."""
    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
        },
        tmp / "state.pt",
    )
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in _checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old)


def load_latest_checkpoint(ckpt_dir: Path, model, optimizer) -> dict | None:
    """Restore the newest checkpoint into model/optimizer; returns its state.json or None."""
    found = _checkpoints(ckpt_dir)
    if not found:
        return None
    blob = torch.load(found[-1] / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"])
    return json.loads((found[-1] / "state.json").read_text())


def run_loop(
    cfg: TrainConfig,
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: BatchSource,
    out_dir: Path,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    fingerprint: dict | None = None,
) -> LoopResult:
    """Train ``model`` for ``cfg.steps`` optimiser steps, resuming from ``out_dir/checkpoints``.

    ``fingerprint`` (e.g. the resolved config) is stored with each checkpoint; resuming with a
    different fingerprint is refused with the differing fields named.
    """
    fingerprint = fingerprint or {}
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    log_path = out_dir / "log.jsonl"
    resumed = load_latest_checkpoint(ckpt_dir, model, optimizer)
    start = 0
    if resumed:
        before = resumed.get("fingerprint", {})
        changed = sorted(k for k in {*fingerprint, *before} if fingerprint.get(k) != before.get(k))
        if changed:
            raise ValueError(
                f"cannot resume from {ckpt_dir}: the run changed {', '.join(changed)} "
                f"(was {[before.get(k) for k in changed]}, "
                f"now {[fingerprint.get(k) for k in changed]}); use a new output_dir"
            )
        start = resumed["step"]
    tokens = resumed["tokens"] if resumed else 0
    elapsed = resumed["seconds"] if resumed else 0.0
    model.train()
    source = batches(start * cfg.grad_accum)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    window_loss, window_tokens, window_start = [], 0, time.perf_counter()
    eval_metrics: dict[str, float] = {}
    last_loss = float("nan")  # stays NaN when the checkpoint had already finished the run
    for step in range(start, cfg.steps):
        step_start = time.perf_counter()
        lr = cosine_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.grad_accum):
            loss, n = loss_fn(model, next(source).to(device))
            (loss / cfg.grad_accum).backward()
            window_loss.append(loss.item())
            window_tokens += n
            tokens += n
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - step_start
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = {
                "step": done,
                "loss": sum(window_loss) / len(window_loss),
                "lr": lr,
                "tokens_per_s": window_tokens / (time.perf_counter() - window_start),
                "tokens": tokens,
            }
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
            if evaluate and (done % cfg.eval_every == 0 or done == cfg.steps):
                eval_metrics = evaluate(model)
                model.train()
                record.update(eval_metrics)
            with log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            last_loss = record["loss"]
            window_loss, window_tokens, window_start = [], 0, time.perf_counter()
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_checkpoint(
                ckpt_dir,
                done,
                model,
                optimizer,
                {"tokens": tokens, "seconds": elapsed, "fingerprint": fingerprint},
                cfg.keep_last,
            )
        bar.update(1)
    bar.close()
    return LoopResult(cfg.steps, last_loss, tokens, elapsed, eval_metrics)
