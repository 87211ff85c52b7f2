"""Distillation datasets: rows equal HF greedy generate, exact masks, resume, refusals."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

import data.distill as distill
from data.distill import build_dataset, check_manifest
from models.target import target_fingerprint, tokenizer_hash
from recipes import load_config

PROMPTS = [
    {"id": f"p{i}", "category": "code" if i % 2 else "class", "prompt": text}
    for i, text in enumerate(
        [
            "def add(a, b):\n",
            "class Point:\n",
            "for i in range(10):\n",
            "import os\n",
            "def f(x):\n    return",
            "x = 1\n",
            "while True:\n",
        ]
    )
]
BAD = [
    {"id": "empty", "category": "bad", "prompt": "   "},
    {"id": "long", "category": "bad", "prompt": "def " * 200},
    {"id": "undecodable", "category": "bad", "prompt": "print('\ufffd')\n"},
    {"id": "missing", "category": "bad"},
]


def _cfg(tmp_path, tiny_target_dir, rows, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(
        [
            "recipe=d2sd",
            f"target={tiny_target_dir}",
            f"prompts.source={path}",
            f"distill.out={tmp_path / 'out'}",
            "distill.max_new_tokens=10",
            "distill.batch_size=3",
            "distill.shard_size=2",
            "distill.max_prompt_tokens=64",
            *extra,
        ]
    )


def test_rows_equal_hf_greedy_and_mask_covers_response(tmp_path, tiny_target_dir, tiny):
    model, tokenizer = tiny
    out = build_dataset(_cfg(tmp_path, tiny_target_dir, PROMPTS), model, tokenizer)
    rows = datasets.load_from_disk(str(out / "dataset"))
    assert len(rows) == len(PROMPTS)
    for row, source in zip(rows, PROMPTS, strict=True):
        prompt_ids = tokenizer(source["prompt"], add_special_tokens=False)["input_ids"]
        ref = model.generate(torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False)
        assert row["input_ids"] == ref[0].tolist()
        assert row["prompt_len"] == len(prompt_ids)
        assert row["loss_mask"] == [0] * len(prompt_ids) + [1] * (ref.shape[1] - len(prompt_ids))
        assert (row["source_id"], row["category"]) == (source["id"], source["category"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == len(PROMPTS) and len(manifest["shards"]) == 4
    assert manifest["response_tokens"] == sum(sum(r["loss_mask"]) for r in rows)
    assert manifest["tokenizer_sha256"] == tokenizer_hash(tokenizer)


def test_kill_then_resume_equals_uninterrupted(tmp_path, tiny_target_dir, tiny, monkeypatch):
    model, tokenizer = tiny
    real, calls = distill.build_shard, []

    def dies_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "build_shard", dies_on_third_shard)
    cfg = _cfg(tmp_path / "b", tiny_target_dir, PROMPTS, "distill.temperature=1.0")
    with pytest.raises(KeyboardInterrupt):
        build_dataset(cfg, model, tokenizer)
    assert sorted(p.name for p in (tmp_path / "b" / "out" / "shards").iterdir()) == [
        "shard-00000",
        "shard-00001",
    ]
    monkeypatch.setattr(distill, "build_shard", real)
    resumed = build_dataset(cfg, model, tokenizer)
    uninterrupted = build_dataset(
        _cfg(tmp_path / "c", tiny_target_dir, PROMPTS, "distill.temperature=1.0"), model, tokenizer
    )
    assert datasets.load_from_disk(str(resumed / "dataset")).to_list() == (
        datasets.load_from_disk(str(uninterrupted / "dataset")).to_list()
    )
    shards = json.loads((resumed / "manifest.json").read_text())["shards"]
    assert shards == json.loads((uninterrupted / "manifest.json").read_text())["shards"]


def test_changed_settings_refuse_to_resume(tmp_path, tiny_target_dir, tiny):
    model, tokenizer = tiny
    build_dataset(_cfg(tmp_path, tiny_target_dir, PROMPTS), model, tokenizer)
    with pytest.raises(ValueError, match="generation"):
        build_dataset(
            _cfg(tmp_path, tiny_target_dir, PROMPTS, "distill.max_new_tokens=5"), model, tokenizer
        )


class RecordingBar:
    """Stands in for tqdm: records the total, every update and every postfix."""

    made: list[RecordingBar] = []

    def __init__(self, total=None, initial=0, **kwargs):
        self.total, self.n, self.updates, self.postfixes = total, initial, [], []
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.n += n
        self.updates.append(n)

    def set_postfix(self, **kwargs):
        self.postfixes.append(kwargs)

    def close(self):
        pass


def test_progress_advances_per_generated_batch(tmp_path, tiny_target_dir, tiny, monkeypatch):
    """The bar counts prompts and moves after every generated batch (not once per shard), with
    the response tokens/s; its known total gives tqdm's ETA."""
    monkeypatch.setattr(distill, "tqdm", RecordingBar)
    RecordingBar.made = []
    cfg = _cfg(tmp_path, tiny_target_dir, PROMPTS, "distill.shard_size=4", "distill.batch_size=2")
    build_dataset(cfg, *tiny)
    (bar,) = RecordingBar.made
    assert bar.total == len(PROMPTS) == bar.n
    assert bar.updates == [2, 2, 2, 1]  # shards of 4 and 3 prompts, batches of 2
    assert len(bar.postfixes) == 4 and all(float(p["tok_s"]) > 0 for p in bar.postfixes)


def test_a_bad_prompt_column_leaves_nothing_to_refuse_later(tmp_path, tiny_target_dir, tiny):
    """A typo in the inputs fails before the build records its settings, so the corrected
    command is not refused as 'another build'."""
    with pytest.raises(ValueError, match="prompt column 'text' not found"):
        build_dataset(_cfg(tmp_path, tiny_target_dir, PROMPTS, "prompts.prompt_column=text"), *tiny)
    assert build_dataset(_cfg(tmp_path, tiny_target_dir, PROMPTS), *tiny).is_dir()


def test_manifest_mismatch_is_refused(tmp_path, tiny_target_dir, tiny):
    model, tokenizer = tiny
    out = build_dataset(_cfg(tmp_path, tiny_target_dir, PROMPTS), model, tokenizer)
    fingerprint = target_fingerprint(model, str(tiny_target_dir))
    check_manifest(out, fingerprint, tokenizer_hash(tokenizer))  # the right target passes
    other = {**fingerprint, "target": "other/model", "weights_sha256": "f" * 64}
    with pytest.raises(ValueError, match=rf"built by target {tiny_target_dir}.*not by other/model"):
        check_manifest(out, other, tokenizer_hash(tokenizer))
    with pytest.raises(ValueError, match="tokenizer"):
        check_manifest(out, fingerprint, "0" * 64)


def test_bad_input_counted_by_reason(tmp_path, tiny_target_dir, tiny):
    model, tokenizer = tiny
    cfg = _cfg(tmp_path, tiny_target_dir, PROMPTS + BAD, "distill.max_drop_rate=0.5")
    out = build_dataset(cfg, model, tokenizer)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dropped"] == {"empty": 1, "missing_prompt": 1, "too_long": 1, "undecodable": 1}
    assert manifest["rows"] == len(PROMPTS) and manifest["prompts_read"] == len(PROMPTS + BAD)
    with pytest.raises(ValueError, match="4 of 11 prompts are bad input"):
        build_dataset(_cfg(tmp_path / "strict", tiny_target_dir, PROMPTS + BAD), model, tokenizer)


def test_teacher_signals(tmp_path, tiny_target_dir, tiny):
    model, tokenizer = tiny
    cfg = _cfg(
        tmp_path,
        tiny_target_dir,
        PROMPTS[:2],
        "distill.topk_logprobs=4",
        "distill.hidden_layers=[0,2]",
    )
    row = datasets.load_from_disk(str(build_dataset(cfg, model, tokenizer) / "dataset"))[0]
    ids = torch.tensor([row["input_ids"]])
    out = model(input_ids=ids, output_hidden_states=True)
    start = row["prompt_len"]
    logprobs = torch.log_softmax(out.logits[0, start - 1 : -1], dim=-1).topk(4, dim=-1)
    assert row["topk_ids"] == logprobs.indices.tolist()
    torch.testing.assert_close(
        torch.tensor(row["topk_logprobs"]), logprobs.values, atol=2e-3, rtol=1e-3
    )
    hidden = torch.tensor(row["hidden_states"])
    assert hidden.shape == (2, ids.shape[1], model.config.hidden_size)
    torch.testing.assert_close(hidden[1], out.hidden_states[2][0], atol=2e-3, rtol=1e-3)


def test_signal_budget_refused_before_generation(tmp_path, tiny_target_dir, tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(distill, "build_shard", lambda *a, **k: pytest.fail("generated"))
    cfg = _cfg(
        tmp_path,
        tiny_target_dir,
        PROMPTS,
        "distill.hidden_layers=[1]",
        "distill.max_signal_gb=1e-9",
    )
    with pytest.raises(ValueError, match="max_signal_gb"):
        build_dataset(cfg, model, tokenizer)


@pytest.mark.slow
def test_two_processes_split_the_shards(tmp_path, tiny_target_dir, tiny):
    """torchrun with 2 CPU processes (gloo): each builds its own shards; same dataset as 1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    model, tokenizer = tiny
    single = build_dataset(_cfg(tmp_path / "one", tiny_target_dir, PROMPTS), model, tokenizer)
    cfg_two = _cfg(tmp_path / "two", tiny_target_dir, PROMPTS)
    overrides = [
        "recipe=d2sd",
        f"target={tiny_target_dir}",
        f"prompts.source={cfg_two.prompts.source}",
        f"distill.out={cfg_two.distill.out}",
        "distill.max_new_tokens=10",
        "distill.batch_size=3",
        "distill.shard_size=2",
        "distill.max_prompt_tokens=64",
        "train.device=cpu",
    ]
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "-m", "data.distill", *overrides],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0/2: 2 of its 2 shards to build: [0, 2]" in proc.stdout
    assert "process 1/2: 2 of its 2 shards to build: [1, 3]" in proc.stdout
    one = json.loads((single / "manifest.json").read_text())
    two = json.loads((Path(cfg_two.distill.out) / "manifest.json").read_text())
    assert two["shards"] == one["shards"] and two["rows"] == one["rows"]


def test_recipe_stage_builds_then_reuses(tmp_path, tiny_target_dir, monkeypatch):
    """train/drafter.py builds the dataset when it is missing, reuses it when present."""
    import train.drafter as drafter_entry

    cfg = _cfg(tmp_path, tiny_target_dir, PROMPTS)
    argv = [
        "recipe=draft_lm",
        f"target={tiny_target_dir}",
        f"prompts.source={cfg.prompts.source}",
        f"distill.out={cfg.distill.out}",
        f"output_dir={tmp_path / 'run'}",
        "distill.max_new_tokens=4",
        "train.device=cpu",
        "train.steps=1",
        "train.batch_size=4",
        "drafter.num_layers=1",
    ]
    assert drafter_entry.main(argv) == 0
    manifest = tmp_path / "out" / "manifest.json"
    assert json.loads(manifest.read_text())["rows"] == len(PROMPTS)
    built = manifest.stat().st_mtime_ns
    monkeypatch.setattr(distill, "build_shard", lambda *a, **k: pytest.fail("rebuilt"))
    assert drafter_entry.main([*argv, f"output_dir={tmp_path / 'run2'}"]) == 0
    assert manifest.stat().st_mtime_ns == built


def test_recipe_stage_refuses_another_targets_dataset(tmp_path, tiny_target_dir, tiny):
    from data.distill import ensure_dataset

    model, tokenizer = tiny
    cfg = _cfg(tmp_path, tiny_target_dir, PROMPTS, "distill.max_new_tokens=4")
    ensure_dataset(cfg, model, tokenizer)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # "another target": same name, other weights
    try:
        with pytest.raises(ValueError, match="weights_sha256"):
            ensure_dataset(cfg, model, tokenizer)
    finally:
        with torch.no_grad():
            model.model.norm.weight.sub_(1.0)
