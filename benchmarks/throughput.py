"""How much of this machine training and distillation use: the matmul limit, then every family
recipe's seconds per step, useful FLOPs and distillation tokens/s, old code beside new.

    python -m benchmarks.throughput [--ref COMMIT] [--target stdlib-llama|smollm2-135m-instruct]
        [--families dflash,d2sd,draft_lm] [--prompts 64] [--new-tokens 64] [--steps 12]
        [--threads 1]

1. **The limit.** fp32 and bf16 matmul GFLOP/s at the project's shapes (the embedded target's
   and SmolLM2's MLP and LM-head products), median of repeats, at ``--threads`` threads.
2. **Each family, old and new.** The code at ``--ref`` (a git worktree; default: none, new code
   only) and the working tree each run the same two commands in a subprocess:
   ``python -m data.distill recipe=F ...`` (timed: response tokens per second of the whole
   build, teacher signals included) and ``python train/drafter.py recipe=F ...`` on that data
   (seconds per optimiser step of the training loop, from ``training.json``). Each version runs
   its own recipe as it ships: the old one runs the target online every step where it did.
3. **Useful FLOPs per step** (the same work for old and new: it depends on the model and the
   batch, not on the code): the matmul and attention FLOPs that torch's ``FlopCounterMode``
   counts over the drafter's forward + backward on one training batch of the new code's data
   (every stage's module, weighted by its steps), times the batch's share of real (unpadded)
   tokens. The frozen target's forward is not counted: with cached teacher signals it does not
   run. Achieved GFLOP/s = useful FLOPs / seconds per step; its share of the bf16 limit.
4. **Distillation** against two floors: the compute limit (bf16 limit / (2 x the target's
   parameters) tokens/s) and a plain Hugging Face loop (``benchmarks.distill_throughput``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.results import write_section

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "bench_throughput"
SHAPES = {  # name -> (rows, inner, columns) of one product
    "embedded MLP (2048 x 256 x 768)": (2048, 256, 768),
    "embedded LM head (2048 x 256 x 4096)": (2048, 256, 4096),
    "SmolLM2 MLP (2048 x 576 x 1536)": (2048, 576, 1536),
    "SmolLM2 LM head (1024 x 576 x 49152)": (1024, 576, 49152),
}


def matmul_gflops(rows: int, inner: int, cols: int, dtype: torch.dtype, repeats: int = 5) -> float:
    a, b = torch.randn(rows, inner).to(dtype), torch.randn(inner, cols).to(dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * rows * inner * cols / statistics.median(times) / 1e9


def limits() -> tuple[dict, dict[str, float]]:
    """Per shape and dtype GFLOP/s, and each dtype's best (the limit)."""
    table = {
        name: {str(dt).split(".")[-1]: matmul_gflops(*shape, dt) for dt in (torch.float32,
                                                                            torch.bfloat16)}
        for name, shape in SHAPES.items()
    }  # fmt: skip
    best = {dt: max(row[dt] for row in table.values()) for dt in ("float32", "bfloat16")}
    return table, best


def worktree(ref: str) -> Path:
    """A checkout of ``ref`` beside the runs (made once)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    path = WORK / f"ref-{sha}"
    if not path.is_dir():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=REPO,
                       check=True, capture_output=True)  # fmt: skip
    return path


def _run(code: Path, argv: list[str], threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=code, env=env, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed in {code}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def run_family(code: Path, label: str, family: str, args) -> dict:
    """Distil, then train ``family`` with the code at ``code``; figures of both."""
    out = WORK / f"{label}-{args.target}-{family}"
    shutil.rmtree(out, ignore_errors=True)
    common = [f"recipe={family}", f"target={args.target}", f"prompts.limit={args.prompts}",
              f"distill.max_new_tokens={args.new_tokens}", f"distill.out={out / 'data'}",
              f"train.threads={args.threads}"]  # fmt: skip
    seconds = _run(code, ["-m", "data.distill", *common], args.threads)
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    _run(code, ["train/drafter.py", *common, f"output_dir={out}", f"train.steps={args.steps}",
                f"drafter.vp_steps={args.steps}", "train.warmup_steps=2",
                f"drafter.heldout_rows={max(4, args.prompts // 8)}",
                "train.save_every=100000", "train.log_every=4", "final_eval.limit=0"],
         args.threads)  # fmt: skip
    metrics = json.loads((out / "drafter" / "training.json").read_text())["metrics"]
    steps = sum(s["steps"] for s in metrics["stages"].values()) if "stages" in metrics else (
        metrics["steps"])  # fmt: skip
    return {
        "distill_tok_s": manifest["response_tokens"] / seconds,
        "distill_seconds": seconds,
        "signals": manifest["teacher_signals"],
        "s_per_step": metrics["seconds"] / steps,
        "loss": metrics["train_loss"],
        "precision": metrics.get("mixed_precision", "no"),
        "data": out / "data",
    }


def useful_flops(family: str, args, data_dir: Path) -> tuple[float, float]:
    """(FLOPs of one optimiser step's drafter forward + backward, counted and scaled by the
    real-token share; that share) on a batch of the new code's data."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.drafter import TargetInfo
    from models.registry import DRAFTERS, load_families
    from models.target import load_target
    from recipes import load_config
    from train.batches import MicroBatches, load_rows, teacher_signals

    cfg = load_config([f"recipe={family}", f"target={args.target}"])
    target, tokenizer = load_target(args.target, cfg.target_dtype.value, "cpu")
    load_families()
    info = TargetInfo.of(target, tokenizer, args.target)
    drafter = DRAFTERS[family].from_recipe(cfg.drafter, target, info, tokenizer=tokenizer)
    rows, manifest = load_rows(data_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = MicroBatches(rows, cfg.train.batch_size, 0, 0, 1, pad, cfg.train.max_seq_len,
                           manifest["teacher_signals"]["hidden_layers"])  # fmt: skip
    batch = next(batches(0))
    share = float(batch.attention_mask.float().mean())
    stages = drafter.stages()
    total = 0.0
    for stage in stages:
        module = stage.module
        prepared = module.prepare_batch(batch)
        teacher = teacher_signals(target, prepared, module)
        with FlopCounterMode(display=False) as counter:
            out = module.objective(module(prepared, teacher), prepared, teacher)
            out.loss.backward()
        total += counter.get_total_flops()
    return total / len(stages) * share, share


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="", help="old code to compare with (a git ref)")
    parser.add_argument("--target", default="stdlib-llama")
    parser.add_argument("--families", default="dflash,d2sd,draft_lm")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table, best = limits()
    lines = ["| product | float32 GFLOP/s | bfloat16 GFLOP/s |", "| --- | --- | --- |"]
    lines += [f"| {n} | {r['float32']:.0f} | {r['bfloat16']:.0f} |" for n, r in table.items()]
    print("\n".join(lines), flush=True)
    versions = {"new": REPO} | ({f"old ({args.ref})": worktree(args.ref)} if args.ref else {})
    rows = []
    for family in args.families.split(","):
        results = {}
        for label, code in versions.items():
            results[label] = run_family(code, label.split()[0], family, args)
            print(f"{family} {label}: {results[label]}", flush=True)
        flops, share = useful_flops(family, args, results["new"]["data"])
        for label, r in results.items():
            achieved = flops / r["s_per_step"] / 1e9
            speedup = results[label]["s_per_step"] / results["new"]["s_per_step"]
            rows.append(
                f"| {family} | {label} | {r['precision']} | {r['s_per_step']:.3f} | "
                f"{'' if label == 'new' else f'{speedup:.2f}x slower'} | {flops / 1e9:.1f} | "
                f"{share:.0%} | {achieved:.0f} | {achieved / best['bfloat16']:.0%} | "
                f"{r['loss']:.3f} | {r['distill_tok_s']:.0f} |"
            )
    from models.target import load_target

    model, _ = load_target(args.target, "float32", "cpu")
    params = sum(p.numel() for p in model.parameters())
    compute_floor = best["bfloat16"] * 1e9 / (2 * params)
    header = (
        "| family | code | precision | s / step | | useful GFLOP / step | real tokens | "
        "achieved GFLOP/s | of bf16 limit | last loss | distill tok/s |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    text = (
        f"## Throughput: training and distillation against this machine's limit "
        f"(`python -m benchmarks.throughput {' '.join(argv)}`)\n\n"
        f"Machine: CPU, {args.threads} torch thread(s), {time.strftime('%Y-%m-%d')}. "
        f"Target `{args.target}` ({params / 1e6:.1f}M parameters), {args.prompts} prompts x "
        f"{args.new_tokens} new tokens, {args.steps} steps a stage. Matmul limit at "
        f"{args.threads} thread(s): float32 {best['float32']:.0f}, bfloat16 "
        f"{best['bfloat16']:.0f} GFLOP/s.\n\n" + "\n".join(lines) + "\n\n" + header + "\n"
        + "\n".join(rows) + "\n\n"
        f"Distillation compute limit (bf16 limit / 2 x parameters): {compute_floor:.0f} "
        "tokens/s. Useful FLOPs: the drafter's forward + backward as counted by "
        "`FlopCounterMode`, times the real-token share; the target's forward is not counted. "
        "Distill tok/s: response tokens over the whole `data.distill` command, start-up and "
        "model loading included (for the loop itself see `distill_throughput`). Last loss: "
        "each version's own recipe and data (a bf16 target's greedy data differs from "
        "float32's at near-ties), so not one objective.\n"
    )  # fmt: skip
    print(text)
    write_section(f"throughput-{args.target}", text)


if __name__ == "__main__":
    main(sys.argv[1:])
