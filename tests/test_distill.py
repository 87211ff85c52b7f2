"""Distillation datasets: rows equal HF greedy generate, exact masks, resume, refusals, and the
stored layout of the teacher signals (batched forwards equal per-row ones)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import data.distill as distill
from data.distill import build_dataset, build_shard, check_manifest, screen, teacher_signals
from data.generate import Sampling, generate
from data.prompts import Prompt
from models.target import target_fingerprint, tokenizer_hash
from recipes import load_config
from recipes.schema import DistillConfig

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


def _die_in_generation(monkeypatch, call: int) -> None:
    """The ``call``-th generated batch (1-based) kills the build, before it is generated."""
    real, calls = distill.generate, []

    def generate_or_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "generate", generate_or_die)


def _die_while_writing(monkeypatch, shard: int) -> None:
    """Writing shard ``shard`` kills the build with its Arrow files half written: the real
    write, then every file cut to half its bytes, then the kill."""
    real = datasets.Dataset.save_to_disk

    def save_or_die(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        if path.endswith(f"shard-{shard:05d}"):
            for file in Path(path).glob("*.arrow"):
                file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_or_die)


@pytest.mark.parametrize("where", ["between_batches_of_a_shard", "while_writing_a_shard"])
def test_kill_inside_a_shard_then_resume_equals_uninterrupted(
    tmp_path, tiny_target_dir, tiny, monkeypatch, where
):
    """A build killed inside its third shard (one of its two generated batches done, or its
    files half written) leaves that shard not done; the rerun rebuilds it (and only the shards
    not done) and ends with the dataset an uninterrupted build makes."""
    model, tokenizer = tiny
    settings = ("distill.temperature=1.0", "distill.batch_size=1")  # 2 batches a shard
    cfg = _cfg(tmp_path / "killed", tiny_target_dir, PROMPTS, *settings)
    if where == "between_batches_of_a_shard":
        _die_in_generation(monkeypatch, call=6)  # shard 2's second batch
    else:
        _die_while_writing(monkeypatch, shard=2)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(cfg, model, tokenizer)
    shards = tmp_path / "killed" / "out" / "shards"
    done = sorted(p.name for p in shards.iterdir() if not p.name.startswith("."))
    assert done == ["shard-00000", "shard-00001"]
    assert not (tmp_path / "killed" / "out" / "manifest.json").exists()
    if where == "while_writing_a_shard":  # the half-written files are there, not as a shard
        (partial,) = [p for p in shards.iterdir() if p.name.startswith(".")]
        assert any(partial.glob("*.arrow"))
    monkeypatch.undo()

    rebuilt, real = [], distill.build_shard

    def recording_build_shard(model, tokenizer, items, *args, **kwargs):
        rebuilt.append([prompt.id for prompt, _ in items])
        return real(model, tokenizer, items, *args, **kwargs)

    monkeypatch.setattr(distill, "build_shard", recording_build_shard)
    resumed = build_dataset(cfg, model, tokenizer)
    assert rebuilt == [["p4", "p5"], ["p6"]]  # shards 2 and 3; the finished ones were kept
    assert sorted(p.name for p in shards.iterdir()) == [f"shard-{i:05d}" for i in range(4)]
    monkeypatch.undo()
    uninterrupted = build_dataset(
        _cfg(tmp_path / "straight", tiny_target_dir, PROMPTS, *settings), model, tokenizer
    )
    assert datasets.load_from_disk(str(resumed / "dataset")).to_list() == (
        datasets.load_from_disk(str(uninterrupted / "dataset")).to_list()
    )
    manifests = [
        json.loads((out / "manifest.json").read_text()) for out in (resumed, uninterrupted)
    ]
    assert manifests[0]["shards"] == manifests[1]["shards"]
    assert manifests[0]["rows"] == manifests[1]["rows"] == len(PROMPTS)


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
    assert hidden.shape == (ids.shape[1], 2, model.config.hidden_size)  # (T, L, H)
    torch.testing.assert_close(hidden[:, 0], out.hidden_states[0][0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(hidden[:, 1], out.hidden_states[2][0], atol=2e-3, rtol=1e-3)


def _signal_rows(tokenizer) -> list[dict]:
    """Rows of different lengths: a prompt plus a made-up response each."""
    rows = []
    for n, source in enumerate(PROMPTS):
        prompt = tokenizer(source["prompt"], add_special_tokens=False)["input_ids"]
        response = [(7 * n + 3 * j) % 50 + 5 for j in range(2 + 3 * n)]
        rows.append({"input_ids": prompt + response, "prompt_len": len(prompt)})
    return rows


def _per_row_reference(model, row: dict, k: int, layers: list[int]):
    """The unbatched forward of one row: top-k over the full-vocabulary log-softmax at the
    positions that predict response tokens, and the chosen hidden states as (T, L, H)."""
    out = model(input_ids=torch.tensor([row["input_ids"]]), output_hidden_states=True)
    logprobs = torch.log_softmax(out.logits[0, row["prompt_len"] - 1 : -1].float(), dim=-1)
    hidden = torch.stack([out.hidden_states[i][0] for i in layers], dim=1)
    return logprobs, hidden


def test_batched_teacher_signals_equal_per_row(tiny):
    model, tokenizer = tiny
    rows = _signal_rows(tokenizer)
    cfg = DistillConfig(topk_logprobs=5, hidden_layers=[2, 0, 1])
    batches = distill._signal_batches(rows, 60)
    assert any(len({len(rows[i]["input_ids"]) for i in b}) > 1 for b in batches)  # padding
    assert len(batches) < len(rows)
    with torch.no_grad():
        teacher_signals(model, rows, cfg, max_tokens=60)
        for row in rows:
            logprobs, hidden = _per_row_reference(model, row, 5, [2, 0, 1])
            top = logprobs.topk(5, dim=-1)
            assert row["topk_ids"].dtype == np.int32 and row["topk_logprobs"].dtype == np.float16
            np.testing.assert_array_equal(row["topk_ids"], top.indices.numpy())
            torch.testing.assert_close(
                torch.from_numpy(row["topk_logprobs"]).float(), top.values, atol=2e-3, rtol=1e-3
            )
            assert row["hidden_states"].dtype == np.float16
            assert row["hidden_states"].shape == (len(row["input_ids"]), 3, 32)
            torch.testing.assert_close(
                torch.from_numpy(row["hidden_states"]).float(), hidden, atol=2e-3, rtol=1e-3
            )


def test_teacher_signals_in_bfloat16(tiny):
    """A bf16 target: the top-k log-probabilities are computed in float32 from its bf16 logits
    and stored as fp16; the values match the row's own bf16 forward."""
    model, tokenizer = tiny
    model = copy.deepcopy(model).to(torch.bfloat16)
    rows = _signal_rows(tokenizer)
    with torch.no_grad():
        teacher_signals(model, rows, DistillConfig(topk_logprobs=3, hidden_layers=[1]), 60)
        for row in rows:
            logprobs, hidden = _per_row_reference(model, row, 3, [1])
            ids = torch.from_numpy(row["topk_ids"]).long()
            torch.testing.assert_close(
                torch.from_numpy(row["topk_logprobs"]).float(),
                logprobs.gather(-1, ids),
                atol=2e-2,
                rtol=1e-2,
            )
            assert logprobs.gather(-1, ids[:, :1]).squeeze(-1).tolist() == pytest.approx(
                logprobs.max(-1).values.tolist(), abs=1e-6
            )
            assert row["hidden_states"].dtype == np.float16
            torch.testing.assert_close(
                torch.from_numpy(row["hidden_states"]).float(), hidden.float(), atol=2e-2, rtol=1e-2
            )


def test_stored_features_and_layout(tmp_path, tiny_target_dir, tiny):
    """The exact column types, read back with ``with_format("numpy")`` as the training side
    does; the manifest records the layout."""
    from datasets import Array2D, Array3D, Sequence, Value

    model, tokenizer = tiny
    cfg = _cfg(
        tmp_path,
        tiny_target_dir,
        PROMPTS,
        "distill.topk_logprobs=4",
        "distill.hidden_layers=[0,2,1]",
    )
    out = build_dataset(cfg, model, tokenizer)
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert ds.features == datasets.Features(
        {
            "input_ids": Sequence(Value("int32")),
            "loss_mask": Sequence(Value("int8")),
            "prompt_len": Value("int32"),
            "source_id": Value("string"),
            "category": Value("string"),
            "topk_ids": Array2D(shape=(None, 4), dtype="int32"),
            "topk_logprobs": Array2D(shape=(None, 4), dtype="float16"),
            "hidden_states": Array3D(shape=(None, 3, 32), dtype="float16"),
        }
    )
    # datasets' numpy formatter upcasts (ints to int64, floats to float32) unless dtype=None
    for row in ds.with_format("numpy", dtype=None):
        n, start = len(row["input_ids"]), int(row["prompt_len"])
        assert row["input_ids"].dtype == np.int32 and row["loss_mask"].dtype == np.int8
        assert row["prompt_len"].dtype == np.int32
        assert row["topk_ids"].dtype == np.int32 and row["topk_ids"].shape == (n - start, 4)
        assert row["topk_logprobs"].dtype == np.float16
        assert row["topk_logprobs"].shape == (n - start, 4)
        assert row["hidden_states"].dtype == np.float16
        assert row["hidden_states"].shape == (n, 3, 32)
        assert row["loss_mask"].tolist() == [0] * start + [1] * (n - start)
    row = ds.with_format("numpy")[0]
    assert row["hidden_states"].shape == (len(row["input_ids"]), 3, 32)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 2
    assert manifest["layout"]["hidden_states"] == "T,L,H float16"
    assert manifest["layout"]["topk_ids"] == "R,K int32"


def test_sorted_batches_keep_the_row_order(tiny, monkeypatch):
    """Generation batches are formed from the prompts sorted by length; the rows come back in
    prompt order, each equal to generating its prompt alone (greedy)."""
    model, tokenizer = tiny
    prompts = [Prompt(id=p["id"], text=p["prompt"], category=p["category"]) for p in PROMPTS]
    items, _ = screen(prompts, tokenizer, 64)
    assert len({len(ids) for _, ids in items}) > 2
    seen = []

    def recording(model, batch, *args):
        seen.append([len(p) for p in batch])
        return generate(model, batch, *args)

    monkeypatch.setattr(distill, "generate", recording)
    cfg = DistillConfig(max_new_tokens=8, batch_size=3)
    rows = build_shard(model, tokenizer, items, cfg, seed=0)
    flat = [n for batch in seen for n in batch]
    assert flat == sorted(flat, reverse=True) and [len(b) for b in seen] == [3, 3, 1]
    assert [r["source_id"] for r in rows] == [p.id for p, _ in items]
    for row, (prompt, ids) in zip(rows, items, strict=True):
        (alone,) = generate(
            model, [ids], Sampling(max_new_tokens=8), tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        assert row["input_ids"].tolist() == ids + alone
        assert row["prompt_len"] == len(ids) and row["category"] == prompt.category


def test_older_dataset_version_is_refused(tmp_path, tiny_target_dir, tiny):
    from data.distill import ensure_dataset

    model, tokenizer = tiny
    cfg = _cfg(tmp_path, tiny_target_dir, PROMPTS, "distill.max_new_tokens=4")
    out = build_dataset(cfg, model, tokenizer)
    message = (
        rf"dataset {out} was built by an older draftkit \(manifest version 1\); "
        r"delete it or choose another distill.out to rebuild"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    fingerprint = target_fingerprint(model, str(tiny_target_dir))
    with pytest.raises(ValueError, match=message):
        check_manifest(out, fingerprint, tokenizer_hash(tokenizer))
    with pytest.raises(ValueError, match=message):
        ensure_dataset(cfg, model, tokenizer)
    (out / "manifest.json").unlink()  # a partly built one: only build.json, from version 1
    settings = json.loads((out / "build.json").read_text())
    (out / "build.json").write_text(json.dumps({**settings, "version": 1}))
    with pytest.raises(ValueError, match=message):
        build_dataset(cfg, model, tokenizer)


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
        # as the single build: the fixture's float32 target, no cache for the recipe's drafter
        # (bf16 greedy outputs may part at near-ties between one and two threads)
        "target_dtype=float32",
        "distill.teacher_cache=false",
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
