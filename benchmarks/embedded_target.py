"""The embedded default target: training figures, decode-step latency and a greedy sample.

    python -m benchmarks.embedded_target

Measures, at batch 1 on this machine: the time of one decode step (a forward of one token with
the KV cache of a ~200-token prompt) and end-to-end greedy ``generate`` tokens/s on held-out
evaluation prompts; reads the training figures from the target's ``provenance.json``.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from benchmarks.results import machine, write_section
from data.prompts import load_prompts
from models.embedded import EMBEDDED_TARGETS
from models.target import cache_arg, load_target, returned_cache


@torch.no_grad()
def decode_step_ms(model, prompt_ids: torch.Tensor, steps: int = 64) -> list[float]:
    """Wall time (ms) of each of ``steps`` single-token forwards after prefilling the prompt."""
    out = model(input_ids=prompt_ids, use_cache=True)
    cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(input_ids=token, **cache_arg(model, cache), use_cache=True)
        times.append((time.perf_counter() - start) * 1000)
        cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
    return times


@torch.no_grad()
def generate_tokens_per_s(model, tokenizer, prompts, max_new_tokens: int = 64) -> float:
    new_tokens, seconds = 0, 0.0
    for prompt in prompts:
        ids = tokenizer(prompt.text, return_tensors="pt").input_ids
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        seconds += time.perf_counter() - start
        new_tokens += out.shape[1] - ids.shape[1]
    return new_tokens / seconds


def main() -> None:
    name = "stdlib-llama"
    model, tokenizer = load_target(name, "float32", "cpu")
    provenance = json.loads((EMBEDDED_TARGETS[name] / "provenance.json").read_text())
    prompts = load_prompts("stdlib-eval")
    longest = max(prompts, key=lambda p: len(p.text))
    prompt_ids = tokenizer(longest.text, return_tensors="pt").input_ids[:, -200:]
    decode_step_ms(model, prompt_ids, steps=8)  # warm-up
    times = sorted(decode_step_ms(model, prompt_ids))
    median, p90 = statistics.median(times), times[int(0.9 * len(times))]
    sample = [p for p in prompts if p.category == "function_body"][:16]
    tps = generate_tokens_per_s(model, tokenizer, sample)
    first = sample[0]
    ids = tokenizer(first.text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=48, do_sample=False)
    continuation = tokenizer.decode(out[0, ids.shape[1] :])
    train, evaluation = provenance["training"], provenance["eval"]
    report = f"""## Embedded target `{name}`

Measured by `python -m benchmarks.embedded_target` on {machine()}.

| figure | value |
| --- | --- |
| parameters | {provenance["model"]["parameters"] / 1e6:.2f} M ({provenance["model"]["saved_dtype"]} on disk) |
| training | {train["steps"]} steps, {train["tokens_seen"] / 1e6:.2f} M tokens, {train["train_seconds"] / 60:.0f} min on {train["device"]} |
| train loss (last log window) | {train["train_loss_last_window"]:.3f} nats/token |
| held-out loss ({evaluation["heldout_windows"]} windows of {train["seq_len"]} tokens, saved weights) | {evaluation["heldout_loss"]:.3f} nats/token |
| decode step, batch 1, fp32, 200-token context | median {median:.1f} ms, p90 {p90:.1f} ms |
| HF `generate` greedy, 16 held-out `function_body` prompts, 64 new tokens | {tps:.1f} tokens/s |

Greedy continuation of held-out prompt `{first.id}` (48 tokens):

```python
{first.text[-300:]}{continuation}
```
"""
    print(report)
    write_section("embedded_target", report)


if __name__ == "__main__":
    main()
