"""Train a drafter: ``accelerate launch train/drafter.py recipe=NAME [key=value ...]``.

Builds, from the recipe: the frozen target, the drafter (by registered ``drafter.type``), the
dataset and the objective, then runs the one training loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.distill import ensure_dataset, process_group
from models.registry import DRAFTERS
from models.target import load_target
from recipes import ConfigError, available_recipes, load_config

USAGE = """usage: accelerate launch train/drafter.py recipe=NAME [key=value ...]

recipes: {recipes}
common overrides: target=NAME_OR_PATH  target_dtype=bfloat16  train.lr=1e-4  output_dir=DIR
the full schema with defaults: recipes/schema.py; recipe files: recipes/recipe/*.yaml"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(recipes=", ".join(available_recipes())))
        return 0 if argv else 2
    try:
        cfg = load_config(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    target, tokenizer = load_target(cfg.target, cfg.target_dtype.value, cfg.train.device)
    n_params = sum(p.numel() for p in target.parameters())
    print(
        f"recipe {cfg.recipe}: target {cfg.target} ({type(target).__name__}, "
        f"{n_params / 1e6:.1f}M parameters, vocab {len(tokenizer)}, {cfg.target_dtype.value}) "
        f"on {target.device}; outputs -> {cfg.output_dir}"
    )
    if cfg.drafter.type not in DRAFTERS:
        implemented = ", ".join(sorted(DRAFTERS)) or "none yet"
        print(
            f"error: recipe '{cfg.recipe}' trains drafter type '{cfg.drafter.type}', which is "
            f"not implemented yet (implemented drafter types: {implemented})",
            file=sys.stderr,
        )
        return 3
    rank, world, barrier = process_group()
    ensure_dataset(cfg, target, tokenizer, rank, world, barrier)
    raise NotImplementedError("the drafter training engine lands with the draft_lm recipe")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
