"""The one training loop: warmup + cosine schedule, accumulation, clipping, atomic checkpoints with
exact resume, SIGTERM handling, a progress bar and a JSONL metrics log.

Callers supply an ``Engine`` (the topology), a ``loss_fn(model, micro_batch) -> LossOutput`` and
a batch source that can start at any global micro-batch index, so a resumed run sees exactly the
batches it would have seen. Several processes train like one: each micro-batch's loss is
weighted by its share of the step's positions over all processes (``positions``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from models.drafter import LossOutput
from recipes.schema import TrainConfig
from train.engine import Engine

LossFn = Callable[[torch.nn.Module, object], LossOutput]
BatchSource = Callable[[int], Iterator[object]]  # first global micro-batch index -> batches


@dataclass
class LoopResult:
    step: int
    train_loss: float  # mean over the last log window
    tokens: int  # loss positions over all processes
    seconds: float
    eval_metrics: dict[str, float]
    metrics: dict[str, float]  # last log window's metrics (e.g. loss, top1, acc@k)
    interrupted: bool = False  # stopped early by SIGTERM (a checkpoint was saved)


def cosine_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to ``cfg.lr * cfg.min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def checkpoints(ckpt_dir: Path) -> list[Path]:
    found = [p for p in ckpt_dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, folder / f"rng-rank{rank}.safetensors")
    (folder / f"rng-rank{rank}.json").write_text(json.dumps(random.getstate()))


def _load_rng(folder: Path, rank: int) -> None:
    tensors = load_file(folder / f"rng-rank{rank}.safetensors")
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, state, gauss = json.loads((folder / f"rng-rank{rank}.json").read_text())
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(engine: Engine, ckpt_dir: Path, step: int, state: dict, keep_last: int):
    """Write ``step-N`` atomically (every process into a temp folder, then one rename), keep the
    last ``keep_last``."""
    rank = engine.topo.rank
    final, tmp = ckpt_dir / f"step-{step}", ckpt_dir / f".tmp-step-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.save(tmp)
    _save_rng(tmp, rank)
    engine.barrier()
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old)
    engine.barrier()


def _refuse_changed(ckpt: Path, before: dict, now: dict) -> None:
    """Refuse to resume when a setting differs from the checkpoint's; settings the checkpoint
    predates (added to the toolkit since) take their current values, named in a note."""
    added = sorted(k for k in now if k not in before)
    if added and before:
        print(f"note: {ckpt} predates the settings {', '.join(added)}: resuming with "
              + ", ".join(f"{k}={now[k]!r}" for k in added))  # fmt: skip
    changed = sorted(k for k in before if now.get(k) != before.get(k))
    if changed:
        detail = "; ".join(f"{k}: was {before.get(k)!r}, now {now.get(k)!r}" for k in changed)
        raise ValueError(
            f"cannot resume from {ckpt}: the run changed {', '.join(changed)} ({detail}); "
            "use a new output_dir to start over"
        )


class _StopFlag:
    """Set by SIGTERM; the loop saves at the next step boundary and returns."""

    def __init__(self):
        self.raised = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self.previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def run_loop(
    cfg: TrainConfig,
    engine: Engine,
    loss_fn: LossFn,
    batches: BatchSource,
    positions: Callable[[object], int],
    out_dir: Path,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    fingerprint: dict | None = None,
    on_log: Callable[[dict], None] | None = None,
    stage: str = "",
) -> LoopResult:
    """Train for ``cfg.steps`` optimiser steps, resuming from ``out_dir/checkpoints``.

    Args:
        positions: the number of loss positions of a micro-batch (computed before the forward,
            so that every micro-batch is weighted by its share of the whole step).
        fingerprint: flat dict stored with each checkpoint; resuming with any differing field
            is refused, naming the fields.
        on_log: called on process 0 with every log record (e.g. wandb).
        stage: a training stage's name: its checkpoints go to ``checkpoints/<stage>`` and its
            log records carry ``"stage"`` (one ``log.jsonl`` for the whole run).
    """
    fingerprint = fingerprint or {}
    rank, main = engine.topo.rank, engine.topo.rank == 0
    ckpt_dir, log_path = out_dir / "checkpoints" / stage, out_dir / "log.jsonl"
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.barrier()
    found = checkpoints(ckpt_dir)
    start, tokens, elapsed = 0, 0, 0.0
    if found:
        resumed = json.loads((found[-1] / "state.json").read_text())
        _refuse_changed(found[-1], resumed.get("fingerprint", {}), fingerprint)
        engine.load(found[-1])
        _load_rng(found[-1], rank)
        start, tokens, elapsed = resumed["step"], resumed["tokens"], resumed["seconds"]
        if main:
            print(f"resuming from {found[-1]} (step {start} of {cfg.steps})")
    engine.model.train()
    source = batches(start * cfg.grad_accum)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {stage}".strip(), dynamic_ncols=True,
               disable=not main)  # fmt: skip
    window: dict[str, float] = {}
    window_start, last = time.perf_counter(), {"loss": float("nan")}
    eval_metrics: dict[str, float] = {}
    if start == cfg.steps and log_path.is_file():  # already finished: report its last record
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        last = next((r for r in reversed(records) if r.get("stage", "") == stage), last)
        eval_metrics = {k: v for k, v in last.items() if k.startswith("heldout_")}
    stopping = False
    with _StopFlag() as stop:
        for step in range(start, cfg.steps):
            step_start = time.perf_counter()
            lr = cosine_lr(step, cfg)
            micro = [next(source) for _ in range(cfg.grad_accum)]
            counts = torch.tensor([float(positions(b)) for b in micro])
            step_positions = engine.all_reduce_sum(counts.sum().reshape(1)).item()
            sums: dict[str, torch.Tensor] = {}
            for i, batch in enumerate(micro):
                with engine.autocast():
                    out = loss_fn(engine.model, batch)
                weight = counts[i].item() / max(step_positions, 1.0)
                engine.backward(out.loss * weight, last_micro_step=i == len(micro) - 1)
                for key, value in {"loss": out.loss.detach() * counts[i], **out.metrics}.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float().cpu()
            grad_norm = engine.step(lr)
            keys = sorted(sums)
            reduced = engine.all_reduce_sum(torch.stack([sums[k] for k in keys]))
            for key, value in zip(keys, reduced.tolist(), strict=True):
                window[key] = window.get(key, 0.0) + value
            window["positions"] = window.get("positions", 0.0) + step_positions
            tokens += int(step_positions)
            elapsed += time.perf_counter() - step_start
            done = step + 1
            stopping = bool(engine.all_reduce_sum(torch.tensor([float(stop.raised)])).item())
            if done % cfg.log_every == 0 or done == cfg.steps or stopping:
                n = max(window.pop("positions"), 1.0)
                record = {"step": done, **{k: v / n for k, v in window.items()}, "lr": lr}
                if stage:
                    record["stage"] = stage
                record["grad_norm"] = grad_norm
                record["tokens_per_s"] = n / (time.perf_counter() - window_start)
                record["tokens"] = tokens
                if evaluate and (done % cfg.eval_every == 0 or done == cfg.steps):
                    eval_metrics = evaluate(engine.module)
                    engine.model.train()
                    record.update(eval_metrics)
                postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{lr:.1e}",
                           "tok_s": f"{record['tokens_per_s']:.0f}"}  # fmt: skip
                if "heldout_tau" in eval_metrics:  # the latest held-out chain-walk τ
                    postfix["tau_heldout"] = f"{eval_metrics['heldout_tau']:.2f}"
                bar.set_postfix(**postfix)
                if main:
                    with log_path.open("a") as log:
                        log.write(json.dumps(record) + "\n")
                    if on_log:
                        on_log(record)
                last, window, window_start = record, {}, time.perf_counter()
            if done % cfg.save_every == 0 or done == cfg.steps or stopping:
                state = {"tokens": tokens, "seconds": elapsed, "fingerprint": fingerprint}
                save_checkpoint(engine, ckpt_dir, done, state, cfg.keep_last)
            bar.update(1)
            if stopping:
                if main:
                    print(f"SIGTERM: saved step {done} to {ckpt_dir}; rerun the command to resume")
                break
    bar.close()
    metrics = {k: v for k, v in last.items() if k not in ("step", "loss", "lr", "stage")}
    return LoopResult(
        last.get("step", start), last["loss"], tokens, elapsed, eval_metrics, metrics, stopping
    )
