"""Exports to serving-engine layouts (``models/export.py``): the files are read back with ``json``
and ``safetensors`` only and checked against the layouts the engines load (``shared/EXPORT.md``:
key names, shapes, config fields, the target-layer id convention); then a drafter rebuilt from the
exported files alone must give the original's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from models.dflash import BlockContext
from models.drafter import TargetInfo, build_drafter
from models.export import check_format, export, import_export
from recipes import load_config


def _saved(tiny, tmp_path, recipe, *overrides):
    """A drafter of the tiny target with random (not zero) weights, saved as training would."""
    target, tokenizer = tiny
    cfg = load_config([f"recipe={recipe}", "drafter.num_layers=1", *overrides])
    torch.manual_seed(0)
    drafter = build_drafter(cfg.drafter, target, tokenizer, "tiny")
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return drafter, drafter.save_pretrained(tmp_path / recipe)


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())  # a safetensors handle, not a dict: it has no __iter__
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in names}


def test_dflash_zlab_layout_and_logits(tiny, tmp_path):
    target, tokenizer = tiny
    drafter, folder = _saved(tiny, tmp_path, "dflash", "drafter.layer_style=qwen3",
                             "drafter.block_size=4", "drafter.target_layers=[0]")  # fmt: skip
    out = export(folder, "zlab", tmp_path / "zlab")
    config = json.loads((out / "config.json").read_text())
    H, L = target.config.hidden_size, target.config.num_hidden_layers
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["hidden_size"] == H and config["vocab_size"] == target.config.vocab_size
    assert config["num_hidden_layers"] == 1 and config["block_size"] == 4
    assert config["num_target_layers"] == L and "auto_map" not in config
    # 0-based decoder layer ids, read as HF hidden_states[id + 1] (the off-by-one trap)
    assert config["dflash_config"] == {"mask_token_id": drafter.mask_token_id,
                                       "target_layer_ids": [0]}  # fmt: skip
    assert drafter.target_layers() == [1]
    heads, kv, dim = 4, 2, H // 4
    expected = {
        "fc.weight": (H, H), "hidden_norm.weight": (H,), "norm.weight": (H,),
        "layers.0.self_attn.q_proj.weight": (heads * dim, H),
        "layers.0.self_attn.k_proj.weight": (kv * dim, H),
        "layers.0.self_attn.v_proj.weight": (kv * dim, H),
        "layers.0.self_attn.o_proj.weight": (H, heads * dim),
        "layers.0.self_attn.q_norm.weight": (dim,), "layers.0.self_attn.k_norm.weight": (dim,),
        "layers.0.mlp.gate_proj.weight": (64, H), "layers.0.mlp.up_proj.weight": (64, H),
        "layers.0.mlp.down_proj.weight": (H, 64),
        "layers.0.input_layernorm.weight": (H,), "layers.0.post_attention_layernorm.weight": (H,),
    }  # fmt: skip
    tensors = _tensors(out / "model.safetensors")
    assert {k: shape for k, (shape, _) in tensors.items()} == expected  # no embedding, no head
    assert {dtype for _, dtype in tensors.values()} == {"F32"}
    assert not (out / "tokenizer.json").exists()

    info = TargetInfo.of(target, tokenizer, "tiny")
    rebuilt = import_export(out, "zlab", info)
    drafter.attach_target(target)
    rebuilt.attach_target(target)
    features = torch.randn(9, H, generator=torch.Generator().manual_seed(1))
    ours = drafter.eval().draft_block(5, 9, features, BlockContext())
    theirs = rebuilt.draft_block(5, 9, features, BlockContext())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_dflash_speculators_layout_and_logits(tiny, tmp_path, tiny_target_dir):
    target, tokenizer = tiny
    cfg = load_config(["recipe=dflash", "drafter.num_layers=1", "drafter.layer_style=qwen3",
                       "drafter.block_size=4", "drafter.target_layers=[0]"])  # fmt: skip
    torch.manual_seed(0)
    drafter = build_drafter(cfg.drafter, target, tokenizer, str(tiny_target_dir))
    folder = drafter.save_pretrained(tmp_path / "dflash")
    out = export(folder, "speculators", tmp_path / "speculators")
    config = json.loads((out / "config.json").read_text())
    H, V = target.config.hidden_size, target.config.vocab_size
    assert config["speculators_model_type"] == "dflash"
    assert config["architectures"] == ["DFlashSpeculator"]
    assert config["aux_hidden_state_layer_ids"] == [1]  # HF hidden_states index = id + 1
    assert config["mask_token_id"] == drafter.mask_token_id and config["block_size"] == 4
    assert config["draft_vocab_size"] == V and config["target_hidden_size"] == H
    assert config["transformer_layer_config"]["model_type"] == "qwen3"
    spec = config["speculators_config"]
    assert spec["algorithm"] == "dflash" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"] == [{"proposal_type": "greedy", "speculative_tokens": 3}]
    assert spec["verifier"] == {"name_or_path": str(tiny_target_dir),
                                "architectures": ["LlamaForCausalLM"]}  # fmt: skip
    tensors = _tensors(out / "model.safetensors")
    assert tensors["embed_tokens.weight"][0] == (V, H) and tensors["lm_head.weight"][0] == (V, H)
    zlab = _tensors(export(folder, "zlab", tmp_path / "zlab") / "model.safetensors")
    assert set(tensors) == set(zlab) | {"embed_tokens.weight", "lm_head.weight"}
    rebuilt = import_export(out, "speculators", TargetInfo.of(target, tokenizer, "tiny"))
    assert rebuilt.config["target_layers"] == [0]  # translated back, not shifted twice
    drafter.attach_target(target)
    rebuilt.attach_target(target)
    features = torch.randn(7, H, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(rebuilt.draft_block(2, 7, features, BlockContext()),
                               drafter.eval().draft_block(2, 7, features, BlockContext()),
                               rtol=0, atol=1e-5)  # fmt: skip


def test_zlab_refuses_target_style_layers_and_d2sd_exports_drafter_one(tiny, tmp_path):
    _, folder = _saved(tiny, tmp_path, "dflash", "drafter.block_size=4")  # Llama layers
    with pytest.raises(ValueError, match="train with drafter.layer_style=qwen3"):
        export(folder, "zlab", tmp_path / "no")
    d2sd, folder = _saved(tiny, tmp_path, "d2sd", "drafter.layer_style=qwen3",
                          "drafter.block_size=4")  # fmt: skip
    out = export(folder, "zlab", tmp_path / "d2sd_zlab")
    names = set(_tensors(out / "model.safetensors"))
    first = {k for k in d2sd.first.state_dict() if k.startswith("layers.")}
    assert first <= names and not any(k.startswith(("first.", "vp.", "confidence")) for k in names)


def test_medusa_vllm_layout_and_logits(tiny, tmp_path):
    target, tokenizer = tiny
    drafter, folder = _saved(tiny, tmp_path, "medusa", "drafter.num_heads=3")
    out = export(folder, "medusa", tmp_path / "medusa")
    config = json.loads((out / "config.json").read_text())
    H, V = target.config.hidden_size, target.config.vocab_size
    assert config == {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": H,
                      "vocab_size": V, "num_heads": 3, "num_hidden_layers": 1,
                      "medusa_fc_bias": True}  # fmt: skip
    # vLLM renames any key with "num" and "heads"/"layers" in it: only its own two may exist
    renamed = [k for k in config if "num" in k and ("heads" in k or "layers" in k)]
    assert sorted(renamed) == ["num_heads", "num_hidden_layers"]
    expected = {}
    for h in range(3):
        expected |= {f"blocks.{h}.layers.0.weight": (H, H), f"blocks.{h}.layers.0.bias": (H,),
                     f"lm_heads.{h}.weight": (V, H)}  # fmt: skip
    assert {k: shape for k, (shape, _) in _tensors(out / "model.safetensors").items()} == expected
    rebuilt = import_export(out, "medusa", TargetInfo.of(target, tokenizer, "tiny"))
    hidden = torch.randn(5, H, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(rebuilt.head_logits(hidden), drafter.head_logits(hidden),
                               rtol=0, atol=1e-5)  # fmt: skip


def test_medusa_reduced_vocabulary_is_vllms_token_map(tiny, tmp_path):
    from models.vocab import frequent_ids, restrict_vocab, write_counts

    target, tokenizer = tiny
    drafter, folder = _saved(tiny, tmp_path, "medusa", "drafter.num_heads=2")
    V, H = target.config.vocab_size, target.config.hidden_size
    counts = torch.randint(0, 50, (V,), generator=torch.Generator().manual_seed(4))
    write_counts(folder, counts)
    out = export(folder, "medusa", tmp_path / "medusa_40", draft_vocab=40)
    config = json.loads((out / "config.json").read_text())
    assert config["truncated_vocab_size"] == 40
    tensors = _tensors(out / "model.safetensors")
    ids = frequent_ids(counts, 40)
    assert tensors["token_map"] == ((40,), "I64") and tensors["lm_heads.0.weight"][0] == (40, H)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("token_map"), ids)
    rebuilt = import_export(out, "medusa", TargetInfo.of(target, tokenizer, "tiny"))
    restrict_vocab(drafter, ids)  # what infer.eval draft_vocab=40 scores with
    hidden = torch.randn(3, H, generator=torch.Generator().manual_seed(5))
    ours, theirs = drafter.head_logits(hidden), rebuilt.head_logits(hidden)
    assert torch.isinf(theirs[..., [i for i in range(V) if i not in set(ids.tolist())]]).all()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_draft_lm_hf_folder_and_logits(tiny, tmp_path, tiny_target_dir):
    target, tokenizer = tiny
    cfg = load_config(["recipe=draft_lm", "drafter.num_layers=1"])
    drafter = build_drafter(cfg.drafter, target, tokenizer, str(tiny_target_dir))
    folder = drafter.save_pretrained(tmp_path / "draft_lm")
    with pytest.raises(ValueError, match="only the medusa layout has a reduced vocabulary"):
        export(folder, "hf", tmp_path / "no", draft_vocab=40)
    out = export(folder, "hf", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 1
    assert config["vocab_size"] == target.config.vocab_size
    assert (out / "tokenizer.json").is_file()
    rebuilt = import_export(out, "hf", TargetInfo.of(target, tokenizer, "tiny"))
    ids = torch.tensor([[5, 9, 11, 3]])
    torch.testing.assert_close(rebuilt(ids).logits, drafter.lm.eval()(ids).logits,
                               rtol=0, atol=1e-5)  # fmt: skip


def test_draft_lm_gguf_read_back_by_transformers(tiny, tmp_path, tiny_target_dir):
    import gguf

    target, tokenizer = tiny
    cfg = load_config(["recipe=draft_lm", "drafter.num_layers=1"])
    drafter = build_drafter(cfg.drafter, target, tokenizer, str(tiny_target_dir))
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = export(drafter.save_pretrained(tmp_path / "draft_lm"), "gguf", tmp_path / "gguf")
    reader = gguf.GGUFReader(str(out / "draft.gguf"))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"} <= names
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == len(tokenizer)  # every token text, for llama.cpp's vocab check
    rebuilt = import_export(out, "gguf", TargetInfo.of(target, tokenizer, "tiny"))
    ids = torch.tensor([[5, 9, 11, 3, 40]])
    torch.testing.assert_close(rebuilt(ids).logits, drafter.lm.eval()(ids).logits,
                               rtol=0, atol=1e-5)  # fmt: skip


def test_eagle3_layout_and_logits(tiny, tmp_path):
    from models.vocab import write_counts

    target, tokenizer = tiny
    drafter, folder = _saved(tiny, tmp_path, "eagle3", "drafter.draft_vocab=50")
    counts = torch.randint(0, 30, (target.config.vocab_size,),
                           generator=torch.Generator().manual_seed(6))  # fmt: skip
    drafter.fit_data(counts)
    folder = drafter.save_pretrained(tmp_path / "eagle3_fitted")
    write_counts(folder, counts)
    out = export(folder, "eagle3", tmp_path / "served_eagle3")
    config = json.loads((out / "config.json").read_text())
    H, V = target.config.hidden_size, target.config.vocab_size
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["num_hidden_layers"] == 1 and config["draft_vocab_size"] == 50
    assert config["vocab_size"] == V and config["tie_word_embeddings"] is False
    # HF hidden_states indices: draftkit's 0-based layer ids + 1
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 1, 1]
    tensors = _tensors(out / "model.safetensors")
    assert tensors["fc.weight"][0] == (H, 3 * H)
    assert tensors["midlayer.self_attn.q_proj.weight"][0] == (H, 2 * H)
    assert tensors["midlayer.hidden_norm.weight"][0] == (H,)
    assert tensors["lm_head.weight"][0] == (50, H)
    assert tensors["d2t"] == ((50,), "I64") and tensors["t2d"] == ((V,), "BOOL")
    assert not any(k.startswith("layers.") or "embed" in k for k in tensors)  # SGLang: midlayer
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
    used = d2t + torch.arange(50)  # the engines' mapping: draft id i -> i + d2t[i]
    assert torch.equal(used, drafter.draft_ids) and t2d.sum() == 50 and t2d[used].all()
    rebuilt = import_export(out, "eagle3", TargetInfo.of(target, tokenizer, "tiny"))
    drafter.attach_target(target)
    rebuilt.attach_target(target)
    ids, feats = torch.tensor([5, 9, 11, 40]), torch.randn(4, 3 * H)
    for model in (drafter.eval(), rebuilt):
        cache, root = model.extend(None, ids, feats, 0)
        model.result = model.draft(cache, root, 3, 3, lambda j, logits: 7)[1]
    torch.testing.assert_close(rebuilt.result, drafter.result, rtol=0, atol=1e-5)


def test_a_pair_without_a_layout_is_refused_with_the_list():
    with pytest.raises(ValueError, match="no 'zlab' export for drafter type 'hydra'; formats"):
        check_format("hydra", "zlab")
    with pytest.raises(ValueError, match="speculators: dflash, d2sd; medusa: medusa; hf"):
        check_format("dflash", "gguf")
    with pytest.raises(ValueError, match="no 'nosuch' export"):
        check_format("dflash", "nosuch")


def test_export_command_line(tiny, tmp_path, capsys):
    from models.export import main

    _, folder = _saved(tiny, tmp_path, "medusa")
    assert main([str(folder), "--format", "zlab", "--out", str(tmp_path / "x")]) == 2
    assert "no 'zlab' export for drafter type 'medusa'" in capsys.readouterr().err
    assert main([str(folder), "--format", "medusa", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_training_writes_the_served_layout_beside_the_drafter(tmp_path, tiny, tiny_target_dir):
    """``hub.export_format=zlab`` on a tiny dflash run: the drafter folder gets served-zlab/."""
    import train.drafter as entry
    from tests.conftest import build_tiny_dataset

    (tmp_path / "data").mkdir()
    prompts = [{"prompt": "import os\n"}, {"prompt": "def add(a, b):\n"}] * 6
    data = build_tiny_dataset(tmp_path / "data", tiny_target_dir, tiny, prompts,
                              "distill.max_new_tokens=8")  # fmt: skip
    out = tmp_path / "run"
    argv = ["recipe=dflash", f"target={tiny_target_dir}", f"distill.out={data}",
            f"output_dir={out}", "train.device=cpu", "train.steps=2", "train.batch_size=4",
            "drafter.num_layers=1", "drafter.block_size=4", "drafter.num_anchors=2",
            "drafter.layer_style=qwen3", "hub.export_format=zlab", "final_eval.limit=0"]  # fmt: skip
    assert entry.main(argv) == 0
    served = out / "drafter" / "served-zlab"
    config = json.loads((served / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]
    assert "layers.0.self_attn.q_norm.weight" in _tensors(served / "model.safetensors")
