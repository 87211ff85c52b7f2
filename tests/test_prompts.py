"""Prompt sets: the bundled stdlib sets and the loader for local files and saved datasets."""

from __future__ import annotations

import json
import lzma

import pytest

from data.corpus import is_heldout
from data.prompts import BUNDLED, Prompt, category_counts, load_prompts, render_prompt
from recipes.schema import CorpusConfig

CATEGORIES = {"function_body", "class_body", "docstring_to_code", "continuation"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def raw_rows(name: str) -> list[dict]:
    path = BUNDLED[name]
    with (lzma.open if path.suffix == ".xz" else open)(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def file_counts(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["category"]] = counts.get(row["category"], 0) + 1
    return dict(sorted(counts.items()))


@pytest.mark.parametrize("name", ["stdlib-distill", "stdlib-eval"])
def test_bundled_set_loads_with_four_categories_and_unique_ids(name):
    prompts = load_prompts(name)
    rows = raw_rows(name)
    assert [p.id for p in prompts] == [r["id"] for r in rows]
    assert [p.text for p in prompts] == [r["prompt"] for r in rows]
    assert set(category_counts(prompts)) == CATEGORIES
    assert category_counts(prompts) == file_counts(rows)
    assert len({p.id for p in prompts}) == len(prompts)
    for p, row in zip(prompts, rows, strict=True):
        assert p.id == f"{p.category}/{row['module']}:{p.id.rsplit(':', 1)[1]}"
        assert p.text.endswith("\n") and p.text.count("\n") >= 2 and len(p.text) <= 2000
        assert p.messages is None


def test_bundled_sets_respect_the_corpus_split():
    fraction = CorpusConfig().heldout_fraction
    eval_modules = {r["module"] for r in raw_rows("stdlib-eval")}
    distill_modules = {r["module"] for r in raw_rows("stdlib-distill")}
    assert all(is_heldout(m, fraction) for m in eval_modules)
    assert not any(is_heldout(m, fraction) for m in distill_modules)
    assert not eval_modules & distill_modules


def test_bundled_set_sizes():
    eval_counts = category_counts(load_prompts("stdlib-eval"))
    assert eval_counts == file_counts(raw_rows("stdlib-eval"))
    assert eval_counts == {c: 60 for c in sorted(CATEGORIES)}
    assert sum(eval_counts.values()) >= 100
    eval_ids = [p.id for p in load_prompts("stdlib-eval")]
    assert eval_ids == sorted(eval_ids)  # the eval set keeps its order (comparable figures)
    distill = load_prompts("stdlib-distill")
    assert len(distill) > 30_000  # every usable prompt of the training modules
    assert BUNDLED["stdlib-distill"].stat().st_size < 2_500_000  # xz finds the overlaps


@pytest.mark.parametrize("limit", [4, 512, 2048, 8000])
def test_any_prefix_of_the_distill_set_is_balanced_over_categories(limit):
    """prompts.limit takes a prefix: it must be a sample of every category, not the first
    category in id order (which gave the main job 500 class bodies and 12 continuations)."""
    counts = category_counts(load_prompts("stdlib-distill", limit=limit))
    assert counts == {c: limit // 4 for c in sorted(CATEGORIES)}
    modules = {
        p.id.split("/", 1)[1].rsplit(":", 1)[0] for p in load_prompts("stdlib-distill", limit=limit)
    }
    assert len(modules) > min(limit, 400) // 2  # scattered over modules, not one file's run


def test_limit_keeps_the_first_rows():
    first = load_prompts("stdlib-eval", limit=5)
    assert first == load_prompts("stdlib-eval")[:5]


def test_jsonl_with_column_mapping(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"uid": "a", "question": "def f():\n", "kind": "code"},
        {"uid": "b", "question": "", "kind": "chat"},  # empty: kept, not dropped
        {"uid": "c", "question": "x = 1\n", "kind": "code"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_prompts(
        str(path), prompt_column="question", category_column="kind", id_column="uid"
    )
    assert prompts == [
        Prompt("a", "def f():\n", "code"),
        Prompt("b", "", "chat"),
        Prompt("c", "x = 1\n", "code"),
    ]
    assert category_counts(prompts) == {"chat": 1, "code": 2}


def test_csv_without_category_or_id_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("text,extra\nhello world,1\nsecond prompt,2\n")
    prompts = load_prompts(str(path), prompt_column="text")
    assert prompts == [
        Prompt(f"{path}:0", "hello world", "default"),
        Prompt(f"{path}:1", "second prompt", "default"),
    ]


def test_parquet_with_limit(tmp_path):
    from datasets import Dataset

    path = tmp_path / "p.parquet"
    Dataset.from_dict({"p": ["one", "two", "three"], "id": [7, 8, 9]}).to_parquet(str(path))
    prompts = load_prompts(str(path), prompt_column="p", limit=2)
    assert prompts == [Prompt("7", "one", "default"), Prompt("8", "two", "default")]


def test_save_to_disk_directory(tmp_path):
    from datasets import Dataset, DatasetDict

    data = {"prompt": ["a\n", "b\n"], "category": ["x", "y"]}
    Dataset.from_dict(data).save_to_disk(str(tmp_path / "single"))
    assert load_prompts(str(tmp_path / "single")) == [
        Prompt(f"{tmp_path / 'single'}:0", "a\n", "x"),
        Prompt(f"{tmp_path / 'single'}:1", "b\n", "y"),
    ]
    DatasetDict({"test": Dataset.from_dict(data)}).save_to_disk(str(tmp_path / "dict"))
    assert [p.text for p in load_prompts(str(tmp_path / "dict"), split="test")] == ["a\n", "b\n"]
    with pytest.raises(ValueError, match="split 'train' not in .*; splits: test"):
        load_prompts(str(tmp_path / "dict"))


def test_missing_prompt_column_names_it_and_lists_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError) as info:
        load_prompts(str(path))
    assert str(info.value) == (
        f"prompt column 'prompt' not found in {path}; available columns: question, answer"
    )


def test_chat_message_column_becomes_messages(tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Write add(a, b)."},
    ]
    reply = {"role": "assistant", "content": "def add(a, b): return a + b"}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"id": "c1", "messages": [*conversation, reply]}) + "\n")
    (prompt,) = load_prompts(str(path), prompt_column="messages")
    # the final reply is dropped: the target regenerates it
    assert prompt == Prompt("c1", "Write add(a, b).", "default", tuple(conversation))


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")


def test_render_prompt_plain_without_chat_template():
    tokenizer = tiny_tokenizer()
    assert not getattr(tokenizer, "chat_template", None)
    prompt = Prompt("p", "def add(a, b):\n", "function_body")
    assert render_prompt(tokenizer, prompt) == "def add(a, b):\n"


def test_render_prompt_uses_chat_template():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    assert render_prompt(tokenizer, Prompt("p", "hi", "x")) == "<user>hi\n<assistant>"
    messages = ({"role": "system", "content": "S"}, {"role": "user", "content": "U"})
    assert (
        render_prompt(tokenizer, Prompt("p", "U", "x", messages))
        == "<system>S\n<user>U\n<assistant>"
    )


def test_unknown_bundled_name_lists_the_bundled_sets():
    with pytest.raises(ValueError) as info:
        load_prompts("stdlib-evl")
    assert str(info.value) == (
        "unknown prompt set 'stdlib-evl'; bundled sets: chat-distill, chat-eval, stdlib-distill, stdlib-eval, stdlib-long; "
        "or give a local file or a datasets Hub id (owner/name)"
    )


def test_bad_local_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    path = tmp_path / "p.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="cannot read prompts from"):
        load_prompts(str(path))


def test_long_set_holds_whole_heldout_modules_from_their_start():
    from data.corpus import stdlib_files
    from data.make_prompts import LONG_CHARS

    fraction = CorpusConfig().heldout_fraction
    rows = raw_rows("stdlib-long")
    assert len(rows) == 30 and {r["category"] for r in rows} == {"long_module"}
    sources = {f.module: f.text for f in stdlib_files()}
    for row in rows:
        assert is_heldout(row["module"], fraction)
        text = row["prompt"]
        assert LONG_CHARS[0] // 2 < len(text) <= LONG_CHARS[1] and text.endswith("\n")
        assert sources[row["module"]].startswith(text)
