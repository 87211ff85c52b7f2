"""Lossless acceptance of a verified candidate tree.

- Greedy (temperature 0): walk down from the root while a child's token equals the target's
  argmax; the target's argmax at the first miss is the bonus token. The output is exactly plain
  greedy decoding's.
- Sampling: at each node, the target distribution p (after temperature / top-k / top-p) is
  compared with the children:
  * children with draft probabilities (sampled i.i.d. from q): recursive rejection sampling
    (SpecInfer; Leviathan et al. for a chain): accept child x with probability
    min(1, p(x)/q(x)); on rejection p <- normalise(max(p - q, 0)) and try the next child;
  * deterministic children (no draft probabilities): draw x ~ p and accept the child whose token
    is x, if any (token matching; lossless for any candidate set).
  When no child is accepted the bonus token is drawn from the current (residual) p.
"""

from __future__ import annotations

import torch

from infer.tree import DraftTree
from models.sampling import Sampling


def accept_greedy(tree: DraftTree, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """target_logits: (N + 1, V), row 0 at the root, row i + 1 at node i.

    Returns (accepted node indices from the root down, bonus token)."""
    choice = target_logits.argmax(-1).tolist()
    tokens = tree.tokens.tolist()
    path, node = [], -1
    while True:
        wanted = choice[node + 1]
        match = next((c for c in tree.children(node) if tokens[c] == wanted), None)
        if match is None:
            return path, wanted
        path.append(match)
        node = match


def accept_sampling(
    tree: DraftTree, target_logits: torch.Tensor, sampling: Sampling, generator: torch.Generator
) -> tuple[list[int], int]:
    """Speculative sampling over the tree (see the module docstring); same return as greedy."""
    tokens = tree.tokens.tolist()
    path, node = [], -1
    while True:
        target_probs = sampling.probs(target_logits[node + 1])
        children = tree.children(node)
        accepted = None
        if children and tree.draft_probs is not None:
            for child in children:
                draft_probs = tree.draft_probs[child].float()
                x = tokens[child]
                ratio = target_probs[x] / draft_probs[x].clamp(min=1e-20)
                if torch.rand((), generator=generator) < ratio:
                    accepted = child
                    break
                residual = (target_probs - draft_probs).clamp(min=0)
                if residual.sum() <= 0:  # p == q up to rounding: nothing left to correct
                    break
                target_probs = residual / residual.sum()
        elif children:
            x = int(torch.multinomial(target_probs, 1, generator=generator))
            accepted = next((c for c in children if tokens[c] == x), None)
            if accepted is None:
                return path, x
        if accepted is None:
            return path, int(torch.multinomial(target_probs, 1, generator=generator))
        path.append(accepted)
        node = accepted
