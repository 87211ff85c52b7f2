"""Prompt lookup (training-free): propose what followed the latest earlier occurrence of the last n tokens."""

from __future__ import annotations

from infer.tree import DraftTree


class PromptLookup:
    """Prompt-lookup decoding (training-free): find the latest earlier occurrence of the last
    n tokens (n from ``max_ngram`` down to ``min_ngram``) and propose what followed it."""

    def __init__(self, num_draft: int = 8, max_ngram: int = 3, min_ngram: int = 1):
        self.num_draft, self.max_ngram, self.min_ngram = num_draft, max_ngram, min_ngram

    def candidates(self, context: list[int], width: int) -> list[list[int]]:
        found: list[list[int]] = []
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            pattern = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == pattern:
                    follow = context[start + n : start + n + self.num_draft]
                    if follow and follow not in found:
                        found.append(follow)
                        if len(found) == width:
                            return found
            if found:
                return found
        return found

    def propose(self, context: list[int]) -> DraftTree:
        found = self.candidates(context, 1)
        return DraftTree.chain(found[0]) if found else DraftTree.empty()
