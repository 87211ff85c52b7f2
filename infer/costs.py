"""The cost model of one speculative cycle on this device, and the choices made with it.

A cycle costs ``draft + verify(n) + other``: the drafter's time, the target's verification of
the root plus an n-node tree, and the loop's own work (acceptance, cache bookkeeping). Plain
decoding is the same loop with n = 0 and no draft. ``verify`` is measured on the device
(``infer/tune.py``) at a few tree sizes; n = 0 keeps its measured time (a one-token forward runs
other kernels and is markedly cheaper on a CPU), larger trees follow the least-squares line
through the measurements (on a CPU single timings scatter by 10-20%; the line averages them).

Expected tokens per cycle, 1 + the expected accepted length, comes either from the drafter's
own probabilities (the per-cycle cut of a best-first tree, ``cut``) or from replaying
held-out prompts (``infer/tune.py``), and ``best`` picks the settings with the most predicted
tokens per second.
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import dataclass, field

import torch

from infer.decode import _clock, decode
from infer.tree import DraftTree
from infer.verify import crop, verify_tree
from models.target import cache_arg

SIZES = (0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64)  # verified nodes the cost curve is timed at


@dataclass
class CostModel:
    """Attributes:
    sizes, verify_s: tree sizes n (root not counted) and seconds to verify root + n nodes,
        measured on one device at one context length (sorted by size).
    other_s: seconds of the loop's own work per cycle.
    device: where it was measured.
    """

    sizes: list[int]
    verify_s: list[float]
    other_s: float = 0.0
    device: str = ""
    context: int = 0  # context length the verification was timed at
    _line: tuple[float, float] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not self.sizes or len(self.sizes) != len(self.verify_s):
            raise ValueError("a cost curve needs one verification time per tree size")
        order = sorted(range(len(self.sizes)), key=self.sizes.__getitem__)
        self.sizes = [int(self.sizes[i]) for i in order]
        self.verify_s = [float(self.verify_s[i]) for i in order]
        self._line = _fit_line(
            [n for n in self.sizes if n > 0],
            [s for n, s in zip(self.sizes, self.verify_s, strict=True) if n > 0],
        )

    def verify(self, n: int) -> float:
        """Seconds to verify root + ``n`` nodes: the measured time for n = 0 (one-token steps
        take their own, cheaper kernels), else the least-squares line through the measured
        sizes >= 1 (slope >= 0: timing noise averaged out, a larger tree never cheaper)."""
        if (n <= 0 and self.sizes[0] == 0) or self._line is None:
            return self.verify_s[0]
        intercept, slope = self._line
        return intercept + slope * max(n, 0)

    def plain_token_s(self) -> float:
        """Seconds per token of plain decoding."""
        return self.verify(0) + self.other_s

    def cycle_s(self, nodes: int, draft_s: float) -> float:
        return draft_s + self.verify(nodes) + self.other_s

    def to_json(self) -> dict:
        return {"sizes": self.sizes, "verify_s": self.verify_s, "other_s": self.other_s,
                "device": self.device, "context": self.context}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> CostModel:
        return cls(data["sizes"], data["verify_s"], data.get("other_s", 0.0),
                   data.get("device", ""), data.get("context", 0))  # fmt: skip


def _fit_line(xs: list[int], ys: list[float]) -> tuple[float, float] | None:
    """(intercept, slope >= 0) of the least-squares line through the points (None: no point)."""
    if not xs:
        return None
    if len(xs) == 1:
        return ys[0], 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx)
    return my - slope * mx, slope


def cut(path_probs: list[float], costs: CostModel, draft_s: float) -> int:
    """How many nodes of a best-first tree to verify (CaDDTree): with nodes in non-increasing
    path probability, the first n give 1 + sum of their path probabilities expected tokens for
    ``draft_s + verify(n) + other`` seconds; the n with the most tokens per second is kept, so
    the tree stops where a node's expected tokens no longer pay for its verification time."""
    best_n, best_rate, expected = 0, 1.0 / costs.cycle_s(0, draft_s), 1.0
    for n, p in enumerate(path_probs, start=1):
        expected += p
        rate = expected / costs.cycle_s(n, draft_s)
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


@dataclass
class Replay:
    """One candidate setting replayed on held-out prompts at T = 0: what it would cost and
    emit. ``nodes`` and ``accepted`` are per cycle; ``draft_s`` the drafter's total time."""

    settings: dict
    tokens: int
    nodes: list[int]
    accepted: list[int]
    draft_s: float

    @property
    def cycles(self) -> int:
        return len(self.nodes)

    @property
    def tau(self) -> float:
        return self.tokens / max(1, self.cycles)

    def seconds(self, costs: CostModel) -> float:
        """Predicted decoding time: the drafter as timed, verification and the loop's work from
        the cost model."""
        return self.draft_s + sum(costs.verify(n) + costs.other_s for n in self.nodes)

    def predicted_speedup(self, costs: CostModel) -> float:
        """Predicted tokens/s over plain decoding's on the same device."""
        return self.tokens * costs.plain_token_s() / max(self.seconds(costs), 1e-12)


def best(replays: list[Replay], costs: CostModel) -> Replay:
    """The setting with the highest predicted speedup (the first one on a tie)."""
    if not replays:
        raise ValueError("no candidate settings to choose from")
    return max(replays, key=lambda r: r.predicted_speedup(costs))


def device_name(target) -> str:
    """Where the target runs, as tuned settings and cost curves are keyed: the device, and the
    target's dtype unless float32 (its kernels, so its costs, differ: on a CPU with AVX512-BF16 a
    bfloat16 forward over 9 tokens costs 1.2x a one-token step, a float32 one 1.6x)."""
    if target.device.type == "cuda":
        name = torch.cuda.get_device_name(target.device)
    else:
        name = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    dtype = getattr(target, "dtype", torch.float32)
    return name if dtype == torch.float32 else f"{name}, {str(dtype).removeprefix('torch.')}"


@torch.no_grad()
def measure_costs(
    target, context: int = 128, sizes=SIZES, repeats: int = 7, seed: int = 0
) -> CostModel:
    """Time the verification of root + n nodes after ``context`` cached tokens (the sizes
    interleaved, ``repeats`` rounds, the median per size, so drift hits every size alike), and
    from a short plain decode the loop's other work per cycle and the one-token step (n = 0):
    timed between large trees, a one-token step measured 10-30% slower than in plain decoding
    on the 2-core CPU, which made every predicted speedup optimistic by as much
    (``benchmarks/tuner_prediction.py``)."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    limit = getattr(target.config, "max_position_embeddings", None) or 4096
    context = max(2, min(context, limit - max(sizes) - 40))
    ids = torch.randint(0, vocab, (context + max(sizes) + 1,), generator=generator).tolist()
    cache = DynamicCache(config=target.config)
    prefix = torch.tensor([ids[: context - 1]], device=target.device)
    target(input_ids=prefix, **cache_arg(target, cache), logits_to_keep=1)
    root, times = ids[context - 1], {n: [] for n in sizes}
    for round_ in range(repeats + 1):  # round 0: warm-up
        for n in sizes:
            tree = DraftTree.chain(ids[context : context + n])
            start = _clock(target.device)
            verify_tree(target, cache, context - 1, root, tree)
            if round_:
                times[n].append(_clock(target.device) - start)
            crop(cache, context - 1)
    decode(target, ids[:context], 8, None)  # warm-up
    plain = decode(target, ids[:context], 32, None)
    other = (plain.total_s - plain.prefill_s - plain.verify_s - plain.draft_s) / plain.cycles
    seconds = [statistics.median(times[n]) for n in sizes]
    if 0 in sizes:  # the one-token step as plain decoding runs it: back to back
        seconds[list(sizes).index(0)] = plain.verify_s / plain.cycles
    return CostModel(list(sizes), seconds, max(0.0, other), device_name(target), context)
