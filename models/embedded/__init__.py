"""Embedded default targets shipped with the toolkit (Hugging Face format, loadable offline).

Each lives in a directory beside this file with its weights, tokenizer and ``provenance.json``
(how it was trained: command, corpus hash, steps, train and held-out loss).
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent

# name -> directory; `target=NAME` resolves through this table before trying paths and Hub ids.
EMBEDDED_TARGETS: dict[str, Path] = {
    "stdlib-llama": EMBEDDED_DIR / "stdlib-llama",
}
