"""Drafter training throughput on the embedded target: single process vs DeepSpeed ZeRO-2.

    python -m benchmarks.train_throughput [STEPS] [REPEATS]

Builds (once) a small distillation dataset from the embedded target, then trains the
``draft_lm`` recipe (fkl, 2-layer truncated target) for STEPS steps in three topologies through
the real entry point ``train/drafter.py``, launched with torchrun:
    - single: one process, all CPU threads;
    - zero2 x1: one process under DeepSpeed ZeRO-2 (the engine's overhead alone);
    - zero2 x2: two processes (gloo), one thread each, ZeRO-2.
Rounds alternate the topologies REPEATS times so machine noise hits each; the figure is trained
(loss) positions per second of training-loop time from each run's ``training.json``, median over
rounds. The same global batch is used everywhere, so every topology does the same work.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.results import machine, write_section

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "bench_train"
COMMON = [
    "recipe=draft_lm", f"distill.out={WORK / 'data'}", "prompts.limit=64",
    "distill.max_new_tokens=64", "train.device=cpu", "train.batch_size=8",
    "train.warmup_steps=2", "train.save_every=100000", "train.log_every=5",
]  # fmt: skip
TOPOLOGIES = {  # name -> (processes, threads per process, overrides)
    "single": (1, os.cpu_count(), ["train.topology=single"]),
    "zero2 x1": (1, os.cpu_count(), ["train.topology=zero2"]),
    "zero2 x2": (2, max(1, (os.cpu_count() or 2) // 2), ["train.topology=zero2"]),
}


def launch(name: str, steps: int, round_: int) -> dict:
    nproc, threads, extra = TOPOLOGIES[name]
    out = WORK / f"{name.replace(' ', '_')}-{round_}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [*COMMON, *extra, f"train.steps={steps}", f"output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
         "train/drafter.py", *argv, f"train.threads={threads}"],
        cwd=REPO, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    metrics = json.loads((out / "drafter" / "training.json").read_text())["metrics"]
    shutil.rmtree(out)
    return metrics


def main(argv: list[str]) -> None:
    steps = int(argv[0]) if argv else 30
    repeats = int(argv[1]) if len(argv) > 1 else 2
    rates: dict[str, list[float]] = {name: [] for name in TOPOLOGIES}
    losses: dict[str, float] = {}
    for round_ in range(repeats):
        for name in TOPOLOGIES:
            metrics = launch(name, steps, round_)
            rates[name].append(metrics["tokens"] / metrics["seconds"])
            losses[name] = metrics["train_loss"]
            print(f"round {round_} {name}: {rates[name][-1]:.0f} positions/s", flush=True)
    single = statistics.median(rates["single"])
    rows = [
        f"| {name} | {TOPOLOGIES[name][0]} | {TOPOLOGIES[name][1]} | "
        f"{statistics.median(r):.0f} | {statistics.median(r) / single:.2f} | {losses[name]:.4f} |"
        for name, r in rates.items()
    ]
    table = "\n".join(
        ["| topology | processes | threads each | trained positions/s | vs single | last loss |",
         "| --- | --- | --- | --- | --- | --- |", *rows]
    )  # fmt: skip
    text = (
        "## Drafter training throughput (`python -m benchmarks.train_throughput`)\n\n"
        f"Machine: {machine()}, {os.cpu_count()} cores. Recipe `draft_lm` on the embedded target "
        f"(2-layer drafter, forward KL with the target's logits computed online), 64 prompts x 64 "
        f"new tokens, global batch 8, {steps} steps; median of {repeats} alternating rounds. "
        "Positions/s counts trained (response) positions per second of training-loop time; the "
        "target forward and the drafter forward/backward both run over prompt + response.\n\n"
        f"{table}\n"
    )
    print(text)
    write_section("train_throughput", text)


if __name__ == "__main__":
    main(sys.argv[1:])
