"""Build the bundled chat prompt sets for instruct targets (e.g. ``smollm2-135m-instruct``).

``python -m data.make_chat_prompts`` writes ``data/prompt_sets/chat-distill.jsonl.xz`` (every
prompt of the corpus's *training* modules and the first half of each topic list, in a seeded
round-robin over the categories like ``stdlib-distill``: any prefix is balanced while the
categories last; ``general`` has few) and ``chat-eval.jsonl`` (held-out modules, the other half,
30 a category), offline and reproducibly (the stdlib and a fixed seed).
Every prompt is one user turn; ``render_prompt`` applies the target's chat template. Categories:

* ``write_function``: implement a held-out function from its signature and docstring;
* ``explain_code``: explain a short function's source, step by step;
* ``summarize_docs``: summarise a module or class from the first paragraph of its docstring;
* ``general``: general instructions from fixed templates and topic lists (concepts to explain,
  tasks to give tips on, trade-offs to weigh, short messages to write).
"""

from __future__ import annotations

import ast
import random
import warnings

from data.corpus import SourceFile, split_files, stdlib_files
from data.make_prompts import _docstring, _lines, _start, interleave, write_sets
from recipes.schema import CorpusConfig

CATEGORIES = ("write_function", "explain_code", "summarize_docs", "general")
SEED = 0
EVAL_PER_CATEGORY = 30
MAX_CODE_LINES = 25
MAX_CHARS = 1500

CONCEPTS = [
    "recursion", "a hash table", "big-O notation", "a closure", "garbage collection",
    "a race condition", "unit testing", "version control", "an API", "a linked list",
    "binary search", "caching", "a deadlock", "regular expressions", "floating-point rounding",
    "a virtual environment", "dependency injection", "a database index", "encryption",
    "compression", "a compiler", "an interpreter", "a stack trace", "immutability",
    "a generator", "type hints", "memoization", "a REST endpoint", "event loops", "a mutex",
]  # fmt: skip
TASKS = [
    "writing readable code", "debugging a crash", "reviewing a pull request",
    "naming variables", "learning a new language", "writing documentation",
    "speeding up a slow script", "organising a small project", "writing good commit messages",
    "testing edge cases", "reading other people's code", "estimating a task",
    "preparing for a technical interview", "keeping functions short", "handling errors",
    "logging in production", "working from home", "giving a short talk", "taking notes",
    "planning a week", "learning to cook", "saving money", "sleeping better", "running a meeting",
]  # fmt: skip
TRADEOFFS = [
    ("lists", "tuples"), ("threads", "processes"), ("SQL", "NoSQL databases"),
    ("static typing", "dynamic typing"), ("tabs", "spaces"), ("a monolith", "microservices"),
    ("recursion", "iteration"), ("JSON", "CSV"), ("inheritance", "composition"),
    ("a library", "writing it yourself"), ("compiled", "interpreted languages"),
    ("mocks", "real services in tests"), ("exceptions", "return codes"),
    ("a laptop", "a desktop"), ("trains", "planes for a 500 km trip"), ("email", "chat"),
]  # fmt: skip
MESSAGES = [
    "asking a colleague to review a change", "announcing a release", "declining a meeting",
    "thanking a team for their help", "reporting a bug to a maintainer", "asking for a deadline "
    "extension", "welcoming a new team member", "summarising a project's status",
    "inviting friends to dinner", "apologising for a late reply",
]  # fmt: skip
GENERAL = [
    ("Explain {} to a beginner programmer in a short paragraph.", CONCEPTS),
    ("Give three practical tips for {}.", TASKS),
    ("What are the pros and cons of {} versus {}?", TRADEOFFS),
    ("Write a short, friendly message {}.", MESSAGES),
]


def _row(category: str, key: str, text: str) -> dict | None:
    if len(text) > MAX_CHARS:
        return None
    return {"id": f"{category}/{key}", "category": category, "prompt": text}


def _code_rows(source: SourceFile) -> list[dict]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source.text)
    except SyntaxError:
        return []
    lines, rows = _lines(source.text), []
    for node in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]:
        doc = ast.get_docstring(node)
        if not doc or len(doc.split("\n\n")[0]) < 60:
            continue
        summary = " ".join(doc.split("\n\n")[0].split())
        what = (f"module `{source.module}`" if node is tree
                else f"class `{node.name}` (module `{source.module}`)")  # fmt: skip
        rows.append(_row("summarize_docs", f"{source.module}:{getattr(node, 'lineno', 0)}",
                         f"Here is the documentation of the Python {what}:\n\n{summary}\n\n"
                         "Summarise in two sentences what it is for and when you would use it."))  # fmt: skip
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first, last = _start(node), node.end_lineno
        code = "".join(lines[first - 1 : last])
        key = f"{source.module}:{node.lineno}"
        dedented = _dedent(code)
        docstring = _docstring(node)
        if docstring is not None and len(node.body) > 1:
            header = _dedent("".join(lines[first - 1 : docstring.end_lineno]))
            rows.append(_row("write_function", key,
                             "Implement this Python function (signature and docstring given):"
                             f"\n\n```python\n{header}```"))  # fmt: skip
        if 4 <= last - first + 1 <= MAX_CODE_LINES:
            rows.append(_row("explain_code", key,
                             "Explain what this Python function does, step by step:\n\n"
                             f"```python\n{dedented}```"))  # fmt: skip
    return [r for r in rows if r is not None]


def _dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text)


def _general(half: int) -> list[dict]:
    """Every templated general prompt of one half (0: even items, distill; 1: odd, eval)."""
    rows = []
    for t, (template, items) in enumerate(GENERAL):
        for i, item in enumerate(items):
            if i % 2 == half:
                text = template.format(*item) if isinstance(item, tuple) else template.format(item)
                rows.append({"id": f"general/{t}.{i}", "category": "general", "prompt": text})
    return rows


def candidates(files: list[SourceFile], half: int) -> dict[str, list[dict]]:
    """Every prompt of each category, keyed by category, sorted by id."""
    pools: dict[str, dict[str, dict]] = {c: {} for c in CATEGORIES}
    for source in files:
        for row in _code_rows(source):
            pools[row["category"]].setdefault(row["id"], row)
    for row in _general(half):
        pools["general"][row["id"]] = row
    return {c: [pool[k] for k in sorted(pool)] for c, pool in pools.items()}


def build(files: list[SourceFile], half: int, per_category: int, rng: random.Random) -> list:
    pools = candidates(files, half)
    rows = []
    for category in CATEGORIES:
        pool = pools[category]
        if len(pool) < per_category:
            print(f"note: only {len(pool)} '{category}' prompts (wanted {per_category})")
        rows.extend(rng.sample(pool, min(per_category, len(pool))))
    return sorted(rows, key=lambda r: r["id"])


def main() -> None:
    train, heldout = split_files(stdlib_files(), CorpusConfig().heldout_fraction)
    distill = interleave(candidates(train, 0), random.Random(SEED), CATEGORIES)
    write_sets({"chat-distill": distill}, CATEGORIES, ".jsonl.xz")
    write_sets({"chat-eval": build(heldout, 1, EVAL_PER_CATEGORY, random.Random(SEED))}, CATEGORIES)


if __name__ == "__main__":
    main()
