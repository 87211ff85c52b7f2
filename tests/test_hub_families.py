"""Every drafter family through the Hub and back, on the local Hub stand-in (``hub`` fixture).

Per family: a tiny drafter trained by ``train/drafter.py`` on the tiny target, its drafting
settings tuned by the real tuner (``infer.tune.tune``, what ``infer.eval CKPT tune=true`` runs)
into ``tuned.json``, the folder pushed with ``python -m models.hub``, then loaded by its Hub id.
Pinned: the downloaded files equal the local ones byte for byte (``tuned.json`` included) and
so do the loaded weights; ``python -m infer.eval OWNER/NAME`` uses the published ``tuned.json``
(the settings it reports are the file's, and its τ equals the local folder's under the same
settings); greedy decoding with the downloaded drafter drafts the same trees as the local
drafter and emits plain decoding's tokens, for the families that re-attach the target's modules
too. Tuned settings survive the Hub both ways: ``infer.eval OWNER/NAME tune=true`` evaluates
what it just tuned, and training with ``hub.repo_id`` pushes after the final evaluation wrote
``tuned.json`` and ``eval.json``.
"""

from __future__ import annotations

import json

import pytest
import torch

import train.drafter as entry
from infer.decode import decode
from infer.eval import main as eval_main
from infer.proposers import proposer_for
from infer.tune import tune
from models.drafter import TUNED_NAME, TargetInfo, load_drafter
from models.hub import main as hub_main
from models.registry import load_families
from models.sampling import Sampling
from recipes import load_options
from recipes.schema import EvalConfig
from tests.conftest import build_tiny_dataset
from tests.test_hub import hub_cache  # noqa: F401  (fixture)
from tests.test_train_drafter import PROMPTS

# recipe -> overrides that shrink it to a few seconds on the tiny target (2 layers, width 32)
FAMILIES = {
    "draft_lm": ("drafter.num_layers=1",),
    "dflash": ("drafter.num_layers=1", "drafter.block_size=4", "drafter.num_anchors=4"),
    "deer": ("drafter.num_layers=1", "drafter.block_size=4", "drafter.num_anchors=4",
             "drafter.context_layers=1", "drafter.stage2_step=2"),
    "d2sd": ("drafter.num_layers=1", "drafter.block_size=4", "drafter.num_anchors=4",
             "drafter.vp_block_size=4", "drafter.vp_steps=2", "drafter.heldout_rows=2"),
    "medusa": ("drafter.num_layers=1", "drafter.num_heads=2", "drafter.tree_nodes=6"),
    "hydra": ("drafter.num_layers=1", "drafter.num_heads=2", "drafter.tree_nodes=6"),
    "hidden_transfer": ("drafter.num_heads=2", "drafter.tree_nodes=6"),
    "falcon": ("drafter.csgd_steps=3",),
    "eagle3": ("drafter.ttt_steps=2", "drafter.num_draft=3"),
}  # fmt: skip
# about 2-3 s a family at one thread (torch.set_num_threads(1), which train.threads=1 keeps), the
# whole module about 30 s: no case is marked slow
EVAL_FLAGS = ("limit=2", "max_new_tokens=8", "card=false")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_target_dir, tiny):
    """One distillation dataset of the tiny target for every family (the signals a family
    needs beyond it, e.g. hidden states, are computed online during training)."""
    root = tmp_path_factory.mktemp("hub_families_data")
    return build_tiny_dataset(root, tiny_target_dir, tiny, PROMPTS, "distill.max_new_tokens=12")


@pytest.fixture
def prompts(tmp_path):
    """PROMPTS as a prompt file (the bundled eval prompts exceed the tiny target's positions)."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def train_argv(family, tiny_target_dir, data_dir, out, *extra):
    """The training command line of a tiny ``family`` drafter (4 steps)."""
    return [
        f"recipe={family}", f"target={tiny_target_dir}", f"distill.out={data_dir}",
        f"output_dir={out}", "train.device=cpu", "train.steps=4", "train.batch_size=4",
        "train.warmup_steps=1", "train.save_every=4", "train.log_every=4", "train.threads=1",
        "final_eval.limit=0",
        *FAMILIES[family], *extra,
    ]  # fmt: skip


def discriminating(record: dict) -> dict:
    """``record`` choosing settings other than the drafter's defaults, so that a ``tuned.json``
    left unread would show: the tuner's own choice when it is not the defaults, else its best
    non-default candidate."""
    if record["settings"]:
        return record
    ranked = sorted(record["candidates"], key=lambda r: -r["predicted_speedup"])
    return {**record, "settings": next(r["settings"] for r in ranked if r["settings"])}


def eval_report(ckpt: str, tiny_target_dir, prompts, out, *extra) -> dict:
    """``python -m infer.eval CKPT`` on the tiny target; the report it wrote."""
    argv = [ckpt, f"target={tiny_target_dir}", f"prompts={prompts}", f"out={out}", *EVAL_FLAGS,
            *extra]  # fmt: skip
    assert eval_main(argv) == 0
    return json.loads((out / "eval.json").read_text())


def assert_tuned_settings(reported: dict, record: dict) -> None:
    """An ``infer.eval`` report drafted with ``record``'s settings, marked as tuned."""
    assert reported.get("tuned_on") == record["device"], "tuned.json was not used"
    assert reported["drafting"].endswith("(tuned)")
    for key, value in record["settings"].items():
        if key == "draft_vocab":  # not a report field of its own
            assert f"draft_vocab={value}" in reported["drafting"]
        else:
            assert reported[key] == value, key


class Recorder:
    """A proposer that records every draft tree (tokens and parents) of the one it wraps."""

    def __init__(self, proposer):
        self.proposer, self.trees = proposer, []

    def __getattr__(self, name):  # begin, observe, attach_cache, target_layers, ...
        return getattr(self.proposer, name)

    def propose(self, context):
        tree = self.proposer.propose(context)
        self.trees.append((tree.tokens.tolist(), tree.parents.tolist()))
        return tree


def test_every_registered_family_is_round_tripped():
    """A new family gets a Hub round trip here (FAMILIES) or this fails."""
    assert set(FAMILIES) == set(load_families())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_round_trips_through_the_hub(
    family,
    tmp_path,
    tiny,
    tiny_target_dir,
    data_dir,
    prompts,
    hub,
    hub_cache,  # noqa: F811
):
    """Train, tune, push, then load and evaluate by Hub id: the same files and weights, the
    published tuned settings used, the same drafts as the local drafter, lossless."""
    target, tokenizer = tiny
    assert entry.main(train_argv(family, tiny_target_dir, data_dir, tmp_path / family)) == 0
    folder = tmp_path / family / "drafter"
    tuning = [f"target={tiny_target_dir}", f"prompts={prompts}", "max_new_tokens=8",
              "tune_prompts=2"]  # fmt: skip
    tune(str(folder), load_options(EvalConfig, tuning), explicit={"target"})
    record = discriminating(json.loads((folder / TUNED_NAME).read_text()))
    (folder / TUNED_NAME).write_text(json.dumps(record, indent=2) + "\n")
    local = eval_report(str(folder), tiny_target_dir, prompts, tmp_path / "eval-local")

    name = f"tiny-{family.replace('_', '-')}"
    repo = f"someone/{name}"
    assert hub_main([str(folder), repo, "--endpoint", hub.endpoint]) == 0
    info = TargetInfo.of(target, tokenizer, str(tiny_target_dir))
    downloaded = load_drafter(repo, info, target_model=target)
    mine = load_drafter(folder, info, target_model=target)
    snapshot = next(hub_cache.glob(f"models--someone--{name}/snapshots/*"))
    for file in ("config.json", "model.safetensors", TUNED_NAME):
        assert (snapshot / file).read_bytes() == (folder / file).read_bytes(), file
    assert type(downloaded) is type(mine) and downloaded.drafter_type == family
    torch.testing.assert_close(downloaded.state_dict(), mine.state_dict(), rtol=0, atol=0)

    remote = eval_report(repo, tiny_target_dir, prompts, tmp_path / "eval-hub")
    assert remote["settings"]["drafter"] == repo
    assert_tuned_settings(remote["settings"], record)
    same = ("num_draft", "drafting", *record["settings"])
    assert {k: remote["settings"].get(k) for k in same} == {
        k: local["settings"].get(k) for k in same
    }
    if not record["settings"].get("cost_cut"):  # which cuts trees by the live drafting time
        assert remote["overall"]["tau"] == local["overall"]["tau"]  # T = 0: the same drafts
    assert remote["overall"]["lossless"]["identical"] == 2

    for p in PROMPTS[:4]:
        ids = tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]
        plain = decode(target, ids, 12, tokenizer.eos_token_id)
        recorders = [Recorder(proposer_for(d, 0, Sampling())) for d in (downloaded, mine)]
        runs = [decode(target, ids, 12, tokenizer.eos_token_id, proposer=r) for r in recorders]
        assert runs[0].tokens == runs[1].tokens == plain.tokens, p["prompt"]
        assert recorders[0].trees and recorders[0].trees == recorders[1].trees, p["prompt"]
        assert runs[0].accepted == runs[1].accepted, p["prompt"]


def test_tuning_a_hub_drafter_evaluates_the_settings_just_tuned(
    tmp_path,
    tiny_target_dir,
    data_dir,
    prompts,
    hub,
    hub_cache,  # noqa: F811
    monkeypatch,
):
    """``infer.eval OWNER/NAME tune=true`` evaluates the choice it has just made, as it does
    for a local folder."""
    import infer.tune

    assert entry.main(train_argv("dflash", tiny_target_dir, data_dir, tmp_path / "d")) == 0
    assert hub_main([str(tmp_path / "d" / "drafter"), "someone/x", "--endpoint", hub.endpoint]) == 0
    records, real = [], infer.tune.tune
    monkeypatch.setattr(
        infer.tune, "tune", lambda *a, **k: records.append(real(*a, **k)) or records[-1]
    )
    report = eval_report("someone/x", tiny_target_dir, prompts, tmp_path / "e", "tune=true",
                         "tune_prompts=2")  # fmt: skip
    assert_tuned_settings(report["settings"], records[0])


def test_training_with_a_repo_id_and_final_tuning_publishes_tuned_json(
    tmp_path,
    tiny_target_dir,
    data_dir,
    prompts,
    hub,
    hub_cache,  # noqa: F811
):
    """``hub.repo_id=... final_eval.tune=true``: the pushed repo holds the folder's tuned
    settings and measured figures (docs/eval.md: tuned.json is published with the drafter)."""
    extra = ["final_eval.limit=2", "final_eval.tune=true", f"final_eval.prompts={prompts}",
             "final_eval.max_new_tokens=8", "hub.repo_id=someone/trained"]  # fmt: skip
    assert entry.main(train_argv("dflash", tiny_target_dir, data_dir, tmp_path / "d", *extra)) == 0
    folder = tmp_path / "d" / "drafter"
    assert (folder / TUNED_NAME).is_file() and (folder / "eval.json").is_file()
    pushed = hub.files("someone/trained")
    assert pushed.get(TUNED_NAME) == (folder / TUNED_NAME).read_bytes()
    assert pushed.get("eval.json") == (folder / "eval.json").read_bytes()
