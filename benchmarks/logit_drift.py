"""How far the target's logits move with the shape of the forward, by dtype.

    python -m benchmarks.logit_drift [N_PROMPTS] [MAX_NEW_TOKENS] [TARGET ...]

Speculative decoding is lossless when the target's logits at a position do not depend on how the
position was computed. In float32 that holds to within far less than any top-2 gap seen in
practice; in bfloat16 a multi-token verification forward rounds differently from a one-token
decode step, and a near-tie can flip. This measures the size of that effect, which is what a
bfloat16 speculative run's partings from plain decoding should be compared with.

For each target (default: the embedded ``stdlib-llama`` and, when installed,
``smollm2-135m-instruct``) and dtype, on N evaluation prompts: greedy plain decoding of
MAX_NEW_TOKENS tokens one step at a time (the plain path), then the same tokens fed over the same
prompt cache in chunks of ``CHUNK`` (the shape of a verification of the root + 4 drafted tokens).
At every position it compares the two paths' logits of the plain path's top-2 tokens: the change
of their gap, and whether the chunked path's argmax differs.
"""

from __future__ import annotations

import statistics
import sys

import torch

from benchmarks.results import machine, write_section
from benchmarks.verify_cost import DTYPES, default_targets
from infer.contenders import spread
from models.target import cache_arg, load_target, returned_cache

CHUNK = 5
PROMPTS = {"stdlib-llama": "stdlib-eval", "smollm2-135m-instruct": "chat-eval"}


@torch.no_grad()
def plain_path(model, prompt: list[int], n: int):
    """Greedy tokens and the logits at each position, one token per forward after the prefill."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    cache, logits, tokens = returned_cache(out), [out.logits[0, -1].float()], []
    for _ in range(n):
        tokens.append(int(logits[-1].argmax()))
        out = model(
            input_ids=torch.tensor([tokens[-1:]]), **cache_arg(model, cache), use_cache=True
        )
        logits.append(out.logits[0, -1].float())
    return tokens, torch.stack(logits[:-1])


@torch.no_grad()
def chunked_path(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits at the same positions, the generated tokens fed ``CHUNK`` at a time."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    cache, logits = returned_cache(out), [out.logits[0, -1:].float()]
    for start in range(0, len(tokens) - 1, CHUNK):
        chunk = torch.tensor([tokens[start : start + CHUNK][: len(tokens) - 1 - start]])
        out = model(input_ids=chunk, **cache_arg(model, cache), use_cache=True)
        logits.append(out.logits[0].float())
    return torch.cat(logits)


def drift(model, prompts: list[list[int]], n: int) -> dict:
    """Per position: the change of the plain path's top-2 gap, and argmax flips, over prompts."""
    changes, gaps, flips, flip_gaps = [], [], 0, []
    for prompt in prompts:
        tokens, single = plain_path(model, prompt, n)
        chunked = chunked_path(model, prompt, tokens)
        top2 = single.topk(2).indices
        gap_single = single.gather(1, top2)
        gap_single = gap_single[:, 0] - gap_single[:, 1]
        gap_chunked = chunked.gather(1, top2)
        gap_chunked = gap_chunked[:, 0] - gap_chunked[:, 1]
        changes += (gap_single - gap_chunked).abs().tolist()
        gaps += gap_single.tolist()
        flipped = chunked.argmax(-1) != top2[:, 0]
        flips += int(flipped.sum())
        flip_gaps += gap_single[flipped].tolist()
    changes.sort()
    return {
        "positions": len(changes),
        "median": statistics.median(changes),
        "p99": changes[int(0.99 * (len(changes) - 1))],
        "max": changes[-1],
        "flips": flips,
        "widest_flip": max(flip_gaps, default=None),
        "gaps_under_0.5": sum(g <= 0.5 for g in gaps),
    }


def main(argv: list[str]) -> None:
    from data.prompts import encode_prompt, load_prompts

    n_prompts = int(argv[0]) if argv else 12
    n = int(argv[1]) if len(argv) > 1 else 48
    targets = default_targets(argv[2:])
    lines = [
        "## Logit drift with the forward's shape (`python -m benchmarks.logit_drift`)",
        "",
        f"Machine: {machine()}. {n_prompts} evaluation prompts x {n} greedy tokens per target; "
        f"each position's logits from a one-token step (plain decoding) against the same "
        f"position in a {CHUNK}-token forward over the same cache (a verification of the root + "
        f"{CHUNK - 1} drafted tokens). Gap change: how much the top-2 logit gap of plain "
        "decoding moves between the two (logits). Flips: positions where the two paths pick "
        "different tokens; widest flip: the largest plain-path gap among them.",
        "",
        "| target | dtype | positions | gap change: median | p99 | max | flips | widest flip "
        "| gaps <= 0.5 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for target in targets:
        for dtype in DTYPES:
            model, tokenizer = load_target(target, dtype, "cpu")
            prompts = spread(load_prompts(PROMPTS.get(target, "chat-eval")), n_prompts)
            d = drift(model, [encode_prompt(tokenizer, p) for p in prompts], n)
            widest = "-" if d["widest_flip"] is None else f"{d['widest_flip']:.3f}"
            lines.append(
                f"| `{target}` | {dtype} | {d['positions']} | {d['median']:.2g} | "
                f"{d['p99']:.2g} | {d['max']:.2g} | {d['flips']} | {widest} | "
                f"{d['gaps_under_0.5']} |"
            )
            print(lines[-1], flush=True)
            del model
    text = "\n".join(lines)
    print(text)
    write_section("logit-drift", text)


if __name__ == "__main__":
    main(sys.argv[1:])
