"""Tree verification with the wrapped target, and KV-cache rollback to the accepted path.

One target forward scores the root and every candidate node: position ids are prefix length +
depth, and each node attends to the whole prefix and to its ancestors only. A chain needs no
more than the model's own causal attention (no mask is built); a branching tree takes one of
two attention paths:
- ``dense``: a (N + 1, prefix + N + 1) boolean mask, which Hugging Face models take as is;
- ``kernel``: the tree-attention kernels of ``kernels/`` (Triton on CUDA, the eager reference
  elsewhere; ``DRAFTKIT_ATTENTION`` forces one), plugged in as an attention implementation that
  receives the tree's parent indices and hands every non-tree call to SDPA.
The cache then keeps the root and the accepted path and drops every other node's entries,
without any re-prefill. ``TargetFeatures`` taps the hidden states of only the layers a drafter
asks for during the prefill and every verification forward.
"""

from __future__ import annotations

import torch

from infer.tree import DraftTree
from models.target import cache_arg

ATTENTION = ("dense", "kernel")
KERNEL_IMPLEMENTATION = "draftkit_tree"


def _tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention implementation: tree kernels when the forward carries ``draftkit_parents``,
    SDPA otherwise. query (1, Hq, Q, D), key/value (1, Hkv, S, D) -> (1, Q, Hq, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    parents = kwargs.pop("draftkit_parents", None)
    if parents is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    from kernels.attention import tree_attention

    out, _ = tree_attention(query[0], key[0], value[0], parents, scale=scaling)
    return out.transpose(0, 1).unsqueeze(0), None


def use_tree_kernels(target) -> None:
    """Route the target's attention through ``_tree_attention`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(KERNEL_IMPLEMENTATION, _tree_attention)
    AttentionMaskInterface.register(KERNEL_IMPLEMENTATION, sdpa_mask)
    if target.config._attn_implementation != KERNEL_IMPLEMENTATION:
        target.set_attn_implementation(KERNEL_IMPLEMENTATION)


@torch.no_grad()
def verify_tree(
    target, cache, prefix_len: int, root: int, tree: DraftTree, attention: str = "dense"
) -> torch.Tensor:
    """Run the target on [root, *tree.tokens] after ``prefix_len`` cached tokens.

    Returns:
        (N + 1, V) logits: row 0 at the root (predicts its children), row i + 1 at node i.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention}: valid choices are {', '.join(ATTENTION)}")
    device = target.device
    ids = torch.tensor([[root, *tree.tokens.tolist()]], device=device)
    positions = torch.tensor(
        [[prefix_len, *(prefix_len + d for d in tree.depths())]], device=device
    )
    mask, extra = None, {}  # a chain (plain decoding too) is ordinary causal attention
    chain = tree.is_chain()
    if not chain and attention == "dense":
        prefix = torch.ones(len(tree) + 1, prefix_len, dtype=torch.bool)
        mask = torch.cat([prefix, tree.ancestor_mask()], dim=1)[None, None].to(device)
    elif not chain:
        use_tree_kernels(target)
        extra["draftkit_parents"] = torch.cat([torch.tensor([-1]), tree.parents + 1])  # root first
    out = target(
        input_ids=ids, position_ids=positions, attention_mask=mask, **cache_arg(target, cache),
        use_cache=True, **extra,
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


class TargetFeatures:
    """Context manager that records, during the target's forwards inside it, the hidden states
    ``hidden_states[l]`` of only the layers ``layers`` (HF indexing: 0 = the embeddings, l = the
    output of decoder layer l - 1, and L = the number of layers: the final norm's output, as HF
    stores the last layer), through forward hooks.

    ``take()`` returns the last forward's features, concatenated on the feature dim:
    (T, len(layers) * H) for batch 1.
    """

    def __init__(self, target, layers):
        decoder = target.get_decoder() if layers else None  # none: a no-op
        n = len(decoder.layers) if layers else 0
        bad = [layer for layer in layers if not 0 <= layer <= n]
        if bad:
            raise ValueError(
                f"target feature layers {bad}: valid hidden-state indices are 0..{n} "
                f"({n}: the final normed hidden state)"
            )
        self.modules = [
            target.get_input_embeddings() if layer == 0
            else decoder.norm if layer == n
            else decoder.layers[layer - 1]
            for layer in layers
        ]  # fmt: skip
        self.found: list[torch.Tensor | None] = [None] * len(layers)
        self.handles: list = []

    def __enter__(self) -> TargetFeatures:
        for i, module in enumerate(self.modules):
            self.handles.append(module.register_forward_hook(self._keep(i)))
        return self

    def _keep(self, i: int):
        def hook(module, args, output):
            self.found[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def take(self) -> torch.Tensor:
        """(T, k * H) features of the last forward (batch row 0); clears them."""
        features = torch.cat([f[0] for f in self.found], dim=-1)
        self.found = [None] * len(self.found)
        return features
