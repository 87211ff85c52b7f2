"""Build the bundled prompt sets for the embedded default target from the Python stdlib.

``python -m data.make_prompts`` writes two JSONL files under ``data/prompt_sets/``:

* ``stdlib-distill.jsonl.xz``: every usable prompt cut from *training* modules (about 30,000),
  for regenerating drafter training data with the target. Ordered so that any prefix
  (``prompts.limit``) is a seeded uniform sample balanced over the categories while they last:
  a round-robin over the categories, each shuffled.
* ``stdlib-eval.jsonl``: prompts cut from *held-out* modules (the same whole-module split as the
  pretraining corpus), for acceptance-rate and speed evaluation.
* ``stdlib-long.jsonl``: whole held-out modules from their first line, cut at a line boundary
  before ``LONG_CHARS`` (thousands of tokens), category ``long_module``: long-context drafting
  (``benchmarks/long_context.py`` cuts them to the context lengths it measures).

Prompts are found with ``ast`` and are exact slices of the source (indentation preserved, each
ending with a newline). Four categories:

* ``function_body``: up to 30 preceding lines, the ``def`` header and its docstring; the model
  continues with the body.
* ``class_body``: the same for a ``class``.
* ``docstring_to_code``: only the header and docstring of a documented function (for top-level
  functions, preceded by the module's import lines); the model writes the body.
* ``continuation``: 20-40 lines ending at a statement boundary inside a file.

The output depends only on the interpreter's stdlib and the fixed seed.
"""

from __future__ import annotations

import ast
import io
import json
import lzma
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

from data.corpus import SourceFile, split_files, stdlib_files
from recipes.schema import CorpusConfig

OUT_DIR = Path(__file__).resolve().parent / "prompt_sets"
CATEGORIES = ("function_body", "class_body", "docstring_to_code", "continuation")
SEED = 0
EVAL_PER_CATEGORY = 60
CONTEXT_LINES = 30  # lines of preceding context for function_body / class_body
CONTINUATION_LINES = (20, 40)
CONTINUATIONS_PER_FILE = 4  # stdlib-eval
DISTILL_CONTINUATIONS_PER_FILE = 16  # stdlib-distill: as many as the pool of the other kinds
MAX_CHARS = 2000
MAX_IMPORT_CHARS = 600  # docstring_to_code: drop the import block when it is longer than this
LONG_CHARS = (5_000, 16_000)  # stdlib-long: modules of at least 5k chars, cut before 16k
LONG_PROMPTS = 30

Row = dict[str, str]


def _lines(text: str) -> list[str]:
    """Source lines with their endings, split exactly as the tokenizer in ``ast`` counts them."""
    return io.StringIO(text, newline="").readlines()


def _start(node: ast.stmt) -> int:
    """1-based first line of a statement, counting decorators of a def or class."""
    decorators = getattr(node, "decorator_list", None) or []
    return min([node.lineno] + [d.lineno for d in decorators])


def _docstring(node: ast.AST) -> ast.Expr | None:
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return first
    return None


def _body_start(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> int | None:
    """1-based line where the body code begins (after any docstring), or None if there is none
    or it shares a line with the header or docstring."""
    doc = _docstring(node)
    rest = node.body[1:] if doc else node.body
    if not rest:
        return None
    line = _start(rest[0])
    last_header_line = doc.end_lineno if doc else node.lineno
    return line if line > last_header_line else None


def _row(category: str, module: str, lineno: int, text: str) -> Row | None:
    if len(text) > MAX_CHARS or text.count("\n") < 2 or not text.endswith("\n"):
        return None
    return {
        "id": f"{category}/{module}:{lineno}",
        "category": category,
        "module": module,
        "prompt": text,
    }


def _import_block(tree: ast.Module, lines: list[str]) -> str:
    """The module's top-level import lines, or "" when they are too long to prepend."""
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    numbers = sorted({i for n in imports for i in range(n.lineno - 1, n.end_lineno)})
    block = "".join(lines[i] for i in numbers)
    return block if len(block) <= MAX_IMPORT_CHARS else ""


def _definitions(source: SourceFile, tree: ast.Module, lines: list[str]) -> Iterator[Row | None]:
    imports = _import_block(tree, lines)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        body = _body_start(node)
        if body is None:
            continue
        first = _start(node)
        is_class = isinstance(node, ast.ClassDef)
        context = "".join(lines[max(0, first - 1 - CONTEXT_LINES) : body - 1])
        category = "class_body" if is_class else "function_body"
        yield _row(category, source.module, node.lineno, context)
        if not is_class and _docstring(node) is not None:
            header = "".join(lines[first - 1 : body - 1])
            prefix = imports + "\n" if imports and node.col_offset == 0 else ""
            yield _row("docstring_to_code", source.module, node.lineno, prefix + header)


def _continuations(
    source: SourceFile, tree: ast.Module, lines: list[str], per_file: int
) -> Iterator[Row | None]:
    rng = random.Random(f"{SEED}:{source.module}")  # per file: other files do not shift the cuts
    boundaries = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt):
            line = _start(node)
            # Only a statement that opens its line: not the second half of ``a; b``.
            if line > CONTINUATION_LINES[0] and not lines[line - 1][: node.col_offset].strip():
                boundaries.add(line)
    for cut in rng.sample(sorted(boundaries), min(per_file, len(boundaries))):
        n = rng.randint(*CONTINUATION_LINES)
        yield _row(
            "continuation", source.module, cut, "".join(lines[max(0, cut - 1 - n) : cut - 1])
        )


def candidates(
    files: list[SourceFile], continuations_per_file: int = CONTINUATIONS_PER_FILE
) -> dict[str, list[Row]]:
    """Every usable prompt of each category in ``files``, keyed by category, sorted by id."""
    pools: dict[str, dict[str, Row]] = {c: {} for c in CATEGORIES}
    for source in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(source.text)
        except SyntaxError:
            continue
        lines = _lines(source.text)
        continuations = _continuations(source, tree, lines, continuations_per_file)
        for row in [*_definitions(source, tree, lines), *continuations]:
            if row is not None:
                pools[row["category"]].setdefault(row["id"], row)
    return {c: [pool[k] for k in sorted(pool)] for c, pool in pools.items()}


def sample(
    pools: dict[str, list[Row]], per_category: int, rng: random.Random, name: str
) -> list[Row]:
    """``per_category`` rows of each category (all of them, with a warning, when fewer exist)."""
    rows = []
    for category in CATEGORIES:
        pool = pools[category]
        if len(pool) < per_category:
            print(f"warning: {name}: only {len(pool)} '{category}' prompts (wanted {per_category})")
        rows.extend(rng.sample(pool, min(per_category, len(pool))))
    return sorted(rows, key=lambda r: r["id"])


def interleave(
    pools: dict[str, list[Row]], rng: random.Random, categories: tuple[str, ...] = CATEGORIES
) -> list[Row]:
    """Every row of every pool, each pool shuffled, taken round-robin over ``categories``: any
    prefix is a uniform sample with the categories balanced until the smallest pool runs out."""
    shuffled = {c: rng.sample(pools[c], len(pools[c])) for c in categories}
    longest = max(len(rows) for rows in shuffled.values())
    return [shuffled[c][i] for i in range(longest) for c in categories if i < len(shuffled[c])]


def long_modules(files: list[SourceFile], n: int, rng: random.Random) -> list[Row]:
    """``n`` modules of at least ``LONG_CHARS[0]`` characters, each from its first line and cut
    at the last line boundary before ``LONG_CHARS[1]``."""
    rows = []
    for source in sorted(files, key=lambda f: f.module):
        if len(source.text) < LONG_CHARS[0]:
            continue
        text = source.text[: LONG_CHARS[1]]
        text = text[: text.rindex("\n") + 1]
        rows.append({"id": f"long_module/{source.module}:1", "category": "long_module",
                     "module": source.module, "prompt": text})  # fmt: skip
    if len(rows) < n:
        print(f"warning: stdlib-long: only {len(rows)} long modules (wanted {n})")
    return sorted(rng.sample(rows, min(n, len(rows))), key=lambda r: r["id"])


def write_jsonl(rows: list[Row], path: Path) -> None:
    """JSON lines; xz-compressed for ``.xz`` (its whole-file dictionary finds the overlapping
    contexts of one module across the shuffled order: 32 MB -> 2 MB, where gzip gives 9)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".xz":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        path.write_bytes(lzma.compress(text.encode(), preset=9 | lzma.PRESET_EXTREME))
        return
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_sets(
    sets: dict[str, list[Row]], categories: tuple[str, ...], suffix: str = ".jsonl"
) -> None:
    """Write each named set to ``prompt_sets/<name><suffix>`` and print its size and counts."""
    for name, rows in sets.items():
        path = OUT_DIR / f"{name}{suffix}"
        write_jsonl(rows, path)
        counts = {c: sum(r["category"] == c for r in rows) for c in categories}
        print(f"{path}: {len(rows)} prompts, {path.stat().st_size / 1e6:.2f} MB, {counts}")


def main() -> None:
    train, heldout = split_files(stdlib_files(), CorpusConfig().heldout_fraction)
    distill = interleave(candidates(train, DISTILL_CONTINUATIONS_PER_FILE), random.Random(SEED))
    write_sets({"stdlib-distill": distill}, CATEGORIES, ".jsonl.xz")
    evaluation = sample(candidates(heldout), EVAL_PER_CATEGORY, random.Random(SEED), "stdlib-eval")
    write_sets({"stdlib-eval": evaluation}, CATEGORIES)
    write_sets({"stdlib-long": long_modules(heldout, LONG_PROMPTS, random.Random(SEED))},
               ("long_module",))  # fmt: skip


if __name__ == "__main__":
    main()
