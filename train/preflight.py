"""Pre-flight: everything that can refuse a training run, before the target's weights load and
before any data is built or file written.

After the config loads (keys, types, ranges: ``recipes``), ``preflight`` reads the target's
config and tokenizer only, builds the drafter family against a weightless (meta-device) copy of
the target (layers in range, widths, mask token, windows, vocabulary), and checks the Hub repo
id, the output folders, the dataset folder, the prompt source (read whole: every line parsed)
and that it gives enough rows for a batch. Each refusal is one ``error:`` line (``recipes.cli``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.distill import preflight_build
from data.prompts import load_prompts
from data.teacher_cache import with_teacher_cache
from models.drafter import Drafter, build_drafter
from models.export import check_exportable
from models.hub import check_repo_id
from models.target import meta_target, read_target
from recipes.cli import check_folder
from recipes.schema import Config


@dataclass
class Plan:
    """What pre-flight found: the config with the teacher cache the drafter reads, the drafter
    built on the meta device, and whether a finished dataset is reused."""

    cfg: Config
    drafter: Drafter
    dataset_ready: bool
    n_prompts: int


def preflight(cfg: Config) -> Plan:
    """Check a training run end to end without loading weights or writing anything."""
    if cfg.hub.repo_id:
        check_repo_id(cfg.hub.repo_id)
    check_folder(cfg.output_dir, "output_dir")
    _, target_config, tokenizer = read_target(cfg.target)
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        target = meta_target(target_config)
        drafter = build_drafter(cfg.drafter, target, tokenizer, cfg.target, cfg.recipe)
        cfg = with_teacher_cache(cfg, target, tokenizer)
    if cfg.hub.export_format:
        check_exportable(drafter, cfg.hub.export_format)
    ready, n_prompts = preflight_build(cfg, target_config, tokenizer)
    if not ready:
        held = drafter.heldout_rows()
        if n_prompts < cfg.train.batch_size + held:
            source = f"prompts.source={cfg.prompts.source}" + (
                f" with prompts.limit={cfg.prompts.limit}" if cfg.prompts.limit else ""
            )
            need = f"train.batch_size={cfg.train.batch_size}" + (
                f" + {held} held-out rows ({cfg.drafter.type})" if held else ""
            )
            raise ValueError(
                f"{source} gives {n_prompts} prompts, fewer than the {need} one step needs "
                "(a prompt gives at most one row); use more prompts or a smaller batch"
            )
    if cfg.final_eval.limit:
        load_prompts(cfg.final_eval.prompts)  # the set the final evaluation decodes
    if any(getattr(m, "mask_embedding", None) is not None for m in drafter.modules()):
        print(
            f"target {cfg.target} has no mask, pad or spare token: the {cfg.drafter.type} "
            "drafter learns its own mask embedding (drafter.mask_token_id=ID picks a token)"
        )
    return Plan(cfg, drafter, ready, n_prompts)
