"""What the data build caches for the drafter a recipe trains, so training never runs the target.

A drafter reads the frozen target through ``target_layers()`` (hidden states) and, when its
objective needs the target's distribution, ``needs_target_logits(cached_topk)``. When the
cache can answer both (its layers, and a top-k where the objective accepts one), the data build
stores them once per row and every epoch reads them back; otherwise the target runs online in
training and caching would only cost disk. ``distill.teacher_cache=false`` turns this off.
"""

from __future__ import annotations

import dataclasses

import torch

from models.drafter import TargetInfo
from models.registry import DRAFTERS, load_families
from recipes.schema import Config


def drafter_needs(cfg: Config, target, tokenizer) -> tuple[list[int], int]:
    """(HF hidden-state indices, top-k) the recipe's drafter reads from the target; ([], 0)
    when a cache cannot replace its online target forward."""
    load_families()
    family = DRAFTERS.get(cfg.drafter.type)
    if family is None:
        return [], 0
    with torch.random.fork_rng(devices=[]):  # building it must not move the training seed
        info = TargetInfo.of(target, tokenizer, cfg.target)
        drafter = family.from_recipe(cfg.drafter, target, info, tokenizer=tokenizer)
    modules = [stage.module for stage in drafter.stages()]  # e.g. D2SD's two drafters
    if any(m.needs_target_logits(cached_topk=True) for m in modules):
        return [], 0  # the target runs online anyway: that forward gives every layer too
    wants_topk = any(m.needs_target_logits(cached_topk=False) for m in modules)
    layers = sorted({layer for m in modules for layer in m.target_layers()})
    return layers, cfg.drafter.topk if wants_topk else 0


def with_teacher_cache(cfg: Config, target, tokenizer) -> Config:
    """``cfg`` with ``distill.hidden_layers``/``topk_logprobs`` extended by the drafter's needs
    (``distill.teacher_cache``); the recipe's own settings are kept."""
    if not cfg.distill.teacher_cache or not cfg.drafter.type:
        return cfg
    layers, topk = drafter_needs(cfg, target, tokenizer)
    distill = dataclasses.replace(
        cfg.distill,
        hidden_layers=sorted({*cfg.distill.hidden_layers, *layers}),
        topk_logprobs=cfg.distill.topk_logprobs or topk,
    )
    return dataclasses.replace(cfg, distill=distill)
