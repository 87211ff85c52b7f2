"""The GGUF writer the tests build GGUF targets with (``models.gguf.write_gguf``), and a chat
template for them, so the GGUF loading path is tested without a download."""

from __future__ import annotations

from pathlib import Path

from models.gguf import write_gguf as _write

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_gguf(model, tokenizer, path: Path | str, chat_template: str = CHAT_TEMPLATE) -> Path:
    return _write(model, tokenizer, path, chat_template)
