"""What verifying a drafted tree costs against one decode step, by target dtype.

    python -m benchmarks.verify_cost [TARGET ...]

For each target (default: the embedded ``stdlib-llama`` and, when installed,
``smollm2-135m-instruct``) and each dtype (float32, bfloat16), times the target's verification
of the root plus n drafted tokens after a 200-token cached context on this machine
(``infer.tune.measure_costs``: the sizes interleaved, the median of 7 rounds). Speculation pays
only when drafted tokens are accepted faster than their verification grows, so the ratio of each
size to the one-token step decides how much it can pay on this device and dtype.
"""

from __future__ import annotations

import sys

from benchmarks.results import machine, write_section
from infer.tune import measure_costs
from models.target import load_target
from recipes import ConfigError

SIZES = (0, 1, 2, 3, 4, 8, 16, 32, 64)
DTYPES = ("float32", "bfloat16")


def smollm2_installed() -> bool:
    from models.gguf import smollm2_file

    try:
        smollm2_file()
    except ConfigError:
        return False
    return True


def default_targets(names: list[str]) -> list[str]:
    """``names``, or the embedded target and, when installed, SmolLM2."""
    return names or ["stdlib-llama"] + (["smollm2-135m-instruct"] if smollm2_installed() else [])


def main(argv: list[str]) -> None:
    targets = default_targets(argv)
    head = " | ".join(f"root + {n}" if n else "one token" for n in SIZES)
    lines = [
        "## Verification cost by target dtype (`python -m benchmarks.verify_cost`)",
        "",
        f"Machine: {machine()}. Batch 1, 200 cached context tokens, the median of 7 interleaved "
        "rounds. Each cell: ms to verify the root plus n drafted tokens (one forward), and its "
        "ratio to the one-token step of the same dtype.",
        "",
        f"| target | dtype | {head} |",
        "| --- | --- |" + " --- |" * len(SIZES),
    ]
    for target in targets:
        for dtype in DTYPES:
            model, _ = load_target(target, dtype, "auto")
            costs = measure_costs(model, context=200, sizes=SIZES)
            step = costs.verify_s[0]
            cells = " | ".join(
                f"{1e3 * s:.1f} ({s / step:.2f}x)" if n else f"{1e3 * s:.1f}"
                for n, s in zip(costs.sizes, costs.verify_s, strict=True)
            )
            lines.append(f"| `{target}` | {dtype} | {cells} |")
            print(lines[-1], flush=True)
            del model
    text = "\n".join(lines)
    print(text)
    write_section("verify-cost", text)


if __name__ == "__main__":
    main(sys.argv[1:])
