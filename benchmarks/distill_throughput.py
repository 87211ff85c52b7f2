"""Distillation throughput: the regeneration loop before and after issue 24, HF ``generate``, and
whole shard builds (generation + teacher signals), measured side by side in one run.

    python -m benchmarks.distill_throughput [--target stdlib-llama] [--prompts 64]
        [--max-new 256] [--batch 8] [--sweep 8,16,32,64] [--dtypes float32,bfloat16] [--threads 1]

Targets: the embedded ``stdlib-llama`` (default; fp32 and, where the CPU has bf16, bf16) on the
bundled ``stdlib-distill`` prompts, or ``smollm2-135m-instruct`` (bf16) on ``chat-distill``.
For every dtype, greedy:

- regeneration at ``--batch``, prompts in their order (as the old ``build_shard`` batched them):
  new tokens/s of the old loop (``_old_generate``, kept here for the comparison only), of
  ``data.generate.generate`` and of HF ``generate``, alternating batch by batch so that machine
  noise hits all three, and how many rows are token-identical;
- ``data.distill.build_shard`` at each ``--sweep`` batch size, with teacher signals (top-8
  logprobs and 3 hidden layers): new tokens/s of its generation (prompts sorted by length) and
  of the whole build (generation + signals, and the shard written to disk).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.results import machine, write_section
from data.generate import Sampling, generate, left_pad, next_tokens
from data.prompts import load_prompts
from models.target import cache_arg, load_target
from recipes.schema import DistillConfig

TARGETS = {  # target -> (prompt set, dtypes measured by default)
    "stdlib-llama": ("stdlib-distill", ("float32", "bfloat16")),
    "smollm2-135m-instruct": ("chat-distill", ("bfloat16",)),
}
SECTIONS = {  # target -> its section of benchmarks/results/RESULTS.md
    "stdlib-llama": "distill_throughput",
    "smollm2-135m-instruct": "distill_throughput_smollm2",
}


@torch.no_grad()
def _old_generate(model, prompts, sampling, eos_id, pad_id, generator=None) -> list[list[int]]:
    """``data.generate.generate`` as it was before issue 24, for the comparison only: a
    ``DynamicCache`` grown by concatenation, full-vocabulary logits at every prompt position in
    the prefill, a mask grown by one column a step, a Python append per row and step."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    step_ids = ids
    for _ in range(sampling.max_new_tokens):
        logits = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            **cache_arg(model, cache),
            use_cache=True,
        ).logits[:, -1]
        if sampling.greedy:
            chosen = logits.argmax(-1)
        else:
            chosen = next_tokens(logits, sampling, generator).to(device)
        chosen = torch.where(done, torch.full_like(chosen, pad_id), chosen)
        for row in (~done).nonzero().flatten().tolist():
            outputs[row].append(int(chosen[row]))
        done |= chosen == eos_id
        if bool(done.all()):
            break
        step_ids = chosen[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=-1)
    return outputs


def _trim(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@torch.no_grad()
def hf_generate(model, batch: list[list[int]], max_new: int, eos: int, pad: int) -> list[list[int]]:
    ids, mask = left_pad(batch, pad)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    return [_trim(row[ids.shape[1] :].tolist(), eos) for row in out]


def compare(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new: int) -> dict:
    """Old loop, new loop and HF ``generate`` on the same batches, alternating per batch."""
    eos, pad = tokenizer.eos_token_id, _pad_id(tokenizer)
    sampling = Sampling(max_new_tokens=max_new)
    runs = {
        "old": lambda b: _old_generate(model, b, sampling, eos, pad),
        "new": lambda b: generate(model, b, sampling, eos, pad),
        "hf": lambda b: hf_generate(model, b, max_new, eos, pad),
    }
    seconds, tokens = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0)
    same_old = same_hf = 0
    for i in range(0, len(prompts), batch_size):
        batch, made = prompts[i : i + batch_size], {}
        for name, run in runs.items():
            start = time.perf_counter()
            made[name] = run(batch)
            seconds[name] += time.perf_counter() - start
            tokens[name] += sum(len(r) for r in made[name])
        same_old += sum(a == b for a, b in zip(made["new"], made["old"], strict=True))
        same_hf += sum(a == b for a, b in zip(made["new"], made["hf"], strict=True))
    rates = {name: tokens[name] / seconds[name] for name in runs}
    return {**rates, "same_old": same_old, "same_hf": same_hf, "n": len(prompts)}


def build(model, tokenizer, items, batch_size: int, max_new: int, hidden_layers: list[int]):
    """One ``build_shard`` with teacher signals, then the shard written as ``build_dataset``
    writes it; new tokens/s of the generation, of the build, and of build + write."""
    import datasets

    from data.distill import build_shard, row_features

    cfg = DistillConfig(
        max_new_tokens=max_new, batch_size=batch_size, topk_logprobs=8, hidden_layers=hidden_layers
    )
    generated = {"tokens": 0, "at": 0.0}

    def on_batch(_prompts: int, n_tokens: int) -> None:
        generated["tokens"] += n_tokens
        generated["at"] = time.perf_counter()

    start = time.perf_counter()
    rows = build_shard(model, tokenizer, items, cfg, seed=0, on_batch=on_batch)
    built = time.perf_counter()
    features = row_features(cfg, model.config.get_text_config().hidden_size)
    with tempfile.TemporaryDirectory() as folder:
        datasets.Dataset.from_list(rows, features=features).save_to_disk(folder)
    written = time.perf_counter()
    n = generated["tokens"]
    return {
        "generation": n / (generated["at"] - start),
        "build": n / (built - start),
        "written": n / (written - start),
        "signals_s": built - generated["at"],
    }


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def main(argv: list[str] | None = None) -> None:
    from data.distill import screen

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="stdlib-llama", choices=sorted(TARGETS))
    parser.add_argument("--prompts", type=int, default=64, help="first N prompts of the set")
    parser.add_argument("--max-new", type=int, default=256, help="new tokens at most per prompt")
    parser.add_argument("--batch", type=int, default=8, help="batch of the old/new/HF comparison")
    parser.add_argument("--sweep", default="8,16,32,64", help="build_shard batch sizes")
    parser.add_argument("--dtypes", default="", help="default: fp32+bf16 embedded, bf16 SmolLM2")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    source, default_dtypes = TARGETS[args.target]
    dtypes = args.dtypes.split(",") if args.dtypes else list(default_dtypes)
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported() and not torch.cuda.is_available():
        dtypes = [d for d in dtypes if d != "bfloat16"]  # bf16 is emulated (slow) without it
    sweep = [int(b) for b in args.sweep.split(",") if b]
    compared, built = [], []
    for dtype in dtypes:
        torch.manual_seed(0)
        model, tokenizer = load_target(args.target, dtype, "cpu")
        items, _ = screen(load_prompts(source)[: args.prompts], tokenizer, 1024)
        prompts = [ids for _, ids in items]
        layers = model.config.get_text_config().num_hidden_layers
        hidden_layers = [1, layers // 2, layers]
        compare(model, tokenizer, prompts[:2], 2, 8)  # warm-up
        r = compare(model, tokenizer, prompts, args.batch, args.max_new)
        compared.append(
            f"| {dtype} | {args.batch} | {r['old']:.0f} | {r['new']:.0f} | {r['hf']:.0f} | "
            f"{r['new'] / r['old']:.2f}x | {r['new'] / r['hf']:.2f}x | "
            f"{r['same_old']}/{r['n']} | {r['same_hf']}/{r['n']} |"
        )
        print(compared[-1], flush=True)
        for batch_size in sweep:
            b = build(model, tokenizer, items, batch_size, args.max_new, hidden_layers)
            built.append(
                f"| {dtype} | {batch_size} | {b['generation']:.0f} | {b['build']:.0f} | "
                f"{b['written']:.0f} | {b['signals_s']:.1f} |"
            )
            print(built[-1], flush=True)
        del model
    lengths = sorted(len(p) for p in prompts)
    report = f"""## Distillation throughput: `{args.target}`

Measured by `python -m benchmarks.distill_throughput --target {args.target} --prompts \
{args.prompts} --max-new {args.max_new} --batch {args.batch} --sweep {args.sweep}` on \
{machine()}: the first {len(prompts)} `{source}` prompts ({lengths[0]}-{lengths[-1]} tokens, \
median {lengths[len(lengths) // 2]}), greedy, {args.max_new} new tokens at most; new tokens/s.

Regeneration at batch {args.batch}, prompts in order; old loop (before issue 24), new
`data.generate`, HF `generate` alternate batch by batch:

| dtype | batch | old | new | HF generate | new / old | new / HF | = old | = HF |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(compared)}

`build_shard` (prompts sorted by length, teacher signals: top-8 logprobs and hidden layers \
{hidden_layers}): its generation, the whole build, and build + writing the shard; the \
seconds spent on teacher signals:

| dtype | batch | generation | build | build + write | signals (s) |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(built)}
"""
    print(report)
    write_section(SECTIONS[args.target], report)


if __name__ == "__main__":
    main()
