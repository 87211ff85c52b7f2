"""Bad input through the real entry points: every row is a command line a user could type and
the words its error must say. Each must end with exit status 2 and one ``error:`` line (no
traceback), before any target weights load or any data is built, with nothing written to the
output folder (the only other lines allowed on stderr are progress bars).

The range of every numeric setting is covered by ``test_ranges.py``; this table covers files,
folders, names and the settings only the target can check (pre-flight: ``train/preflight.py``,
``data.distill``'s and ``infer.eval``'s own).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import data.distill as distill_entry
import infer.eval as eval_entry
import models.target
import train.drafter as train_entry
from tests.conftest import build_tiny_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = models.target.resolve_target("stdlib-llama")
ENTRIES = {"train": train_entry.main, "eval": eval_entry.main, "distill": distill_entry.main}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_target_dir, tiny):
    """Bad files of every kind, a good drafter folder and its broken copies, a dataset built by
    another target, and another toolkit's dataset folder."""
    import torch

    from models.drafter import build_drafter
    from models.target import load_target
    from recipes import load_config

    root = tmp_path_factory.mktemp("bad_input")
    write = {
        "malformed.jsonl": '{"prompt": "def f():"}\n{"prompt": "x" oops\n{"prompt": "y"}\n',
        "empty.jsonl": "",
        "blank.jsonl": "\n  \n",
        "number.jsonl": '{"prompt": "def f():"}\n{"prompt": 5}\n',
        "list.jsonl": '{"prompt": "def f():"}\n["def g():"]\n',
        "text_column.jsonl": '{"text": "def f():"}\n',
        "unterminated.csv": 'prompt,category\n"def f():",a\n"def g(,b\n',
        "fields.csv": "prompt,category\ndef f,a\ndef g,b,extra\n",
        "prompts.txt": "def f():\n",
        "a_file": "not a folder",
    }
    for name, text in write.items():
        (root / name).write_text(text)
    no_weights = root / "no_weights_target"
    shutil.copytree(EMBEDDED, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))

    target, tokenizer = load_target("stdlib-llama")
    cfg = load_config(["recipe=dflash", "drafter.num_layers=1"])
    torch.manual_seed(0)
    good = build_drafter(cfg.drafter, target, tokenizer, "stdlib-llama").save_pretrained(
        root / "drafter"
    )
    broken = {
        "no_target_field": lambda f: _edit_config(f, lambda c: c.pop("target")),
        "no_vocab_field": lambda f: _edit_config(f, lambda c: c["target"].pop("vocab_size")),
        "not_json": lambda f: (f / "config.json").write_text("{drafter_type: dflash"),
        "zip_weights": lambda f: (f / "model.safetensors").write_bytes(b"PK\x03\x04 a zip"),
        "truncated": lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:5000]
        ),
        "no_weights": lambda f: (f / "model.safetensors").unlink(),
    }
    for name, damage in broken.items():
        shutil.copytree(good, root / name)
        damage(root / name)
    shutil.copytree(EMBEDDED, root / "hf_model")  # a Hugging Face model, not a drafter

    (root / "tiny_data").mkdir()
    prompts = [{"prompt": "import os\n"}, {"prompt": "def add(a, b):\n"}] * 4
    build_tiny_dataset(root / "tiny_data", tiny_target_dir, tiny, prompts,
                       "distill.max_new_tokens=4")  # fmt: skip
    import datasets

    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(str(root / "foreign_dataset"))
    return root


def _edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


T = ["recipe=draft_lm", "final_eval.limit=0"]  # a training command, before the case's items
# (entry, command-line items, words the one error line must contain); {f} = the files fixture
CASES = [
    # prompt files
    ("train", [*T, "prompts.source={f}/malformed.jsonl"], "line 2 is not valid JSON"),
    ("train", [*T, "prompts.source={f}/empty.jsonl"], "empty.jsonl' is empty"),
    ("train", [*T, "prompts.source={f}/blank.jsonl"], "blank.jsonl' is empty"),
    ("train", [*T, "prompts.source={f}/number.jsonl"], "holds int '5': a prompt is a string"),
    ("train", [*T, "prompts.source={f}/list.jsonl"], "line 2 holds a JSON list"),
    ("train", [*T, "prompts.source={f}/text_column.jsonl"], "prompt column 'prompt' not found"),
    ("train", [*T, "prompts.source={f}/unterminated.csv"], "line 3 is not valid CSV"),
    ("train", [*T, "prompts.source={f}/fields.csv"], "line 3 has 3 fields, but the header has 2"),
    ("train", [*T, "prompts.source={f}/prompts.txt"], "use one of .jsonl, .json, .csv"),
    ("train", [*T, "prompts.source={f}/missing.jsonl"], "missing.jsonl' does not exist"),
    ("train", [*T, "prompts.source=stdlib-nosuch"], "unknown prompt set 'stdlib-nosuch'"),
    ("train", [*T, "prompts.limit=8"], "gives 8 prompts, fewer than the train.batch_size=16"),
    ("train", ["recipe=d2sd", "prompts.limit=40"], "train.batch_size=8 + 64 held-out rows"),
    ("train", [*T, "final_eval.limit=4", "final_eval.prompts=nosuch"], "unknown prompt set"),
    # names: recipe, drafter type, target, Hub repo
    ("train", ["recipe=smollm2-135m-instruct"], "'smollm2-135m-instruct' is a target"),
    ("train", ["recipe=stdlib_target"], "sets no drafter.type, so it trains no drafter"),
    ("train", [*T, "drafter.type=nosuch"], "drafter.type=nosuch: unknown drafter type; valid"),
    ("train", [*T, "target={f}/no_weights_target"], "has no weights"),
    ("train", [*T, "target={f}/a_file"], "unknown target"),
    ("train", [*T, "hub.repo_id=bad id with spaces"], "bad repo id 'bad id with spaces'"),
    ("train", [*T, "hub.export_format=zlab"], "no 'zlab' export for drafter type 'draft_lm'"),
    ("train", ["recipe=dflash", "hub.export_format=zlab"], "train with drafter.layer_style=qwen3"),
    ("train", ["recipe=deer", "drafter.layer_style=qwen3"], "deer has no serving-engine layout"),
    # settings only the target can check
    ("train", ["recipe=dflash", "drafter.target_layers=[99]"], "drafter.target_layers [99]"),
    ("train", ["recipe=dflash", "drafter.mask_token_id=5000"], "valid ids are 0..4095"),
    ("train", [*T, "drafter.num_layers=9"], "drafter.num_layers=9: must be 1..8"),
    ("train", [*T, "distill.hidden_layers=[20]"], "valid hidden-state indices are 0..8"),
    ("train", ["recipe=medusa", "drafter.attention_window=64"], "has no windowed attention"),
    ("train", ["recipe=falcon", "drafter.num_layers=2"], "only 1 is supported"),
    # folders
    ("train", [*T, "output_dir={f}/a_file"], "is a file, not a folder"),
    ("train", [*T, "output_dir={f}/a_file/run"], "is a file, so no folder can be made"),
    ("train", [*T, "distill.out={f}/a_file"], "distill.out={f}/a_file is a file"),
    ("train", [*T, "distill.out={f}/foreign_dataset"], "is not a draftkit dataset"),
    ("train", [*T, "distill.out={f}/tiny_data/data"], "built with another target"),
    # infer.eval: drafter folders, prompts, target, output
    ("eval", ["limit=1"], "no drafter to evaluate"),
    ("eval", ["{f}/nosuch", "limit=1"], "neither a local folder nor a Hub id"),
    ("eval", ["{f}/no_target_field", "limit=1"], "config.json lacks target"),
    ("eval", ["{f}/no_vocab_field", "limit=1"], "lacks target.vocab_size"),
    ("eval", ["{f}/not_json", "limit=1"], "config.json is not valid JSON"),
    ("eval", ["{f}/zip_weights", "limit=1"], "is not a readable safetensors file"),
    ("eval", ["{f}/truncated", "limit=1"], "is not a readable safetensors file"),
    ("eval", ["{f}/no_weights", "limit=1"], "has no model.safetensors"),
    ("eval", ["{f}/hf_model", "limit=1"], "not a draftkit drafter folder: its config.json"),
    ("eval", ["{f}/drafter", "prompts={f}/empty.jsonl"], "empty.jsonl' is empty"),
    ("eval", ["{f}/drafter", "prompts={f}/malformed.jsonl"], "line 2 is not valid JSON"),
    ("eval", ["{f}/drafter", "target={f}/no_weights_target"], "has no weights"),
    ("eval", ["{f}/drafter", "out={f}/a_file"], "out={f}/a_file is a file"),
    # the data build on its own
    ("distill", [*T, "prompts.source={f}/malformed.jsonl"], "line 2 is not valid JSON"),
    ("distill", [*T, "distill.out={f}/a_file"], "is a file, not a folder"),
    ("distill", [*T, "distill.out={f}/tiny_data/data"], "built with another target"),
]


def _no_weights_loaded(*args, **kwargs):
    raise AssertionError("pre-flight let a bad input through to the weights")


@pytest.mark.parametrize(
    ("entry", "items", "words"),
    [pytest.param(*case, id=f"{case[0]}:{' '.join(case[1][-1:])}") for case in CASES],
)
def test_bad_input_is_one_error_line_before_any_work(files, tmp_path, capsys, monkeypatch,
                                                     entry, items, words):  # fmt: skip
    monkeypatch.setattr(models.target, "load_target", _no_weights_loaded)
    monkeypatch.setattr(train_entry, "load_target", _no_weights_loaded)
    out = tmp_path / "out"
    argv = [item.format(f=files) for item in items]
    if entry != "eval" and not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={out}")
    if entry == "eval" and not any(a.startswith("out=") for a in argv):
        argv.append(f"out={out}")
    assert ENTRIES[entry](argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()  # progress bars may come before it
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], captured.err
    assert words.format(f=files) in errors[0], errors[0]
    assert "Traceback" not in captured.out + captured.err
    assert not out.exists(), f"{entry} wrote {sorted(p.name for p in out.rglob('*'))}"


def test_the_table_holds_the_issue_cases():
    texts = [" ".join(items) for _, items, _ in CASES]
    for needed in ("malformed.jsonl", "empty.jsonl", "hub.repo_id=bad id", "target_layers=[99]",
                   "drafter.type=nosuch", "no_target_field", "zip_weights", "number.jsonl",
                   "no_weights_target", "recipe=smollm2", "tiny_data/data", "a_file"):  # fmt: skip
        assert any(needed in t for t in texts), needed
    assert len(CASES) >= 6 + 10


@pytest.mark.parametrize("blocked", ["read_only", "no_entry"])
def test_a_folder_this_user_may_not_write_is_refused(blocked):
    """A read-only folder, and one this user may not enter. Root writes anywhere, so as root the
    check runs in a subprocess that drops to user nobody once its imports are done."""
    import tempfile

    base = tempfile.mkdtemp(prefix="draftkit-perm-")
    try:
        folder = os.path.join(base, blocked)
        os.mkdir(folder, 0o555 if blocked == "read_only" else 0o700)
        os.chmod(base, 0o755)
        target = os.path.join(folder, "run")
        drop = "os.setgid(65534); os.setuid(65534)" if os.geteuid() == 0 else "pass"
        if blocked == "no_entry" and os.geteuid() != 0:
            os.chmod(folder, 0o000)
        code = (
            "import os, sys\nfrom recipes import ConfigError\n"
            "from recipes.cli import check_folder\n"
            f"{drop}\n"
            f"try: check_folder({target!r}, 'output_dir')\n"
            "except ConfigError as e: print(e); sys.exit(2)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, cwd=REPO)  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
        expected = "is not writable by this user" if blocked == "read_only" else "may not look"
        assert expected in done.stdout, done.stdout
        assert not os.path.exists(target)
    finally:
        for dirpath, _, _ in os.walk(base):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(base)
