"""The offline pretraining corpus: the running interpreter's Python standard library.

Files are split into train and held-out by *whole module* (one ``.py`` file is never cut across
the split), chosen by a hash of the module name so the split is stable across runs.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# Test suites, generated tables and bundled data are not representative code.
_SKIP_PARTS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "pydoc_data",
    "__pycache__",
    "lib2to3",
    "ensurepip",
    "turtledemo",
}
_MAX_FILE_BYTES = 300_000


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # posix path relative to the stdlib root, e.g. "email/parser.py"
    text: str

    @property
    def module(self) -> str:
        """Dotted module name (``email.parser``): the unit of the train/held-out split."""
        return self.relpath.removesuffix(".py").replace("/", ".")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[SourceFile]:
    """Every usable ``.py`` file under the stdlib root, sorted by relative path."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_PARTS.intersection(rel.parts[:-1]) or path.stat().st_size > _MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            files.append(SourceFile(rel.as_posix(), text))
    return files


def is_heldout(module: str, heldout_fraction: float) -> bool:
    bucket = int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < heldout_fraction * 10_000


def split_files(
    files: list[SourceFile], heldout_fraction: float
) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, held-out), by whole top-level module."""
    train = [f for f in files if not is_heldout(f.module, heldout_fraction)]
    heldout = [f for f in files if is_heldout(f.module, heldout_fraction)]
    return train, heldout


def corpus_hash(files: list[SourceFile]) -> str:
    """sha256 over every (relative path, content hash): names the exact corpus a model saw."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relpath.encode() + b"\0" + hashlib.sha256(f.text.encode()).digest())
    return digest.hexdigest()


def load_corpus(source: str) -> list[SourceFile]:
    """``stdlib`` or a local directory of ``.py``/``.txt`` files."""
    if source == "stdlib":
        return stdlib_files()
    root = Path(source)
    if not root.is_dir():
        raise ValueError(f"corpus.source '{source}' is neither 'stdlib' nor a local directory")
    files = [
        SourceFile(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8"))
        for p in sorted(root.rglob("*"))
        if p.suffix in {".py", ".txt"} and p.is_file()
    ]
    if not files:
        raise ValueError(f"corpus directory '{source}' holds no .py or .txt files")
    return files


def token_windows(files: list[SourceFile], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize files, join them with EOS, and cut the stream into ``(N, seq_len)`` windows."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for f in files:
        stream.extend(tokenizer(f.text, add_special_tokens=False)["input_ids"])
        stream.append(eos)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def shuffled_batches(
    windows: torch.Tensor, batch_size: int, seed: int, start_batch: int = 0
) -> Iterator[torch.Tensor]:
    """Endless seeded epochs of ``(batch_size, seq_len)`` batches; ``start_batch`` resumes."""
    per_epoch = len(windows) // batch_size
    epoch, index = divmod(start_batch, per_epoch)
    while True:
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(index, per_epoch):
            yield windows[order[i * batch_size : (i + 1) * batch_size]]
        epoch, index = epoch + 1, 0
