"""How fast bad input is refused: each command runs as a user runs it (a fresh process), timed
from start to its ``error:`` line. Every refusal should come from pre-flight, in seconds, before
the target's weights load or any data is built.

    python -m benchmarks.bad_input

Writes its section of ``benchmarks/results/RESULTS.md``. (``tests/test_bad_input.py`` holds the full
table and asserts the messages; this measures the wall time a user waits.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import write_section

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "train/drafter.py"]
EVAL = [sys.executable, "-m", "infer.eval"]


def small_drafter(folder: Path) -> Path:
    """A one-layer dflash drafter of the embedded target, untrained (only its files matter)."""
    from models.drafter import build_drafter
    from models.target import load_target
    from recipes import load_config

    target, tokenizer = load_target("stdlib-llama")
    cfg = load_config(["recipe=dflash", "drafter.num_layers=1"])
    drafter = build_drafter(cfg.drafter, target, tokenizer, "stdlib-llama")
    return drafter.save_pretrained(folder)


def cases(root: Path) -> list[tuple[str, list[str]]]:
    """(what, command) pairs; the bad files are written under ``root``."""
    (root / "malformed.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b" oops\n')
    (root / "empty.jsonl").write_text("")
    (root / "number.jsonl").write_text('{"prompt": 5}\n')
    (root / "a_file").write_text("x")
    no_weights = root / "no_weights"
    shutil.copytree(REPO / "models/embedded/stdlib-llama", no_weights,
                    ignore=shutil.ignore_patterns("*.safetensors"))  # fmt: skip
    drafter = small_drafter(root / "drafter")
    truncated = root / "truncated"
    shutil.copytree(drafter, truncated)
    (truncated / "model.safetensors").write_bytes(
        (drafter / "model.safetensors").read_bytes()[:999]
    )
    no_fields = root / "no_fields"
    shutil.copytree(drafter, no_fields)
    config = json.loads((drafter / "config.json").read_text())
    del config["target"]
    (no_fields / "config.json").write_text(json.dumps(config))
    out = f"output_dir={root / 'out'}"
    return [
        ("malformed prompt line", [*TRAIN, "recipe=d2sd", out, f"prompts.source={root}/malformed.jsonl"]),
        ("empty prompt file", [*TRAIN, "recipe=d2sd", out, f"prompts.source={root}/empty.jsonl"]),
        ("prompt of the wrong type", [*TRAIN, "recipe=d2sd", out, f"prompts.source={root}/number.jsonl"]),
        ("bad Hub repo id", [*TRAIN, "recipe=d2sd", out, "hub.repo_id=bad id with spaces"]),
        ("target layer out of range", [*TRAIN, "recipe=dflash", out, "drafter.target_layers=[99]"]),
        ("unknown drafter type", [*TRAIN, "recipe=d2sd", out, "drafter.type=nosuch"]),
        ("recipe= names a target", [*TRAIN, "recipe=smollm2-135m-instruct", out]),
        ("target folder without weights", [*TRAIN, "recipe=d2sd", out, f"target={no_weights}"]),
        ("output_dir is a file", [*TRAIN, "recipe=d2sd", f"output_dir={root}/a_file"]),
        ("too few prompts for a batch", [*TRAIN, "recipe=d2sd", out, "prompts.limit=40"]),
        ("drafter config.json without its target", [*EVAL, str(no_fields), "limit=1"]),
        ("truncated drafter weights", [*EVAL, str(truncated), "limit=1"]),
        ("a target passed as a drafter", [*EVAL, "models/embedded/stdlib-llama", "limit=1"]),
        ("eval on an empty prompt file", [*EVAL, str(drafter), f"prompts={root}/empty.jsonl"]),
    ]  # fmt: skip


def main() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for what, command in cases(Path(tmp)):
            started = time.perf_counter()
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
            message = errors[-1][7:] if errors else f"(no error line; exit {done.returncode})"
            clean = "Traceback" not in done.stderr and not (Path(tmp) / "out").exists()
            rows.append((what, done.returncode, seconds, clean, message))
            print(f"{seconds:5.1f}s exit {done.returncode} {what}: {message[:100]}", flush=True)
    worst = max(r[2] for r in rows)
    lines = [
        f"Each command in a fresh process on the {os.cpu_count()}-core CPU, one torch thread "
        f"({time.strftime('%Y-%m-%d')}); slowest refusal {worst:.1f}s.",
        "",
        "| bad input | exit | seconds | no traceback, nothing written | error (first 90 chars) |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {w} | {rc} | {s:.1f} | {'yes' if c else 'NO'} | {m[:90].replace('|', '/')} |"
          for w, rc, s, c, m in rows),
    ]  # fmt: skip
    write_section("bad_input", "## Bad input refused before any work\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
