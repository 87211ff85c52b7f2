"""Tree verification with the wrapped target, and KV-cache rollback to the accepted path.

One target forward scores the root and every candidate node: position ids are prefix length +
depth, and a dense (N + 1, prefix + N + 1) boolean mask lets each node attend to the whole
prefix and to its ancestors only (Hugging Face models take a prepared 4D mask as is). The cache
then keeps the root and the accepted path and drops every other node's entries, without any
re-prefill.
"""

from __future__ import annotations

import torch

from infer.tree import DraftTree


@torch.no_grad()
def verify_tree(target, cache, prefix_len: int, root: int, tree: DraftTree) -> torch.Tensor:
    """Run the target on [root, *tree.tokens] after ``prefix_len`` cached tokens.

    Returns:
        (N + 1, V) logits: row 0 at the root (predicts its children), row i + 1 at node i.
    """
    device = target.device
    ids = torch.tensor([[root, *tree.tokens.tolist()]], device=device)
    positions = torch.tensor(
        [[prefix_len, *(prefix_len + d for d in tree.depths())]], device=device
    )
    mask = None  # a chain of length 0 (plain decoding) is ordinary causal attention
    if len(tree):
        prefix = torch.ones(len(tree) + 1, prefix_len, dtype=torch.bool)
        mask = torch.cat([prefix, tree.ancestor_mask()], dim=1)[None, None].to(device)
    out = target(
        input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=cache,
        use_cache=True,
    )  # fmt: skip
    return out.logits[0]


def crop(cache, length: int) -> None:
    """Keep the first ``length`` entries of every layer of a ``DynamicCache``."""
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def keep_accepted(cache, prefix_len: int, path: list[int]) -> None:
    """Keep the cache's first ``prefix_len`` entries, the root's, and those of the accepted
    nodes ``path`` (indices into the verified tree); drop the rest."""
    length = prefix_len + 1 + len(path)
    if path == list(range(len(path))):  # a chain prefix: entries are already contiguous
        crop(cache, length)
        return
    keep = torch.tensor(
        [*range(prefix_len + 1), *(prefix_len + 1 + i for i in path)], dtype=torch.long
    )
    for layer in cache.layers:
        if type(layer).__name__ != "DynamicLayer":
            raise NotImplementedError(f"tree rollback for {type(layer).__name__} caches")
        index = keep.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)
