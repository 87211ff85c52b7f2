"""What every command-line entry point shares: one ``error:`` line for bad input, and a closing
summary of what a long command wrote and where.

    @command
    def main(argv: list[str]) -> int: ...

A bad value, a missing file, an unreachable model or a drafter folder of another format ends the
command with ``error: <what is wrong and what is valid>`` on stderr and exit status 2, without a
Python traceback; ``DRAFTKIT_DEBUG=1`` lets the exception through with its traceback. Errors that
no user input can cause (bugs) always keep their traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from recipes import ConfigError

DEBUG_ENV = "DRAFTKIT_DEBUG"
# what a user's input can raise: config errors, refused values and files that are not there
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError)


def command(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """Wrap an entry point's ``main(argv) -> exit status`` (see the module docstring)."""

    @functools.wraps(main)
    def run(argv: list[str]) -> int:
        try:
            return main(argv)
        except USER_ERRORS as exc:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"error: {message}", file=sys.stderr)
            return 2

    return run


def check_folder(path: str | Path, key: str) -> None:
    """Refuse, writing nothing, an output folder that cannot be made or written: ``path`` is a
    file, lies under a file, or its nearest existing folder is not writable by this user."""
    folder = Path(path).expanduser().absolute()
    try:
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{key}={path} is a file, not a folder; give a folder path")
        existing = folder
        while not existing.exists():
            existing = existing.parent
    except PermissionError as exc:
        raise ConfigError(f"{key}={path}: this user may not look inside {exc.filename}") from exc
    if not existing.is_dir():
        raise ConfigError(
            f"{key}={path}: {existing} is a file, so no folder can be made under it; give a "
            "folder path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}={path}: {existing} is not writable by this user; give a writable folder"
        )


def summary(title: str, wrote: dict[str, Path | str], details: str = "") -> str:
    """Print (and return) the closing lines of a long command: what it did, what it wrote where."""
    width = max((len(k) for k in wrote), default=0)
    lines = [title, *(f"  {label.ljust(width)}  {path}" for label, path in wrote.items())]
    lines += [details] if details else []
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def apply_threads(threads: int) -> int:
    """Set torch's intra-op threads (CPU) and return them: ``threads`` when set, else the cores
    this process may use shared among this machine's processes (``LOCAL_WORLD_SIZE``), whatever
    ``OMP_NUM_THREADS`` says: ``accelerate launch`` sets it to 1 when it is unset, which left
    half of a 2-core CPU idle in every launched run."""
    import torch

    if not threads:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, len(os.sched_getaffinity(0)) // max(local, 1))
    torch.set_num_threads(threads)
    return threads
