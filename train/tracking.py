"""Weights & Biases logging (optional): ``wandb.mode=offline|online wandb.project=NAME``.

Online falls back to offline when the wandb server cannot be reached; an offline run can be
uploaded later with ``wandb sync``. The API key comes only from the environment
(``WANDB_API_KEY``) or ``wandb login``; configs carrying secrets are refused by the loader.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from recipes.schema import WandbConfig


def _reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def start_wandb(
    cfg: WandbConfig, run_name: str, run_config: dict, out_dir: Path
) -> tuple[Callable[[dict], None] | None, Callable[[], None]]:
    """Start a run on process 0; returns (log function or None, finish function)."""
    mode = cfg.mode.value
    if mode == "disabled":
        return None, lambda: None
    if mode == "online" and not _reachable():
        print("wandb: server unreachable, logging offline (upload later with `wandb sync`)")
        mode = "offline"
    import wandb

    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.project or "draftkit",
        name=run_name,
        mode=mode,
        config=run_config,
        dir=str(out_dir),
        settings=wandb.Settings(
            console="off", x_disable_stats=True, disable_git=True, save_code=False
        ),
    )
    return (lambda record: run.log(record, step=record["step"])), run.finish
