"""Regeneration throughput: ``data.generate`` vs Hugging Face ``generate``, side by side.

    python -m benchmarks.distill_throughput [N_PROMPTS] [MAX_NEW_TOKENS]

On the embedded target, greedy, the bundled eval prompts: new tokens/s of our batched loop and of
HF ``generate`` at batch 1 and at the distillation batch size, measured in one run (alternating
per batch so that machine noise hits both), and whether the outputs are token-identical.
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks.results import machine, write_section
from data.generate import Sampling, generate, left_pad
from data.prompts import load_prompts
from models.target import load_target


def _trim(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@torch.no_grad()
def hf_generate(model, batch: list[list[int]], max_new: int, eos: int, pad: int) -> list[list[int]]:
    ids, mask = left_pad(batch, pad)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=pad
    )
    return [_trim(row[ids.shape[1] :].tolist(), eos) for row in out]


def run(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new: int) -> dict:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling = Sampling(max_new_tokens=max_new)
    seconds = {"ours": 0.0, "hf": 0.0}
    tokens = {"ours": 0, "hf": 0}
    identical = 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        start = time.perf_counter()
        ours = generate(model, batch, sampling, eos, pad)
        seconds["ours"] += time.perf_counter() - start
        start = time.perf_counter()
        ref = hf_generate(model, batch, max_new, eos, pad)
        seconds["hf"] += time.perf_counter() - start
        tokens["ours"] += sum(len(r) for r in ours)
        tokens["hf"] += sum(len(r) for r in ref)
        identical += sum(a == b for a, b in zip(ours, ref, strict=True))
    return {
        "ours_tok_s": tokens["ours"] / seconds["ours"],
        "hf_tok_s": tokens["hf"] / seconds["hf"],
        "identical": identical,
        "n": len(prompts),
    }


def main(argv: list[str]) -> None:
    n_prompts = int(argv[0]) if argv else 32
    max_new = int(argv[1]) if len(argv) > 1 else 64
    torch.manual_seed(0)
    model, tokenizer = load_target("stdlib-llama", "float32", "cpu")
    prompts = [
        tokenizer(p.text, add_special_tokens=False)["input_ids"]
        for p in load_prompts("stdlib-eval")[:n_prompts]
    ]
    run(model, tokenizer, prompts[:2], 2, 8)  # warm-up
    rows = []
    for batch_size in (1, 8):
        r = run(model, tokenizer, prompts, batch_size, max_new)
        rows.append(
            f"| {batch_size} | {r['ours_tok_s']:.1f} | {r['hf_tok_s']:.1f} | "
            f"{r['ours_tok_s'] / r['hf_tok_s']:.2f}x | {r['identical']}/{r['n']} |"
        )
    report = f"""## Distillation regeneration throughput

Measured by `python -m benchmarks.distill_throughput {n_prompts} {max_new}` on {machine()}:
embedded target `stdlib-llama` (fp32), the first {n_prompts} `stdlib-eval` prompts, greedy,
{max_new} new tokens at most; ours and HF `generate` alternate batch by batch in one run.

| batch | ours (new tok/s) | HF generate (new tok/s) | ours / HF | token-identical |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}
"""
    print(report)
    write_section("distill_throughput", report)


if __name__ == "__main__":
    main(sys.argv[1:])
