"""Prompt sets: the bundled stdlib sets, local files, ``save_to_disk`` folders and Hub datasets.

``load_prompts`` turns any of them into a list of ``Prompt`` rows with a uniform shape; it keeps
every row (empty prompts included, so later stages can count them as drops). ``render_prompt``
turns one into the string the target is fed: through the tokenizer's chat template when it has
one, as plain text otherwise (the embedded target is a plain code LM).
"""

from __future__ import annotations

import csv
import json
import lzma
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PROMPTS_DIR = Path(__file__).resolve().parent / "prompt_sets"
BUNDLED: dict[str, Path] = {
    "stdlib-distill": _PROMPTS_DIR / "stdlib-distill.jsonl.xz",  # 31k prompts, 2 MB in xz
    "stdlib-eval": _PROMPTS_DIR / "stdlib-eval.jsonl",
    "stdlib-long": _PROMPTS_DIR / "stdlib-long.jsonl",  # whole held-out modules: long contexts
    "chat-distill": _PROMPTS_DIR / "chat-distill.jsonl.xz",  # instruct targets (make_chat_prompts)
    "chat-eval": _PROMPTS_DIR / "chat-eval.jsonl",
}
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_CATEGORY = "default"


@dataclass(frozen=True)
class Prompt:
    """One prompt.

    Attributes:
        id: Unique name of the row (the source's id column, or ``"{source}:{row_index}"``).
        text: The user prompt (for chat rows, the content of the last user message).
        category: The source's category column, or ``"default"``.
        messages: The full chat conversation when the source holds chat messages, else None.
        missing: True when the row had no value in the prompt column (``text`` is then "").
    """

    id: str
    text: str
    category: str
    messages: tuple[dict, ...] | None = None
    missing: bool = False


def _unknown_set(source: str) -> ValueError:
    return ValueError(
        f"unknown prompt set '{source}'; bundled sets: {', '.join(sorted(BUNDLED))}; "
        "or give a local file or a datasets Hub id (owner/name)"
    )


def check_source(source: str) -> None:
    """Refuse, without loading anything, a source that cannot be read: a local file that does not
    exist, an unsupported file type, or an unknown bundled-set name. (A Hub id is only known to
    be reachable when it is loaded.)"""
    path = Path(source).expanduser()
    if path.is_file():
        _file_builder(path)
    if source in BUNDLED or path.exists():
        return
    if path.suffix.lower() in _FILE_BUILDERS or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"prompt file '{source}' does not exist")
    if "/" not in source:
        raise _unknown_set(source)


def _file_builder(path: Path) -> str:
    """The ``datasets`` builder that reads a prompt file of this type."""
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"cannot read prompts from '{path}': use one of {', '.join(_FILE_BUILDERS)}"
        )
    return builder


def check_file(path: Path) -> None:
    """Refuse, naming the line, a prompt file that ``datasets`` would choke on with a traceback:
    an empty file, a line of a JSON-lines file that is not a JSON object, a malformed CSV row."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file '{path}' is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from exc  # fmt: skip
    if not text.strip():
        raise ValueError(f"prompt file '{path}' is empty: it needs one prompt per line or row")
    if suffix == ".csv":
        _check_csv(path, text)
        return
    if suffix == ".json":
        try:
            json.loads(text)
            return  # one JSON document (a list of rows); otherwise JSON lines
        except json.JSONDecodeError:
            pass
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"prompt file '{path}' line {number} is not valid JSON ({exc.msg}, column "
                f"{exc.colno}): {line.strip()[:60]!r}"
            ) from exc
        if not isinstance(value, dict):
            raise ValueError(
                f"prompt file '{path}' line {number} holds a JSON {type(value).__name__}; each "
                'line must be an object such as {"prompt": "..."}'
            )


def _check_csv(path: Path, text: str) -> None:
    rows = csv.reader(text.splitlines(keepends=True), strict=True)
    try:
        header = next(rows)
        for row in rows:
            if row and len(row) != len(header):
                raise ValueError(
                    f"prompt file '{path}' line {rows.line_num} has {len(row)} fields, but the "
                    f"header has {len(header)} ({', '.join(header)})"
                )
    except csv.Error as exc:
        raise ValueError(
            f"prompt file '{path}' line {rows.line_num} is not valid CSV: {exc}"
        ) from exc


def _load_rows(source: str, split: str) -> tuple[Sequence[Mapping[str, Any]], list[str]]:
    """Rows (any sequence of mappings) and column names of ``source``."""
    if source in BUNDLED:
        path = BUNDLED[source]
        opener = lzma.open if path.suffix == ".xz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return rows, list(dict.fromkeys(key for row in rows for key in row))

    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"split '{split}' not in {source}; splits: {', '.join(data)}")
            data = data[split]
    elif path.is_file():
        builder = _file_builder(path)
        check_file(path)
        try:
            data = datasets.load_dataset(builder, data_files=str(path), split="train")
        except datasets.exceptions.DatasetGenerationError as exc:  # e.g. mixed column types
            reason = " ".join(str(exc.__cause__ or exc).split())[:300]
            raise ValueError(f"prompt file '{path}' could not be read: {reason}") from exc
    else:
        check_source(source)
        try:
            data = datasets.load_dataset(source, split=split)
        except (OSError, ConnectionError, ValueError) as exc:  # offline, unknown id, bad split
            reason = " ".join(str(exc).split())[:300]
            raise ValueError(
                f"prompt set '{source}' could not be loaded with datasets.load_dataset: this "
                "machine may be offline or the dataset id or split may not exist. Save it where "
                "there is a network (`datasets.load_dataset(...).save_to_disk(DIR)` or a .jsonl "
                f"file) and pass prompts.source=DIR instead. [{reason}]"
            ) from exc
    return data, list(data.column_names)


def _content_text(content: Any) -> str:
    """Text of a message's content: a string, or a list of typed parts (``{"text": ...}``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if isinstance(part, Mapping))


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in value
    )


def _to_prompt(value: Any, prompt_id: str, category: str) -> Prompt:
    if value is None:
        return Prompt(prompt_id, "", category, missing=True)
    if isinstance(value, (list, tuple)) and not value:
        return Prompt(prompt_id, "", category)
    if isinstance(value, str):
        return Prompt(prompt_id, value, category)
    if _is_chat(value):
        messages = [dict(m) for m in value]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        if last_user < 0:
            return Prompt(prompt_id, "", category, tuple(messages))
        # The target regenerates the reply, so replies after the last user turn are dropped.
        kept = tuple(messages[: last_user + 1])
        return Prompt(prompt_id, _content_text(kept[-1]["content"]), category, kept)
    raise ValueError(
        f"prompt '{prompt_id}' holds {type(value).__name__} {str(value)[:40]!r}: a prompt is a "
        "string or a list of chat messages ({'role': ..., 'content': ...})"
    )


def load_prompts(
    source: str,
    split: str = "train",
    prompt_column: str = "prompt",
    category_column: str = "category",
    id_column: str = "id",
    limit: int = 0,
) -> list[Prompt]:
    """Load a prompt set.

    Args:
        source: A bundled set name (see ``BUNDLED``), a local ``.jsonl``/``.json``/``.csv``/
            ``.parquet`` file, a directory written by ``datasets.Dataset.save_to_disk``, or a
            ``datasets`` Hub id (``owner/name``).
        split: Split of a Hub dataset or of a saved ``DatasetDict``; ignored for files.
        prompt_column: Column holding the prompt: a string, or a list of chat messages
            (``{"role": ..., "content": ...}``), kept as ``Prompt.messages``.
        category_column: Column holding the category; rows get ``"default"`` when it is absent.
        id_column: Column holding a row id; ``"{source}:{row_index}"`` when it is absent.
        limit: Keep only the first ``limit`` rows; 0 keeps all.

    Returns:
        One ``Prompt`` per row, in the source's order. Nothing is filtered out.

    Raises:
        ValueError: On an unknown bundled-looking name, an unsupported file type, a missing
            split, a missing prompt column, no rows, a malformed line (named by its number) or a
            prompt that is neither a string nor chat messages.
        FileNotFoundError: When ``source`` names a local file that does not exist.
    """
    rows, columns = _load_rows(source, split)
    if not len(rows):
        raise ValueError(f"prompt set '{source}' has no rows")
    if prompt_column not in columns:
        raise ValueError(
            f"prompt column '{prompt_column}' not found in {source}; "
            f"available columns: {', '.join(columns)}"
        )
    if limit > 0 and len(rows) > limit:
        rows = rows.select(range(limit)) if hasattr(rows, "select") else rows[:limit]
    prompts = []
    for index, row in enumerate(rows):
        prompt_id = row.get(id_column) if id_column in columns else None
        category = row.get(category_column) if category_column in columns else None
        prompts.append(
            _to_prompt(
                row.get(prompt_column),
                f"{source}:{index}" if prompt_id is None else str(prompt_id),
                DEFAULT_CATEGORY if category is None else str(category),
            )
        )
    return prompts


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The string fed to the target for ``prompt``.

    Args:
        tokenizer: The target's tokenizer.
        prompt: The prompt to render.

    Returns:
        ``tokenizer.apply_chat_template`` of the prompt's messages (or of a single user turn
        holding its text), with the generation prompt appended, when the tokenizer has a chat
        template; the plain prompt text otherwise.
    """
    if not getattr(tokenizer, "chat_template", None):
        return prompt.text
    messages = (
        list(prompt.messages) if prompt.messages else [{"role": "user", "content": prompt.text}]
    )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The token ids fed to the target for ``prompt`` (``render_prompt``, no added specials)."""
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def category_counts(prompts: Iterable[Prompt]) -> dict[str, int]:
    """Number of prompts per category, sorted by category name.

    Args:
        prompts: Any iterable of prompts.

    Returns:
        ``{category: count}``.
    """
    return dict(sorted(Counter(p.category for p in prompts).items()))
