"""The frozen target: name resolution and loading of any Hugging Face causal LM.

The target is wrapped, never copied: it is loaded with ``AutoModelForCausalLM.from_pretrained``
from an embedded directory, a local directory, or a Hub id, and put in eval mode without grads.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
from pathlib import Path

import torch

from models.embedded import EMBEDDED_TARGETS
from models.gguf import GGUF_TARGETS
from recipes import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_target(name: str) -> str:
    """Map ``target=NAME_OR_PATH`` to what ``from_pretrained`` takes.

    Order: an embedded target name, a GGUF target (``smollm2-135m-instruct`` or a ``.gguf``
    file, dequantized once into a cached folder, ``models/gguf.py``), an existing local
    directory, then a Hub id of the form ``owner/name``. Anything else raises ``ConfigError``
    listing the valid choices.
    """
    if name in EMBEDDED_TARGETS:
        return str(EMBEDDED_TARGETS[name])
    path = Path(name).expanduser()
    if name in GGUF_TARGETS or name.endswith(".gguf"):
        from models.gguf import SMOLLM2, gguf_folder, smollm2_file

        return str(gguf_folder(smollm2_file() if name == SMOLLM2 else path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"target directory '{name}' has no config.json (not a HF model)")
        return str(path)
    if _HUB_ID.match(name) and ".." not in name and not path.exists():
        return name
    raise ConfigError(
        f"unknown target '{name}': not an embedded target ({', '.join(EMBEDDED_TARGETS)}), "
        f"not a GGUF target ({', '.join(GGUF_TARGETS)} or a .gguf file), not a local model "
        "directory, and not a Hub id of the form owner/name (e.g. Qwen/Qwen3-8B)"
    )


def unreachable(what: str, source: str, exc: Exception) -> ConfigError:
    """The error for a model or drafter that could not be loaded: from the Hub, say that the
    machine may be offline and how to use a local copy instead."""
    reason = " ".join(str(exc).split())[:300]
    if Path(source).expanduser().exists():
        return ConfigError(f"{what} could not be loaded from {source}: {reason}")
    return ConfigError(
        f"{what} could not be loaded from the Hugging Face Hub: this machine looks offline "
        f"(or the id does not exist, or needs a token in HF_TOKEN). Download it where there is "
        f"a network (`hf download {source} --local-dir DIR`) and pass the local folder DIR "
        f"instead. [{reason}]"
    )


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AVX512-BF16 / AMX: several times faster
    than float32 there; elsewhere bf16 is emulated and slower)."""
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str, device: str = "auto") -> str:
    """``auto`` -> bfloat16 where the device runs it natively (a bf16 GPU, an AMX/AVX512-BF16
    CPU), else float32; other names unchanged."""
    if str(dtype) != "auto":
        return str(dtype)
    if pick_device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_bf16() else "float32"


WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json")  # fmt: skip


@functools.cache
def _cache_key(model_class: type) -> str:
    accepts = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in accepts else "past_key_values"


def cache_arg(model, cache) -> dict:
    """``{keyword: cache}`` for ``model``'s forward: transformers renamed ``past_key_values`` to
    ``cache`` (5.2x; the old name warns and goes in 5.40), older releases take the old name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return {_cache_key(type(base)): cache}


def returned_cache(output):
    """The KV cache a forward returned (``output.cache``; ``past_key_values`` before 5.2x)."""
    if "cache" in output:
        return output["cache"]
    return output.past_key_values  # no eager default: 5.2x outputs have no such attribute


def read_target(name: str):
    """The target's config and tokenizer without its weights (pre-flight): a local folder must
    hold weights too. Returns (source, config, tokenizer); raises ``ConfigError`` naming what is
    missing or unreachable."""
    from transformers import AutoConfig, AutoTokenizer

    source = resolve_target(name)
    folder = Path(source)
    if folder.is_dir() and not any(any(folder.glob(p)) for p in WEIGHT_FILES):
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise ConfigError(
            f"target directory '{name}' has no weights (model.safetensors, a sharded "
            f"*.safetensors index or pytorch_model.bin); found: {found}"
        )
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:  # unreachable, unknown architecture, bad files
        raise unreachable(f"target '{name}'", source, exc) from exc
    if not getattr(config, "num_hidden_layers", None) or not getattr(config, "hidden_size", None):
        raise ConfigError(
            f"target '{name}' ({type(config).__name__}) is not a decoder-only causal LM with "
            "num_hidden_layers and hidden_size in its config"
        )
    return source, config, tokenizer


def meta_target(config):
    """The target's model built on the meta device from its config: every module, shape and
    config field, no weights (pre-flight builds the drafter against it)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as exc:  # not a causal LM architecture transformers knows
        raise ConfigError(f"target config {type(config).__name__}: {exc}") from exc


def load_target(name: str, dtype: str = "float32", device: str = "auto"):
    """Load the frozen target and its tokenizer.

    Returns:
        (model, tokenizer): the model in eval mode with ``requires_grad`` off on every parameter.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_target(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[resolve_dtype(dtype, device)]
        )
    except OSError as exc:  # transformers reports unreachable/unknown repos and bad files so
        raise unreachable(f"target '{name}'", source, exc) from exc
    model.to(pick_device(device)).eval()
    model.requires_grad_(False)
    return model, tokenizer


def tokenizer_hash(tokenizer) -> str:
    """sha256 of everything that decides token ids: vocab/merges, specials, chat template."""
    state = {
        "backend": tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(tokenizer),
        "special": tokenizer.special_tokens_map,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def config_hash(config) -> str:
    """sha256 of a model config, its dtype left out (the same model in another dtype)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("dtype", "torch_dtype")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def target_fingerprint(model, name: str) -> dict:
    """Target id plus hashes of its config and (a sample of every tensor of) its weights.

    The same model loaded in another dtype has the same fingerprint (a dataset built with the
    target in float32 serves training with it in bfloat16): the config's dtype is left out and
    the weight samples are rounded to bfloat16 before hashing."""
    weights = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().flatten()
        sample = torch.cat([flat[:64], flat[-64:]]).bfloat16().float().cpu()
        weights.update(f"{key}{tuple(tensor.shape)}".encode() + sample.numpy().tobytes())
    return {
        "target": name,
        "config_sha256": config_hash(model.config),
        "weights_sha256": weights.hexdigest(),
    }
