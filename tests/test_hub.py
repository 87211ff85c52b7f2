"""Model card rendering and Hub push (through a local stand-in of the Hub API, never the internet)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from models.hub import main, push_drafter, render_model_card, write_model_card
from tests.hub_standin import SENTINEL

REPO = "someone/draft-lm-stdlib"

TRAINING = {
    "recipe": "draft_lm",
    "command": "python -m train.distill recipe=draft_lm data.rows=2000",
    "config": {"drafter": {"type": "draft_lm", "layers": 1}, "optim": {"lr": 0.0003}},
    "data": {
        "prompts": "stdlib-distill",
        "rows": 2000,
        "response_tokens": 400000,
        "temperature": 0.0,
        "max_new_tokens": 256,
        "manifest_sha256": "ab" * 32,
    },
    "metrics": {
        "steps": 300,
        "tokens": 123456,
        "seconds": 100.0,
        "train_loss": 1.23,
        "top1_agreement": 0.61,
        "heldout_tau": 2.1,
        "num_draft": 4,
        "topology": "single",
        "world_size": 1,
    },
}
EVAL = {
    "tau": 2.3,
    "speedup": 1.4,
    "machine": "ci-cpu-16",
    "prompts": "stdlib-eval",
    "n_prompts": 240,
    "temperature": 0.0,
    "a_key_nobody_planned": "kept|as text",
}


def make_drafter(folder, target_id="stdlib-llama", training=TRAINING, evaluation=None):
    """A drafter folder as the training code writes it (tiny random weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "drafter_type": "draft_lm",
        "draftkit_version": 1,
        "target": {
            "id": target_id,
            "vocab_size": 4096,
            "hidden_size": 256,
            "tokenizer_sha256": "12" * 32,
            "config_sha256": "34" * 32,
        },
        "drafter": {"layers": 1, "hidden_size": 256},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({"lm_head.weight": torch.randn(16, 8)}, str(folder / "model.safetensors"))
    if training is not None:
        (folder / "training.json").write_text(json.dumps(training, indent=2))
    if evaluation is not None:
        (folder / "eval.json").write_text(json.dumps(evaluation, indent=2))
    return folder


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def folder_bytes(folder) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_no_token_anywhere(*texts, folders=()):
    for text in texts:
        assert SENTINEL not in text, "the token leaked into output"
    for folder in folders:
        for path, data in folder_bytes(folder).items():
            assert SENTINEL.encode() not in data, f"the token leaked into {path}"


# ---------------------------------------------------------------- model card


def test_card_renders_training_record_and_says_eval_not_measured(tmp_path):
    card = render_model_card(make_drafter(tmp_path / "d"))
    meta = front_matter(card)
    assert meta["library_name"] == "draftkit"
    assert meta["tags"] == ["speculative-decoding", "drafter", "draft_lm"]
    assert "base_model" not in meta  # "stdlib-llama" is not a Hub id
    assert "stdlib-llama" in card and "python -m infer.eval <repo_id or path>" in card
    assert TRAINING["command"] in card
    for key, value in [
        ("prompts", "stdlib-distill"),
        ("rows", "2000"),
        ("response_tokens", "400000"),
    ]:
        assert f"| `{key}` | {value} |" in card
    assert "ab" * 32 in card  # manifest hash
    for key, value in [("top1_agreement", "0.61"), ("heldout_tau", "2.1"), ("steps", "300")]:
        assert f"| `{key}` | {value} |" in card
    assert '"lr": 0.0003' in card  # the resolved recipe
    evaluation = card.split("## Evaluation")[1]
    assert "not measured yet" in evaluation
    assert not re.search(r"</?(details|summary|table|div|br|img|p|a)\b", card)  # plain markdown


def test_card_renders_eval_json_including_unknown_keys(tmp_path):
    card = render_model_card(make_drafter(tmp_path / "d", evaluation=EVAL))
    evaluation = card.split("## Evaluation")[1]
    assert "not measured yet" not in evaluation
    for row in ("| `tau` | 2.3 |", "| `speedup` | 1.4 |", "| `n_prompts` | 240 |"):
        assert row in evaluation
    assert "| `machine` | ci-cpu-16 |" in evaluation
    assert "| `a_key_nobody_planned` | kept\\|as text |" in evaluation  # pipe escaped


def test_card_renders_whatever_training_json_has(tmp_path):
    bare = render_model_card(make_drafter(tmp_path / "bare", training=None))
    assert "No training record" in bare and "not measured yet" in bare
    partial = {"metrics": {"train_loss": 0.5, "new_metric": [1, 2]}}
    card = render_model_card(make_drafter(tmp_path / "partial", training=partial))
    assert "| `train_loss` | 0.5 |" in card and "| `new_metric` | [1, 2] |" in card
    assert "### Data" not in card and "Command:" not in card


@pytest.mark.parametrize(
    "target_id, base_model",
    [
        ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B"),
        ("stdlib-llama", None),
        ("/abs/path/to/target", None),
        ("a/b/c", None),
    ],
)
def test_front_matter_names_base_model_only_for_hub_ids(tmp_path, target_id, base_model):
    card = render_model_card(make_drafter(tmp_path / "d", target_id=target_id))
    assert front_matter(card).get("base_model") == base_model


def test_write_model_card_and_card_only_cli(tmp_path, capsys):
    folder = make_drafter(tmp_path / "d")
    path = write_model_card(folder)
    assert path == folder / "README.md" and path.read_text() == render_model_card(folder)
    path.unlink()
    assert main([str(folder), "--card-only"]) == 0
    assert (folder / "README.md").read_text() == render_model_card(folder)
    assert str(folder / "README.md") in capsys.readouterr().out


def test_importing_the_module_has_no_side_effects():
    code = "import sys, models.hub; print('huggingface_hub' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- push


def test_push_round_trip_through_the_hub_api(tmp_path, hub, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    folder = make_drafter(tmp_path / "d", evaluation=EVAL)
    url = push_drafter(folder, REPO, endpoint=hub.endpoint)

    assert url.startswith(f"{hub.endpoint}/{REPO}/commit/")
    assert (folder / "README.md").is_file()
    assert f"python -m infer.eval {REPO}" in (folder / "README.md").read_text()
    assert hub.files(REPO) == folder_bytes(folder)  # every file, byte for byte, README included
    assert set(hub.files(REPO)) == {
        "README.md",
        "config.json",
        "model.safetensors",
        "training.json",
        "eval.json",
    }
    assert hub.repo(REPO)["private"] is True
    assert hub.repo(REPO)["commits"][0]["summary"] == "Upload draft_lm drafter (draftkit)"
    assert set(hub.yaml_checked) == {(folder / "README.md").read_text()}  # checked before upload
    # The token reached the server on every request, and nowhere else.
    assert hub.auth_headers and all(h == f"Bearer {SENTINEL}" for h in hub.auth_headers)
    captured = capsys.readouterr()
    assert_no_token_anywhere(
        captured.out,
        captured.err,
        caplog.text,
        *(path for _, path in hub.requests),
        folders=(folder, tmp_path / "hub"),
    )


def test_push_again_updates_the_existing_repo(tmp_path, hub):
    folder = make_drafter(tmp_path / "d")
    push_drafter(folder, REPO, endpoint=hub.endpoint)
    make_drafter(folder, evaluation=EVAL)  # eval measured later: new file, new card
    push_drafter(folder, REPO, endpoint=hub.endpoint, commit_message="add eval")
    assert hub.files(REPO) == folder_bytes(folder)
    second = hub.repo(REPO)["commits"][1]
    assert second["summary"] == "add eval"
    assert "config.json" not in second["paths"]  # unchanged files are not sent again


def test_cli_push_through_the_hub_api(tmp_path, hub, capsys):
    folder = make_drafter(tmp_path / "d")
    assert main([str(folder), REPO, "--public", "--endpoint", hub.endpoint]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().startswith(f"{hub.endpoint}/{REPO}/commit/")
    assert hub.repo(REPO)["private"] is False
    assert hub.files(REPO) == folder_bytes(folder)
    assert_no_token_anywhere(captured.out, captured.err)


def test_push_refuses_offline_mode_with_a_clear_message(tmp_path, hub, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        push_drafter(make_drafter(tmp_path / "d"), REPO, endpoint=hub.endpoint)
    assert hub.requests == []


def test_push_without_any_token_says_where_to_put_one(tmp_path, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # ignore a cached login
    with pytest.raises(RuntimeError, match="HF_TOKEN"):
        push_drafter(make_drafter(tmp_path / "d"), REPO, endpoint=hub.endpoint)
    assert hub.requests == []


# ---------------------------------------------------------------- refusals


def test_push_refuses_a_folder_that_contains_the_token(tmp_path, hub, capsys):
    leaky = {**TRAINING, "command": f"HF_TOKEN={SENTINEL} python -m train.distill"}
    folder = make_drafter(tmp_path / "d", training=leaky)
    assert main([str(folder), REPO, "--endpoint", hub.endpoint]) == 2
    err = capsys.readouterr().err
    assert "training.json" in err and "token" in err and SENTINEL not in err
    assert hub.requests == [] and not (folder / "README.md").exists()


@pytest.mark.parametrize(
    "name", ["pytorch_model.bin", "optimizer.pt", "extra/state.pkl", "x.pickle"]
)
def test_push_refuses_pickle_files(tmp_path, hub, name):
    folder = make_drafter(tmp_path / "d")
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match=re.escape(name)) as err:
        push_drafter(folder, REPO, endpoint=hub.endpoint)
    assert "safetensors only" in str(err.value)
    assert hub.requests == [] and not (folder / "README.md").exists()


def test_push_refuses_a_folder_without_config_or_weights(tmp_path):
    no_config = make_drafter(tmp_path / "a")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_drafter(no_config, REPO)
    no_weights = make_drafter(tmp_path / "b")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        push_drafter(no_weights, REPO)
    no_type = make_drafter(tmp_path / "c")
    (no_type / "config.json").write_text(json.dumps({"target": {"id": "x"}}))
    with pytest.raises(ValueError, match="drafter_type"):
        push_drafter(no_type, REPO)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        push_drafter(tmp_path / "nowhere", REPO)


@pytest.mark.parametrize(
    "repo_id", ["draft-lm", "a/b/c", "owner/", "/name", "-owner/name", "owner/na me", "o/x..y"]
)
def test_push_refuses_bad_repo_ids(tmp_path, repo_id):
    folder = make_drafter(tmp_path / "d")
    with pytest.raises(ValueError, match=re.escape(repr(repo_id))) as err:
        push_drafter(folder, repo_id)
    assert "owner/name" in str(err.value)
    assert not (folder / "README.md").exists()


@pytest.mark.parametrize("token_args", [["--token", SENTINEL], [f"--token={SENTINEL}"]])
def test_cli_refuses_a_token_on_the_command_line(tmp_path, capsys, token_args):
    folder = make_drafter(tmp_path / "d")
    assert main([str(folder), REPO, *token_args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --token") and "HF_TOKEN" in captured.err
    assert_no_token_anywhere(captured.out, captured.err, folders=(folder,))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{folder}", "not-a-repo"], "'not-a-repo'"),
        (["{folder}/missing", REPO], "missing"),
        (["{folder}"], "REPO_ID"),
        (["{folder}", REPO, "--bogus"], "--bogus"),
    ],
)
def test_cli_errors_are_one_line_and_return_2(tmp_path, capsys, args, needle):
    folder = make_drafter(tmp_path / "d")
    assert main([a.format(folder=folder) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err


# ---------------------------------------------------------------- download

DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, so nothing gets through


@pytest.fixture
def hub_cache(hub, tmp_path, monkeypatch):
    """Downloads from the stand-in, into a cache under ``tmp_path`` (never the user's own).

    huggingface_hub reads ``HF_HOME``/``HF_HUB_CACHE`` and the ``/resolve/`` URL template (from
    ``HF_ENDPOINT``) once, at import, into constants: those are patched, as the `hub` fixture
    patches ``ENDPOINT``. Any request not for 127.0.0.1 (NO_PROXY, set by `hub`) is sent to a
    dead proxy, so a client that built a huggingface.co URL fails the test instead of leaving.
    """
    home = tmp_path / "hf_home"
    for name, value in [
        ("HF_HOME", home),
        ("HF_HUB_CACHE", home / "hub"),
        ("HF_XET_CACHE", home / "xet"),
        ("HF_ASSETS_CACHE", home / "assets"),
    ]:
        monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(hf_constants, name, str(value))
    template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    for scheme in ("HTTPS", "HTTP", "ALL"):
        monkeypatch.setenv(f"{scheme}_PROXY", DEAD_PROXY)
        monkeypatch.setenv(f"{scheme.lower()}_proxy", DEAD_PROXY)
    huggingface_hub.close_session()  # the shared client reads the environment when created
    return home / "hub"


def tiny_draft_lm(vocab_size=64):
    """A real ``draft_lm`` drafter (1-layer, width-32 Llama, random weights) and its target."""
    from models.draft_lm import DraftLM
    from models.drafter import TargetInfo
    from tests.conftest import tiny_llama

    target = TargetInfo("tiny-target", vocab_size, 32, 1, "12" * 32, "34" * 32)
    lm_config = tiny_llama(vocab_size).config
    lm_config.num_hidden_layers = 1
    config = {
        "lm_config": lm_config.to_dict(),
        "loss": "ce",
        "topk": 4,
        "num_draft": 4,
        "init": "random",
    }
    torch.manual_seed(0)
    return DraftLM(config, target), target


def test_load_drafter_downloads_a_pushed_drafter_through_the_hub_api(tmp_path, hub, hub_cache):
    from dataclasses import replace

    from models.drafter import load_drafter
    from models.vocab import write_counts

    drafter, target = tiny_draft_lm()
    folder = drafter.save_pretrained(tmp_path / "d")
    write_counts(folder, torch.arange(target.vocab_size))  # what draft_vocab=N reads
    push_drafter(folder, "someone/name", endpoint=hub.endpoint)
    hub.requests.clear()

    loaded = load_drafter("someone/name", target)  # the real snapshot_download, no endpoint given
    assert type(loaded) is type(drafter) and loaded.target == target
    torch.testing.assert_close(loaded.state_dict(), drafter.state_dict(), rtol=0, atol=0)

    snapshot = next(hub_cache.glob("models--someone--name/snapshots/*"))
    assert snapshot.name == hub.repo("someone/name")["commits"][-1]["oid"]
    files = ["config.json", "model.safetensors", "vocab_counts.safetensors"]
    assert sorted(p.name for p in snapshot.iterdir()) == files
    for name in files:
        assert (snapshot / name).read_bytes() == (folder / name).read_bytes()
        assert ("GET", f"/someone/name/resolve/{snapshot.name}/{name}") in hub.requests
    assert not any("README.md" in path for _, path in hub.requests)  # allow_patterns honoured
    assert all(h == f"Bearer {SENTINEL}" for h in hub.auth_headers)  # private: the token is sent
    assert {method for method, _ in hub.requests} == {"GET", "HEAD"}
    # plain HTTP: no Xet token asked for and nothing in hf_xet's cache (its runtime may write
    # logs there when it is first loaded in this process, i.e. when this test runs alone)
    assert not any("xet" in path for _, path in hub.requests)
    xet = hub_cache.parent / "xet"
    assert not xet.exists() or {p.name for p in xet.iterdir()} <= {"logs"}

    other = replace(target, id="other-target", vocab_size=128)
    with pytest.raises(ValueError, match="vocab_size 64") as err:
        load_drafter("someone/name", other)
    assert "vocab_size 128" in str(err.value) and "someone/name" in str(err.value)


def test_hf_hub_download_from_the_stand_in(tmp_path, hub, hub_cache):
    folder = make_drafter(tmp_path / "d")
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("nested\n")
    push_drafter(folder, REPO, endpoint=hub.endpoint)
    commit = hub.repo(REPO)["commits"][-1]["oid"]

    path = huggingface_hub.hf_hub_download(REPO, "sub/notes.txt")
    assert path == str(
        hub_cache / f"models--someone--draft-lm-stdlib/snapshots/{commit}/sub/notes.txt"
    )
    assert Path(path).read_text() == "nested\n"
    gets = [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]
    assert huggingface_hub.hf_hub_download(REPO, "sub/notes.txt", revision=commit) == path
    assert [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]] == gets  # cached

    listed = huggingface_hub.HfApi().list_repo_files(REPO)
    assert sorted(listed) == sorted(folder_bytes(folder))
    with pytest.raises(huggingface_hub.errors.RemoteEntryNotFoundError):
        huggingface_hub.hf_hub_download(REPO, "absent.json")
    with pytest.raises(huggingface_hub.errors.RevisionNotFoundError):
        huggingface_hub.hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):  # private, no token
        huggingface_hub.hf_hub_download(REPO, "training.json", token=False)
