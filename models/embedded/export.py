"""Copy a pretrained model directory into the embedded targets.

    python -m models.embedded.export runs/stdlib_target/model [NAME]

Copies only what ``from_pretrained`` needs (config, safetensors weights, tokenizer files) plus
``provenance.json``, and refuses weights over the 20 MB repository budget.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from models.embedded import EMBEDDED_DIR

KEEP = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "provenance.json",
]
MAX_WEIGHT_BYTES = 20 * 1024 * 1024


def export(source: Path, name: str) -> Path:
    weights = source / "model.safetensors"
    if not weights.is_file() or not (source / "provenance.json").is_file():
        raise FileNotFoundError(f"{source} lacks model.safetensors or provenance.json")
    if weights.stat().st_size > MAX_WEIGHT_BYTES:
        raise ValueError(f"{weights} is {weights.stat().st_size / 2**20:.1f} MiB; budget is 20")
    dest = EMBEDDED_DIR / name
    dest.mkdir(parents=True, exist_ok=True)
    for file in KEEP:
        if (source / file).is_file():
            shutil.copy2(source / file, dest / file)
    return dest


def main() -> None:
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python -m models.embedded.export MODEL_DIR [NAME]")
    name = sys.argv[2] if len(sys.argv) == 3 else "stdlib-llama"
    dest = export(Path(sys.argv[1]), name)
    for file in sorted(dest.iterdir()):
        print(f"{file.stat().st_size / 2**20:8.2f} MiB  {file}")


if __name__ == "__main__":
    main()
