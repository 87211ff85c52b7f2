"""Every recipe validates; bad keys, types, recipes and targets fail early with clear errors."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import yaml

from models.target import resolve_target
from recipes import RECIPE_DIR, ConfigError, available_recipes, load_config
from recipes.schema import Config, DrafterConfig, TrainConfig


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _default(path: str):
    node = Config()
    for part in path.split("."):
        node = getattr(node, part)
    return node.value if hasattr(node, "value") else node


def test_recipes_exist():
    assert {"d2sd", "stdlib_target"} <= set(available_recipes())


@pytest.mark.parametrize("name", available_recipes())
def test_recipe_validates(name):
    cfg = load_config([f"recipe={name}"])
    assert isinstance(cfg, Config)
    assert isinstance(cfg.train, TrainConfig)
    assert cfg.recipe == name
    assert cfg.output_dir == f"runs/{name}"


@pytest.mark.parametrize("name", available_recipes())
def test_recipe_states_only_differences(name):
    """A recipe that repeats a default hides what the recipe is about."""
    text = (RECIPE_DIR / "recipe" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    for key, value in _flatten(yaml.safe_load(text)).items():
        assert value != _default(key), f"{name}.yaml repeats the default {key}={value!r}"


def test_overrides_apply_with_types():
    cfg = load_config(["recipe=d2sd", "train.lr=1e-4", "train.steps=7", "target_dtype=bfloat16"])
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 7
    assert cfg.target_dtype.value == "bfloat16"
    assert cfg.drafter.type == "d2sd" and isinstance(cfg.drafter, DrafterConfig)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(["recipe=d2sd", "train.lrr=1e-4"])
    message = str(err.value)
    assert "train.lrr" in message and "Did you mean 'train.lr'" in message
    for field in dataclasses.fields(TrainConfig):
        assert field.name in message


def test_unknown_section_lists_top_level_keys():
    with pytest.raises(ConfigError, match=r"'trian'.*Did you mean 'train'.*drafter"):
        load_config(["recipe=d2sd", "trian.lr=1"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train\.lr.*'abc'"):
        load_config(["recipe=d2sd", "train.lr=abc"])
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(["recipe=d2sd", "train.steps=1.5"])


def test_wrong_enum_lists_choices():
    with pytest.raises(ConfigError, match=r"target_dtype.*float32, bfloat16, float16"):
        load_config(["recipe=d2sd", "target_dtype=int8"])


def test_unknown_recipe_lists_recipes():
    with pytest.raises(ConfigError) as err:
        load_config(["recipe=d2sdd"])
    assert "d2sdd" in str(err.value)
    for name in available_recipes():
        assert name in str(err.value)


def test_missing_recipe_lists_recipes():
    with pytest.raises(ConfigError, match="recipe=NAME.*d2sd"):
        load_config(["train.lr=1"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value.*'train.lr'"):
        load_config(["recipe=d2sd", "train.lr"])


def test_unknown_target_lists_embedded_targets():
    with pytest.raises(ConfigError, match=r"unknown target 'no-such-model'.*stdlib-llama"):
        resolve_target(load_config(["recipe=d2sd", "target=no-such-model"]).target)


def test_target_forms(tmp_path, tiny_target_dir):
    assert resolve_target("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert resolve_target(str(tiny_target_dir)) == str(tiny_target_dir)
    assert resolve_target("stdlib-llama").endswith("models/embedded/stdlib-llama")
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_target(str(tmp_path))


def test_bad_key_inside_a_recipe_file(tmp_path):
    config_dir = tmp_path / "recipes"
    shutil.copytree(RECIPE_DIR, config_dir, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (config_dir / "recipe" / "broken.yaml").write_text("# @package _global_\ntrain:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"train\.lrr.*Valid keys in section 'train'"):
        load_config(["recipe=broken"], config_dir=config_dir)


def test_target_presets_apply_under_overrides():
    """target=smollm2-135m-instruct brings its preset (chat prompts, sizes) on top of the
    recipe; command-line overrides still win; other targets are untouched."""
    smol = load_config(["recipe=d2sd", "target=smollm2-135m-instruct"])
    assert smol.prompts.source == "chat-distill" and smol.final_eval.prompts == "chat-eval"
    assert smol.drafter.type == "d2sd" and smol.train.steps == 120
    assert (
        load_config(["recipe=d2sd", "target=smollm2-135m-instruct", "train.steps=7"]).train.steps
        == 7
    )
    plain = load_config(["recipe=d2sd"])
    assert plain.prompts.source == "stdlib-distill" and plain.train.steps == 1500
    assert plain.drafter.vp_steps == 800 and smol.drafter.vp_steps == 0  # preset: train.steps


def test_threads_default_to_the_cores_not_to_omp_num_threads(monkeypatch):
    """accelerate launch sets OMP_NUM_THREADS=1 when it is unset: train.threads=0 uses every
    core this process may run on, shared among this machine's processes."""
    import os

    import torch

    from recipes.cli import apply_threads

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert apply_threads(0) == cores == torch.get_num_threads()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))  # more processes than cores
        assert apply_threads(0) == 1
        assert apply_threads(3) == 3 == torch.get_num_threads()  # set explicitly: as asked
    finally:
        torch.set_num_threads(before)
