"""Aggregate per-prompt decoding records into the evaluation report (JSON, Markdown, PNG).

Definitions (pinned, see tests):
- τ = emitted tokens / target forwards after the prefill (plain decoding: 1.00).
- acceptance at draft position k = share of cycles whose k-th draft token was accepted.
- speedup (the headline, Spec-Bench's definition) = mean over prompts of the speculative run's
  tokens/s divided by the mean over prompts of plain decoding's tokens/s, with the prefill
  included (``speedup``) and excluded (``speedup_excluding_prefill``).
- speedup_ratio_mean = mean over prompts of (plain time per token / speculative time per
  token), prefill included: every prompt weighs the same, so on long-tailed prompt sets it
  differs from the headline (a few prompts with a large ratio pull it up).
  Both are per token, because under sampling the two runs of a prompt emit different numbers
  of tokens (under greedy they emit the same); ``spec_tokens_per_s`` / ``plain_tokens_per_s``
  are totals over all prompts, prefill excluded.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from infer.decode import DecodeResult


@dataclass
class PromptRecord:
    category: str
    plain: DecodeResult
    spec: DecodeResult
    identical: bool | None  # greedy only: same tokens as plain decoding
    parting_gap: float | None = None  # the target's top-2 logit gap where the runs part


NEAR_TIE = 0.125  # top-2 logit gap under which a low-precision mismatch counts as a near-tie


def _per_token(run, with_prefill: bool) -> float:
    """Seconds per emitted token of one decoding run."""
    seconds = run.total_s if with_prefill else run.total_s - run.prefill_s
    return max(seconds, 1e-9) / max(1, len(run.tokens))


def specbench_speedup(records: list[PromptRecord], with_prefill: bool = True) -> float:
    """Spec-Bench: mean per-prompt tokens/s of the speculative runs over that of plain decoding."""
    spec = statistics.fmean(1 / _per_token(r.spec, with_prefill) for r in records)
    plain = statistics.fmean(1 / _per_token(r.plain, with_prefill) for r in records)
    return spec / plain


def summarize(records: list[PromptRecord], num_draft: int) -> dict:
    """Figures for one group of prompts."""
    spec_tokens = sum(len(r.spec.tokens) for r in records)
    plain_tokens = sum(len(r.plain.tokens) for r in records)
    cycles = sum(r.spec.cycles for r in records)
    accepted = [a for r in records for a in r.spec.accepted]
    depth = max([num_draft, *accepted]) if accepted else num_draft
    spec_s = sum(r.spec.total_s for r in records)
    spec_decode_s = sum(r.spec.total_s - r.spec.prefill_s for r in records)
    plain_decode_s = sum(r.plain.total_s - r.plain.prefill_s for r in records)
    draft_s = sum(r.spec.draft_s for r in records)
    verify_s = sum(r.spec.verify_s for r in records)
    checked = [r for r in records if r.identical is not None]
    histogram = Counter(accepted)
    return {
        "prompts": len(records),
        "tau": spec_tokens / max(1, cycles),
        "acceptance_per_position": [
            sum(a >= k for a in accepted) / max(1, len(accepted)) for k in range(1, depth + 1)
        ],
        "accepted_length_histogram": {str(k): histogram[k] for k in range(depth + 1)},
        "spec_tokens_per_s": spec_tokens / max(spec_decode_s, 1e-9),
        "plain_tokens_per_s": plain_tokens / max(plain_decode_s, 1e-9),
        "speedup": specbench_speedup(records, True),
        "speedup_excluding_prefill": specbench_speedup(records, False),
        "speedup_ratio_mean": statistics.fmean(
            _per_token(r.plain, True) / _per_token(r.spec, True) for r in records
        ),
        "time_split": {
            "prefill": sum(r.spec.prefill_s for r in records) / spec_s,
            "draft": draft_s / spec_s,
            "verify": verify_s / spec_s,
            "other": (spec_decode_s - draft_s - verify_s) / spec_s,
        },
        "lossless": (
            {
                "identical": sum(r.identical for r in checked),
                "checked": len(checked),
                "mismatches_on_near_ties": sum(
                    r.parting_gap is not None and r.parting_gap <= NEAR_TIE for r in checked
                ),
                "parting_gaps": sorted(
                    round(r.parting_gap, 4) for r in checked if r.parting_gap is not None
                ),
            }
            if checked
            else None
        ),
        "new_tokens": spec_tokens,
    }


def report(records: list[PromptRecord], num_draft: int) -> dict:
    by_category: dict[str, list[PromptRecord]] = {}
    for r in records:
        by_category.setdefault(r.category, []).append(r)
    return {
        "overall": summarize(records, num_draft),
        "per_category": {c: summarize(rs, num_draft) for c, rs in sorted(by_category.items())},
    }


SPEEDUP_NOTE = (
    "Speedup: Spec-Bench's definition (mean per-prompt tokens/s over plain decoding's mean "
    "per-prompt tokens/s, same engine, same run); with `repeats=N` the median over N rotations "
    "of the prompts and, in brackets, their range. Mean time ratio: the mean over prompts of "
    "plain time / speculative time per token (every prompt weighs the same)."
)


def lossless_text(lossless: dict | None, sampling: str = "sampling") -> str:
    """Prompts token-identical as N/M, with the mismatches on near-ties and the widest top-2 gap
    any mismatch parted on; ``sampling`` at T > 0."""
    if lossless is None:
        return sampling
    text = f"{lossless['identical']}/{lossless['checked']}"
    notes = []
    if lossless.get("mismatches_on_near_ties"):
        notes.append(f"{lossless['mismatches_on_near_ties']} on near-ties")
    if lossless.get("parting_gaps"):
        notes.append(f"widest gap {max(lossless['parting_gaps']):.3g}")
    return f"{text} ({'; '.join(notes)})" if notes else text


def _lossless_cell(figures: dict) -> str:
    return lossless_text(figures["lossless"], "sampling (see tests)")


def _where(meta: dict) -> str:
    """The dtype and device ("float32 on CPU (...)"); a device name with its dtype alone."""
    if meta["device"].endswith(meta["dtype"]):
        return meta["device"]
    return f"{meta['dtype']} on {meta['device']}"


def _speedup_cell(figures: dict) -> str:
    """``1.23x``, or with several rotations (``repeats=N``) the median and their range."""
    low, high = figures.get("speedup_min"), figures.get("speedup_max")
    if low is None and figures.get("speedup_range"):
        low, high = figures["speedup_range"]
    cell = f"{figures['speedup']:.2f}x"
    return cell if low is None else f"{cell} ({low:.2f}–{high:.2f})"


def markdown(result: dict) -> str:
    """A Markdown summary: settings, one row per category plus overall, peers when measured."""
    meta = result["settings"]
    lines = [
        f"# Speculative decoding: `{meta['drafter']}` on `{meta['target']}`",
        "",
        f"Proposer {meta['proposer']}, {meta['prompts']} ({meta['n_prompts']} prompts), "
        f"max_new_tokens {meta['max_new_tokens']}, temperature {meta['temperature']}, "
        f"{_where(meta)}. Drafting: {meta.get('drafting', 'default')}.",
        "",
        SPEEDUP_NOTE,
        "",
        "| group | prompts | τ | speedup | speedup (no prefill) | mean time ratio | spec tok/s | "
        "plain tok/s | prefill / draft / verify / other | lossless |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups = [("overall", result["overall"]), *result["per_category"].items()]
    for name, f in groups:
        split = f["time_split"]
        lines.append(
            f"| {name} | {f['prompts']} | {f['tau']:.2f} | {_speedup_cell(f)} | "
            f"{f['speedup_excluding_prefill']:.2f}x | {f['speedup_ratio_mean']:.2f}x | "
            f"{f['spec_tokens_per_s']:.1f} | "
            f"{f['plain_tokens_per_s']:.1f} | {split['prefill']:.0%} / {split['draft']:.0%} / "
            f"{split['verify']:.0%} / {split['other']:.0%} | {_lossless_cell(f)} |"
        )
    acceptance = ", ".join(f"{a:.2f}" for a in result["overall"]["acceptance_per_position"])
    lines += ["", f"Acceptance per draft position (overall): {acceptance}."]
    if result.get("calibration"):
        cal = result["calibration"]
        lines += [
            "", f"Confidence calibration of drafter 1 at T = 0 ({cal['cycles']} cycles): "
            "prod of c_1..c_k against the target accepting slots 1..k (ECE 20 bins, AUROC, "
            "Brier).", "",
            "| slot | prefix accepted | ECE head | ECE softmax | AUROC head | AUROC softmax "
            "| Brier head | Brier softmax |", "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]  # fmt: skip
        for h, sm in zip(cal["head"]["per_slot"], cal["softmax"]["per_slot"], strict=True):
            lines.append(
                f"| {h['slot']} | {h['accept']:.2f} | {h['ece']:.3f} | {sm['ece']:.3f} | "
                f"{h['auroc']:.3f} | {sm['auroc']:.3f} | {h['brier']:.3f} | {sm['brier']:.3f} |"
            )
        lines.append(
            f"| mean | | {cal['head']['mean_ece']:.3f} | {cal['softmax']['mean_ece']:.3f} | | | "
            f"{cal['head']['mean_brier']:.3f} | {cal['softmax']['mean_brier']:.3f} |"
        )
    if result.get("peers"):
        lines += ["", "| Hugging Face peer (same prompts, same run) | tok/s | speedup vs HF generate "
                  "| identical to ours |", "| --- | --- | --- | --- |"]  # fmt: skip
        for name, peer in result["peers"].items():
            same = (
                "n/a" if peer.get("identical") is None else f"{peer['identical']}/{peer['checked']}"
            )
            lines.append(
                f"| {name} | {peer['tokens_per_s']:.1f} | {peer['speedup']:.2f}x | {same} |"
            )
    return "\n".join(lines) + "\n"


def acceptance_png(result: dict, path) -> None:
    """Bar chart of acceptance per draft position (overall and per category)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    groups = [("overall", result["overall"]), *result["per_category"].items()]
    width = 0.8 / len(groups)
    for i, (name, figures) in enumerate(groups):
        rates = figures["acceptance_per_position"]
        ax.bar([k + 1 + i * width for k in range(len(rates))], rates, width, label=name)
    ax.set_xlabel("draft position")
    ax.set_ylabel("share of cycles accepted")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['settings']['drafter']}: τ = {result['overall']['tau']:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comparison_markdown(run: dict) -> str:
    """Several drafters in one run: one overall table, one per category, the HF peers."""
    meta, rows = run["settings"], run["comparison"]
    lines = [
        f"# Speculative decoding on `{meta['target']}`: {len(rows)} drafters, one run",
        "",
        f"{meta['prompts']} ({meta['n_prompts']} prompts), max_new_tokens "
        f"{meta['max_new_tokens']}, temperature {meta['temperature']}, {_where(meta)}; "
        "every prompt decoded plainly once and by every drafter once, the "
        "order rotated per prompt.",
        "",
        SPEEDUP_NOTE,
        "",
        "| drafter | family | drafting | τ | speedup | mean time ratio | speedup (no prefill) | "
        "tok/s | prefill / draft / verify / other | lossless |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: -r["speedup"]):
        split = r["time_split"]
        lines.append(
            f"| {r['drafter']} | {r['family']} | {r['drafting']} | {r['tau']:.2f} | "
            f"{_speedup_cell(r)} | {r['speedup_ratio_mean']:.2f}x | "
            f"{r['speedup_excluding_prefill']:.2f}x | {r['spec_tokens_per_s']:.1f} | "
            f"{split['prefill']:.0%} / {split['draft']:.0%} / {split['verify']:.0%} / "
            f"{split['other']:.0%} | {r['lossless']} |"
        )
    plain = rows[0]["plain_tokens_per_s"] if rows else 0.0
    lines += ["", f"Plain decoding: {plain:.1f} tok/s (τ 1.00, speedup 1.00x)."]
    categories = sorted({c for r in rows for c in r["per_category"]})
    if len(categories) > 1:
        lines += ["", "Per category (τ / speedup):", "",
                  "| drafter | " + " | ".join(categories) + " |",
                  "| --- |" + " --- |" * len(categories)]  # fmt: skip
        for r in rows:
            cells = [
                f"{r['per_category'][c]['tau']:.2f} / {r['per_category'][c]['speedup']:.2f}x"
                if c in r["per_category"] else "" for c in categories
            ]  # fmt: skip
            lines.append(f"| {r['drafter']} | " + " | ".join(cells) + " |")
    if run.get("peers"):
        lines += ["", "| Hugging Face peer (same prompts, same run) | tok/s | tok/s over our "
                  "plain decoding | speedup vs HF generate | identical to the first drafter's |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, peer in run["peers"].items():
            same = (
                "n/a" if peer.get("identical") is None else f"{peer['identical']}/{peer['checked']}"
            )
            lines.append(
                f"| {name} | {peer['tokens_per_s']:.1f} | "
                f"{peer['tokens_per_s'] / max(plain, 1e-9):.2f}x | {peer['speedup']:.2f}x | "
                f"{same} |"
            )
    return "\n".join(lines) + "\n"


def speedup_tau_png(run: dict, path) -> None:
    """Speedup (headline) against τ, one labelled point per drafter, plain decoding at (1, 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.scatter([1.0], [1.0], color="grey", marker="s")
    ax.annotate("plain decoding", (1.0, 1.0), fontsize=7, xytext=(4, -10),
                textcoords="offset points")  # fmt: skip
    families = sorted({r["family"] for r in run["comparison"]})
    colours = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    for r in run["comparison"]:
        ax.scatter([r["tau"]], [r["speedup"]], color=colours[r["family"]], label=r["family"])
        ax.annotate(r["drafter"], (r["tau"], r["speedup"]), fontsize=6, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    ax.set_xlabel("τ (tokens per target forward)")
    ax.set_ylabel("speedup over plain decoding (Spec-Bench)")
    ax.set_title(f"{run['settings']['target']} on {run['settings']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
