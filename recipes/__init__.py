"""Recipes: the typed config schema, the YAML recipes, and the loader every entry point uses.

    cfg = load_config(["recipe=d2sd", "train.lr=1e-4", "target=Qwen/Qwen3-8B"])
    options = load_options(EvalConfig, ["limit=8", "temperature=1"])

Everything is validated here, before any work: unknown keys, wrong types, unknown recipe names
and numbers outside their field's range raise ``ConfigError`` with a message that names the key
and lists the valid choices. (The target name is resolved by ``models.target.resolve_target``:
``recipes`` imports nothing from the other packages.)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from recipes.schema import Config, Range

RECIPE_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what is wrong and what is valid."""


def available_recipes(config_dir: Path = RECIPE_DIR) -> list[str]:
    """Names accepted by ``recipe=NAME`` (the YAML files under ``recipes/recipe/``)."""
    return sorted(p.stem for p in (Path(config_dir) / "recipe").glob("*.yaml"))


def _section_fields(path: list[str], root: type = Config) -> list[str] | None:
    """Field names of the schema section at ``path`` (None when the path is not a section)."""
    node = root
    for part in path:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        default = fields[part].default_factory  # sections are declared with default_factory
        if default is dataclasses.MISSING or not dataclasses.is_dataclass(default):
            return None
        node = default
    return [f.name for f in dataclasses.fields(node)]


def _unknown_key_error(full_key: str, root: type = Config) -> ConfigError:
    parts = full_key.split(".")
    parent = parts[:-1]
    while parent and _section_fields(parent, root) is None:
        parent.pop()
    valid = _section_fields(parent, root) or []
    where = f"section '{'.'.join(parent)}'" if parent else "the top level"
    hint = difflib.get_close_matches(parts[len(parent)], valid, n=1)
    suggestion = f" Did you mean '{'.'.join([*parent, hint[0]])}'?" if hint else ""
    return ConfigError(
        f"unknown config key '{full_key}'.{suggestion} Valid keys in {where}: {', '.join(valid)}"
    )


# Secrets (Hub tokens, wandb keys) belong in the environment, never in configs, logs or outputs.
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
_SECRET_SHAPES = re.compile(
    r"hf_[A-Za-z0-9]{20,}|wandb_v\d+_\w{20,}|(?<![0-9a-fA-F])[0-9a-f]{40}(?![0-9a-f])"
)


def refuse_secrets(items: list[str], origin: str) -> None:
    """Raise ``ConfigError`` if any item holds something shaped like a token or API key.

    The message names where it was found but never repeats the value.
    """
    env_secrets = [v for v in (os.environ.get(k) for k in SECRET_ENV_VARS) if v and len(v) >= 8]
    for item in items:
        if _SECRET_SHAPES.search(item) or any(secret in item for secret in env_secrets):
            key = item.partition("=")[0] if "=" in item else "a value"
            raise ConfigError(
                f"{origin}: '{key}' looks like a secret (token or API key); secrets are not "
                f"accepted as config or command-line values, set them in the environment "
                f"({', '.join(SECRET_ENV_VARS)}) instead"
            )


def _string_items(node, prefix: str = "") -> list[str]:
    if dataclasses.is_dataclass(node):
        return [
            item
            for f in dataclasses.fields(node)
            for item in _string_items(getattr(node, f.name), f"{prefix}{f.name}.")
        ]
    if isinstance(node, list | tuple):
        return [item for v in node for item in _string_items(v, prefix)]
    return [f"{prefix.rstrip('.')}={node}"] if isinstance(node, str) else []


def _split_overrides(overrides: list[str]) -> tuple[str | None, list[str]]:
    recipe, rest = None, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got '{item}'")
        if key.lstrip("+~") == "recipe":
            recipe = value
        else:
            rest.append(item)
    return recipe, rest


def _target_presets(overrides: list[str], config_dir: Path) -> list[str]:
    """The preset of the target named by ``target=`` (``recipes/preset/<target>.yaml``: the
    prompt set, data and training sizes that fit that target), if it has one."""
    targets = [v for k, _, v in (o.partition("=") for o in overrides) if k.lstrip("+~") == "target"]
    if targets and (Path(config_dir) / "preset" / f"{targets[-1]}.yaml").is_file():
        return [targets[-1]]
    return []


def load_config(overrides: list[str], config_dir: Path = RECIPE_DIR) -> Config:
    """Compose schema defaults + ``recipes/recipe/<recipe>.yaml`` + the target's preset
    (``recipes/preset/<target>.yaml``, when ``target=`` names one) + ``key=value`` overrides.

    Args:
        overrides: command-line style items; one of them must be ``recipe=NAME``.
        config_dir: directory holding ``config.yaml`` and ``recipe/`` (tests point it elsewhere).

    Returns:
        The validated ``Config``; ``output_dir`` defaults to ``runs/<recipe>``.

    Raises:
        ConfigError: unknown recipe, key or target, or a value of the wrong type.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException

    refuse_secrets(list(overrides), "command line")
    recipe, rest = _split_overrides(overrides)
    recipes = available_recipes(config_dir)
    if recipe is None:
        raise ConfigError(f"no recipe given: add recipe=NAME, one of: {', '.join(recipes)}")
    if recipe not in recipes:
        preset = (Path(config_dir) / "preset" / f"{recipe}.yaml").is_file()
        hint = f" ('{recipe}' is a target: recipe=NAME target={recipe})" if preset else ""
        raise ConfigError(
            f"unknown recipe '{recipe}'{hint}; available recipes: {', '.join(recipes)}"
        )

    ConfigStore.instance().store(name="schema", node=Config)
    presets = [f"preset={name}" for name in _target_presets(rest, config_dir)]
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            composed = compose("config", overrides=[f"recipe={recipe}", *presets, *rest])
        cfg: Config = OmegaConf.to_object(composed)
    except (HydraException, ConfigKeyError, ValidationError) as exc:
        raise _explain(exc, recipe) from exc

    refuse_secrets(_string_items(cfg), f"recipe '{recipe}'")
    check_ranges(cfg)
    cfg.recipe = recipe
    if not cfg.output_dir:
        cfg.output_dir = str(Path("runs") / recipe)
    return cfg


def load_options(schema: type, items: list[str]):
    """``key=value`` items over the defaults of the dataclass ``schema`` (e.g. ``EvalConfig``),
    validated like a recipe: unknown keys ("did you mean"), types, choices and ranges."""
    refuse_secrets(list(items), "command line")
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got '{item}'")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(items))
        options = OmegaConf.to_object(merged)
    except (ConfigKeyError, ValidationError) as exc:
        raise _explain(exc, "", schema) from exc
    check_ranges(options)
    return options


def _numeric(hint) -> bool:
    if typing.get_origin(hint) is list:
        (hint,) = typing.get_args(hint)
    return hint in (int, float)


def numeric_fields(schema: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every numeric field (int, float, list of them) of ``schema`` and its sections, by dotted
    key."""
    hints = typing.get_type_hints(schema)
    found = {}
    for f in dataclasses.fields(schema):
        section = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(section):
            found.update(numeric_fields(section, f"{prefix}{f.name}."))
        elif _numeric(hints[f.name]):
            found[f"{prefix}{f.name}"] = f
    return found


def check_ranges(config) -> None:
    """Raise ``ConfigError`` naming the key, the bad value and the valid range for any numeric
    setting outside its field's range (``recipes.schema.ranged``). A numeric field declared
    without a range is a schema bug and raises ``TypeError``."""
    for key, f in numeric_fields(type(config)).items():
        valid: Range | None = f.metadata.get("range")
        if valid is None:
            raise TypeError(f"schema field '{key}' is numeric but declares no range (ranged())")
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        for value in node if isinstance(node, list) else [node]:
            if value not in valid:
                raise ConfigError(f"{key}={value}: out of range, valid values are {valid}")


def _explain(exc: Exception, recipe: str, root: type = Config) -> ConfigError:
    cause = exc if isinstance(exc, (ConfigKeyError, ValidationError)) else exc.__cause__
    text = str(exc)
    full_key = getattr(cause, "full_key", None)
    if full_key is None:  # errors raised inside a recipe file arrive flattened into text
        found = re.search(r"full_key: (\S+)", text)
        full_key = found.group(1) if found else None
    if full_key and (
        isinstance(cause, ConfigKeyError | AttributeError) or "ConfigKeyError" in text
    ):
        return _unknown_key_error(full_key, root)
    if full_key:
        detail = str(cause or exc).splitlines()
        detail = next((line for line in detail if "raised while composing" not in line), "")
        return ConfigError(f"bad value for '{full_key}': {detail.strip()}")
    return ConfigError(f"{f'recipe {recipe!r}: ' if recipe else ''}{text.splitlines()[0]}")
