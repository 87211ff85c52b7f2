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


def test_drafter_loads_target_then_reports_unimplemented(tiny_target_dir, capsys):
    code = drafter_entry.main(["recipe=d2sd", f"target={tiny_target_dir}", "train.device=cpu"])
    out, err = capsys.readouterr()
    assert code == 3
    assert "LlamaForCausalLM" in out and "outputs -> runs/d2sd" in out
    assert "drafter type 'd2sd', which is not implemented yet" in err


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
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "not implemented yet" in proc.stderr, proc.stderr[-2000:]
    assert "LlamaForCausalLM" in proc.stdout
    assert not (tmp_path / "outputs").exists()  # no surprise Hydra output directory
