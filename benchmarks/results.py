"""Write one benchmark's section of ``benchmarks/results/RESULTS.md`` (between its own markers)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # every output of benchmarks/ goes here
RESULTS = RESULTS_DIR / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\nEvery section is written by the script it names; rerun it to refresh.\n"
)


def machine() -> str:
    """The machine the figures were measured on, in words."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} torch threads)"


def write_section(name: str, markdown: str, path: Path = RESULTS) -> None:
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    path.write_text(text)
