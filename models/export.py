"""Export a trained drafter to the layout a serving engine loads.

    python -m models.export DRAFTER --format zlab|speculators|medusa|hf|gguf|eagle3 --out DIR [--target T]

| format | families | who loads it |
| --- | --- | --- |
| ``zlab`` | dflash, d2sd (its drafter 1) | vLLM ``qwen3_dflash``, SGLang ``dflash``, llama.cpp's converter |
| ``speculators`` | dflash, d2sd (its drafter 1) | vLLM (``speculators_config``), speculators 0.9 |
| ``medusa`` | medusa | vLLM ``medusa`` |
| ``hf`` | draft_lm | any engine's draft model (a causal-LM folder with the target's tokenizer) |
| ``gguf`` | draft_lm (Llama) | llama.cpp's draft model (``draft.gguf``, float32) |
| ``eagle3`` | eagle3 (Llama targets) | vLLM ``Eagle3LlamaForCausalLM``, SGLang ``LlamaForCausalLMEagle3`` |

The layouts are pinned in ``tests/test_export.py`` (key names, shapes, config fields, the
target-layer id convention) and each export is read back by ``import_export`` into a draftkit
drafter whose logits must equal the original's. The engines' DFlash drafter is a Qwen3-style
decoder (q/k RMSNorm) whatever the target: a dflash/d2sd drafter exports only when it was trained
with ``drafter.layer_style=qwen3`` (or for a Qwen3 target).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.drafter import Drafter, TargetInfo, load_drafter

FORMATS = {"zlab": ("dflash", "d2sd"), "speculators": ("dflash", "d2sd"), "medusa": ("medusa",),
           "hf": ("draft_lm",), "gguf": ("draft_lm",), "eagle3": ("eagle3",)}  # fmt: skip
SPECULATORS_VERSION = "0.9.0"  # the speculators release this layout was checked against
WEIGHTS = "model.safetensors"
ZLAB_TOP = ("norm.weight", "hidden_norm.weight", "fc.weight")


def check_format(drafter_type: str, fmt: str) -> None:
    """Refuse a family/format pair that has no layout, listing those that exist."""
    if fmt not in FORMATS or drafter_type not in FORMATS[fmt]:
        pairs = "; ".join(f"{f}: {', '.join(types)}" for f, types in FORMATS.items())
        raise ValueError(
            f"no '{fmt}' export for drafter type '{drafter_type}'; formats and the families "
            f"they take: {pairs}"
        )


def check_exportable(drafter: Drafter, fmt: str) -> None:
    """Refuse, from its config alone (pre-flight builds it on the meta device), a drafter that
    format ``fmt`` cannot hold."""
    check_format(drafter.drafter_type, fmt)
    config = dflash_body(drafter).config
    if fmt == "eagle3" and config["lm_config"]["model_type"] != "llama":
        raise ValueError(
            f"the engines' EAGLE-3 draft is a Llama decoder layer; this drafter's is "
            f"{config['lm_config']['model_type']} (its target's)"
        )
    if fmt in ("zlab", "speculators") and config["lm_config"]["model_type"] != "qwen3":
        raise ValueError(
            f"this drafter's layers are the target's ({config['lm_config']['model_type']}, no "
            "q/k norm); the engines' DFlash drafter is a Qwen3-style decoder: train with "
            "drafter.layer_style=qwen3"
        )
    if config.get("attention_window"):
        raise ValueError(
            f"the {fmt} layout has no sink + window attention: export a drafter trained with "
            "drafter.attention_window=0"
        )


def export(
    folder: str | Path, fmt: str, out: str | Path, target: str = "", draft_vocab: int = 0
) -> Path:
    """Write drafter ``folder`` (a path or Hub id) in format ``fmt`` to ``out``; returns it.
    ``draft_vocab`` (medusa only): keep the N tokens most frequent in the drafter's training
    responses, as vLLM's ``truncated_vocab_size`` + ``token_map``."""
    from models.drafter import resolve_drafter_folder

    drafter = load_drafter(folder)
    check_exportable(drafter, fmt)
    if draft_vocab and fmt != "medusa":
        raise ValueError(
            f"--draft-vocab: only the medusa layout has a reduced vocabulary (vLLM's "
            f"truncated_vocab_size + token_map); not {fmt}"
        )
    ids = None
    if draft_vocab:
        from models.vocab import frequent_ids, read_counts

        ids = frequent_ids(read_counts(resolve_drafter_folder(folder)), draft_vocab)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "medusa":
        _medusa(drafter, out, ids)
    else:
        writers = {"zlab": _zlab, "speculators": _speculators, "hf": _hf, "gguf": _gguf,
                   "eagle3": _eagle3}  # fmt: skip
        writers[fmt](drafter, out, target)
    return out


def _save(state: dict, path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, path, metadata={"format": "pt"})


def dflash_body(drafter: Drafter):
    """The DFlash drafter an engine can serve: the drafter itself, or D²SD's drafter 1 (its
    branch drafter and confidence head have no engine layout)."""
    return drafter.first if drafter.drafter_type == "d2sd" else drafter


def _zlab(drafter: Drafter, out: Path, target: str) -> None:
    body = dflash_body(drafter)
    config = body.config
    lm = dict(config["lm_config"])
    state = body.state_dict()
    kept = {k: v for k, v in state.items() if k.startswith("layers.") or k in ZLAB_TOP}
    _save(kept, out / WEIGHTS)
    if body.mask_embedding is not None:  # no spare token in the target: the learned mask row
        torch.save(body.mask_embedding.detach().cpu().clone(), out / "mask_embedding.pt")
    lm.update(
        architectures=["DFlashDraftModel"],
        block_size=config["block_size"],
        num_target_layers=drafter.target.num_layers,
        # 0-based decoder layers whose output is read: HF hidden_states[id + 1]
        dflash_config={"mask_token_id": config["mask_token_id"],
                       "target_layer_ids": list(config["target_layers"])},
    )  # fmt: skip
    (out / "config.json").write_text(json.dumps(lm, indent=2) + "\n")
    if drafter.drafter_type == "d2sd":
        print("d2sd: exported drafter 1 (a DFlash drafter); the engines have no branch drafter")


def _speculators(drafter: Drafter, out: Path, target: str) -> None:
    """vLLM/speculators' own DFlash layout: the body plus the verifier's embedding and LM head,
    ``aux_hidden_state_layer_ids`` = HF hidden-state indices (draftkit's 0-based ids + 1)."""
    from models.target import load_target, resolve_target

    body = dflash_body(drafter)
    config = body.config
    if body.mask_embedding is None:
        mask = config["mask_token_id"]
    else:
        raise ValueError(
            "the speculators layout needs a mask token id and this drafter learned a mask "
            "embedding (its target has no spare token): export --format zlab, which carries "
            "mask_embedding.pt, or train with drafter.mask_token_id=ID"
        )
    name = target or drafter.target.id
    verifier, _ = load_target(name)
    state = {k: v for k, v in body.state_dict().items() if k.startswith("layers.") or k in ZLAB_TOP}
    state["embed_tokens.weight"] = verifier.get_input_embeddings().weight.float()
    state["lm_head.weight"] = verifier.get_output_embeddings().weight.float()
    _save(state, out / WEIGHTS)
    block = config["block_size"]
    source = resolve_target(name)
    spec = {
        "architectures": ["DFlashSpeculator"],
        "speculators_model_type": "dflash",
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": config["lm_config"],
        "draft_vocab_size": drafter.target.vocab_size,
        "block_size": block,
        "target_hidden_size": drafter.target.hidden_size,
        "aux_hidden_state_layer_ids": [i + 1 for i in config["target_layers"]],
        "mask_token_id": mask,
        "sliding_window_non_causal": False,
        "sample_from_anchor": False,
        "speculators_config": {
            "algorithm": "dflash",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": block - 1}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": source,
                         "architectures": list(verifier.config.architectures or [])},
        },
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(spec, indent=2) + "\n")


def _eagle3(drafter: Drafter, out: Path, target: str) -> None:
    """vLLM's ``Eagle3LlamaForCausalLM`` / SGLang's ``LlamaForCausalLMEagle3``: ``midlayer.*``
    (SGLang skips ``layers.0.*`` silently), ``fc``, ``norm``, ``lm_head`` over the draft
    vocabulary, ``d2t`` (draft id + d2t = target id) and ``t2d``; the taps as HF
    ``hidden_states`` indices in ``eagle_config``."""
    config = drafter.config
    state = drafter.state_dict()
    kept = {
        k: v for k, v in state.items() if k.startswith(("midlayer.", "fc.", "norm.", "lm_head."))
    }
    ids = drafter.draft_ids.long()
    kept["d2t"] = ids - torch.arange(len(ids))
    t2d = torch.zeros(drafter.target.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    kept["t2d"] = t2d
    _save(kept, out / WEIGHTS)
    lm = config["lm_config"]
    taps = [i + 1 for i in config["target_layers"]]
    if taps[0] == 1:
        print("eagle3: the first tap is hidden_states[1]; older SGLang releases shift it by one")
    spec = {key: lm[key] for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                                     "num_key_value_heads", "rms_norm_eps",
                                     "max_position_embeddings", "vocab_size", "hidden_act")
            if key in lm}  # fmt: skip
    attn = drafter.midlayer.self_attn
    spec.update(
        architectures=["LlamaForCausalLMEagle3"], model_type="llama", num_hidden_layers=1,
        head_dim=attn.head_dim, draft_vocab_size=len(ids), tie_word_embeddings=False,
        torch_dtype="float32", target_hidden_size=drafter.target.hidden_size,
        rope_parameters=lm.get("rope_parameters"),
        eagle_config={"eagle_aux_hidden_state_layer_ids": taps, "use_aux_hidden_state": True},
    )  # fmt: skip
    if (lm.get("rope_parameters") or {}).get("rope_theta") is not None:
        spec["rope_theta"] = lm["rope_parameters"]["rope_theta"]
    (out / "config.json").write_text(json.dumps(spec, indent=2) + "\n")


def _medusa(drafter: Drafter, out: Path, ids: torch.Tensor | None) -> None:
    config, state = drafter.config, drafter.state_dict()
    heads, layers = config["num_heads"], config["num_layers"]
    kept = {}
    for h in range(heads):
        for i in range(layers):
            for part in ("weight", "bias"):
                kept[f"blocks.{h}.layers.{i}.{part}"] = state[f"blocks.{h}.{i}.linear.{part}"]
        head = state[f"lm_heads.{h}.weight"]
        kept[f"lm_heads.{h}.weight"] = head if ids is None else head[ids]
    if ids is not None:  # vLLM scatters the N logits to token_map's ids, -inf elsewhere
        kept["token_map"] = ids.long()
    _save(kept, out / WEIGHTS)
    # vLLM's loader renames every key holding "num" and "heads" (or "layers"): only these two
    medusa = {"architectures": ["MedusaModel"], "model_type": "medusa",
              "hidden_size": config["hidden_size"], "vocab_size": config["vocab_size"],
              "num_heads": heads, "num_hidden_layers": layers, "medusa_fc_bias": True}  # fmt: skip
    if ids is not None:
        medusa["truncated_vocab_size"] = len(ids)
    (out / "config.json").write_text(json.dumps(medusa, indent=2) + "\n")


def _hf(drafter: Drafter, out: Path, target: str) -> None:
    tokenizer = _target_tokenizer(drafter, target)
    drafter.lm.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _gguf(drafter: Drafter, out: Path, target: str) -> None:
    """``draft.gguf`` for llama.cpp's draft model: the draft LM with the target's tokenizer."""
    from models.gguf import write_gguf

    write_gguf(drafter.lm, _target_tokenizer(drafter, target), out / "draft.gguf")


def _target_tokenizer(drafter: Drafter, target: str):
    """The target's tokenizer, refused unless it is the one the drafter was trained with."""
    from transformers import AutoTokenizer

    from models.target import resolve_target, tokenizer_hash

    name = target or drafter.target.id
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_target(name))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"the target's tokenizer ({name}) could not be loaded: pass --target PATH ({exc})"
        ) from exc
    if tokenizer_hash(tokenizer) != drafter.target.tokenizer_sha256:
        raise ValueError(f"{name}'s tokenizer is not the one this drafter was trained with")
    return tokenizer


def import_export(out: str | Path, fmt: str, target: TargetInfo) -> Drafter:
    """A draftkit drafter rebuilt from the exported files alone (and the target's shape): what
    the tests compare with the original, logit for logit."""
    out = Path(out)
    if fmt in ("hf", "gguf"):  # gguf: read back by transformers' own GGUF reader
        from transformers import AutoModelForCausalLM

        if fmt == "gguf":
            return AutoModelForCausalLM.from_pretrained(out, gguf_file="draft.gguf").eval()
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    config = json.loads((out / "config.json").read_text())
    state = load_file(out / WEIGHTS)
    if fmt == "eagle3":
        from transformers import LlamaConfig

        from models.eagle3 import Eagle3

        fields = {k: v for k, v in config.items() if k not in (
            "architectures", "draft_vocab_size", "eagle_config", "target_hidden_size", "model_type")}  # fmt: skip
        lm = LlamaConfig(**fields).to_dict()
        taps = [i - 1 for i in config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]
        d2t = state.pop("d2t")
        state.pop("t2d")
        ours = {"lm_config": lm, "target_layers": taps, "draft_vocab": config["draft_vocab_size"],
                "ttt_steps": 1, "ttt_decay": 0.8, "loss": "ce", "num_draft": 1}  # fmt: skip
        drafter = Eagle3(ours, target)
        state["draft_ids"] = d2t + torch.arange(len(d2t))
        drafter.load_state_dict(state, strict=True)
        return drafter.eval()
    if fmt in ("zlab", "speculators"):
        from models.dflash import DFlash

        if fmt == "speculators":  # HF hidden-state indices back to 0-based decoder layers
            block, lm = config["block_size"], config["transformer_layer_config"]
            flash = {"mask_token_id": config["mask_token_id"],
                     "target_layer_ids": [i - 1 for i in config["aux_hidden_state_layer_ids"]]}  # fmt: skip
            state = {k: v for k, v in state.items() if k.startswith("layers.") or k in ZLAB_TOP}
            config = lm
        else:
            flash = config.pop("dflash_config")
            block = config.pop("block_size")
            config.pop("num_target_layers")
        ours = {"lm_config": config, "block_size": block, "num_anchors": 1,
                "mask_token_id": flash["mask_token_id"], "loss": "ce",
                "position_weight": "decay", "decay_gamma": 0.0, "dpace_alpha": 0.5,
                "num_draft": block - 1, "init": "random", "attention_window": 0,
                "attention_sinks": 0, "target_layers": flash["target_layer_ids"]}  # fmt: skip
        drafter = DFlash(ours, target)
        if (out / "mask_embedding.pt").is_file():
            state["mask_embedding"] = torch.load(out / "mask_embedding.pt")
    else:
        from models.heads import Medusa

        heads, layers = config["num_heads"], config["num_hidden_layers"]
        ours = {"hidden_size": config["hidden_size"], "vocab_size": config["vocab_size"],
                "num_heads": heads, "num_layers": layers, "loss": "ce", "decay": 0.8,
                "final_layer": target.num_layers, "num_draft": heads, "tree_nodes": 0}  # fmt: skip
        drafter = Medusa(ours, target)
        token_map = state.pop("token_map", None)
        if token_map is not None:  # truncated heads: rows at token_map, restricted like ours
            for h in range(heads):
                full = torch.zeros(config["vocab_size"], config["hidden_size"])
                full[token_map] = state[f"lm_heads.{h}.weight"]
                state[f"lm_heads.{h}.weight"] = full
        renamed = {}
        for key, value in state.items():
            parts = key.split(".")  # blocks.{h}.layers.{l}.{part} -> blocks.{h}.{l}.linear.{part}
            if parts[0] == "blocks":
                key = f"blocks.{parts[1]}.{parts[3]}.linear.{parts[4]}"
            renamed[key] = value
        state = renamed
    drafter.load_state_dict(state, strict=True)
    if fmt == "medusa" and token_map is not None:
        from models.vocab import restrict_vocab

        restrict_vocab(drafter, token_map)
    return drafter.eval()


def main(argv: list[str]) -> int:
    import argparse

    from recipes.cli import command

    parser = argparse.ArgumentParser(
        prog="python -m models.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("drafter", help="a drafter folder or Hub id")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--target", default="", help="the target (hf: where its tokenizer is)")
    parser.add_argument("--draft-vocab", type=int, default=0,
                        help="medusa: keep the N most frequent training tokens")  # fmt: skip
    args = parser.parse_args(argv)

    @command
    def run(_: list[str]) -> int:
        out = export(args.drafter, args.format, args.out, args.target, args.draft_vocab)
        print(f"exported {args.drafter} as {args.format} -> {out}")
        return 0

    return run(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
