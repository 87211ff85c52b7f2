"""The fixed user commands parse their config and load the target before anything else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import train.drafter as drafter_entry

REPO = Path(__file__).resolve().parents[1]


def test_drafter_help_lists_recipes(capsys):
    assert drafter_entry.main(["--help"]) == 0
    assert "d2sd" in capsys.readouterr().out


def test_drafter_bad_key_fails_before_loading_target(monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("the target must not be loaded for an invalid config")

    monkeypatch.setattr(drafter_entry, "load_target", forbidden)
    assert drafter_entry.main(["recipe=d2sd", "train.lrr=1"]) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launch_command(tiny_target_dir, tmp_path):
    """The README command itself, through `accelerate launch`, from another directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(REPO / "train" / "drafter.py"),
            "recipe=d2sd",
            f"target={tiny_target_dir}",
            "drafter.type=future_family",  # stops in pre-flight: the launch path only
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # pre-flight read the target's config and built the drafter family against it
    assert "drafter.type=future_family: unknown drafter type" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()  # no surprise Hydra output directory


def _run(args: list[str], cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("DRAFTKIT_DEBUG", None)
    if debug:
        env["DRAFTKIT_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and exactly one ``error:`` line on stderr holding every needle."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert all(needle in errors[0] for needle in needles), errors[0]
    return errors[0]


def _old_format_drafter(tmp_path: Path) -> Path:
    folder = tmp_path / "old-drafter"
    folder.mkdir()
    (folder / "config.json").write_text('{"drafter_type": "draft_lm", "target": {}, "drafter": {}}')
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_bad_inputs_end_in_one_error_line(tmp_path, tiny_target_dir):
    """Each bad input a user can type, through the real entry points: one `error:` line naming
    what is wrong and what to do, exit status 2, no Python traceback."""
    drafter = [str(REPO / "train" / "drafter.py"), "recipe=draft_lm", f"output_dir={tmp_path}/r"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "def f():"}\n')
    cases = [
        (drafter + ["train.batch_size=0"], ["train.batch_size=0", "[1, inf)"]),
        (drafter + ["target=nobody/no-such-model"], ["nobody/no-such-model", "offline", "local"]),
        (drafter + [f"prompts.source={tmp_path}/missing.jsonl"], ["missing.jsonl", "not exist"]),
        (
            drafter + [f"target={tiny_target_dir}", f"prompts.source={prompts}"],
            ["prompt column 'prompt' not found", "available columns: text"],
        ),
        (["-m", "data.distill", "recipe=draft_lm", "prompts.source=nobody/no-set"],
         ["nobody/no-set", "offline", "prompts.source=DIR"]),
        (["-m", "infer.eval", str(_old_format_drafter(tmp_path))],
         ["old-drafter", "no format version", "reads format version"]),
        (["-m", "infer.eval", "prompt-lookup", "limt=3"], ["Did you mean 'limit'"]),
        (["-m", "infer.eval", "nobody/no-drafter"], ["nobody/no-drafter", "offline"]),
    ]  # fmt: skip
    for args, needles in cases:
        _one_error_line(_run(args, tmp_path), *needles)


def test_debug_shows_the_traceback(tmp_path):
    proc = _run(["-m", "infer.eval", "prompt-lookup", "top_p=2"], tmp_path, debug=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "top_p=2.0: out of range" in proc.stderr
