"""A reduced draft vocabulary (FR-Spec style): the drafter scores only the N tokens most frequent
in its training data's responses.

For a large vocabulary the drafter's output projection is most of its cost per drafted token
(SmolLM2: a 49,152 x 576 head against two decoder layers of about 3.5M weights each). Restricting
it to the frequent tokens cuts that cost; the drafts can then only be tokens of the subset, and
verification is unchanged, so decoding stays lossless (under sampling the draft distribution is
zero outside the subset, which rejection sampling handles like any other q).

Training writes ``vocab_counts.safetensors`` (response-token counts of the distillation data)
into the drafter folder; ``python -m models.vocab DATASET DRAFTER`` writes it for a drafter
trained before. ``python -m infer.eval CKPT draft_vocab=N`` uses it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from models.drafter import COUNTS_NAME


def response_token_counts(rows, vocab_size: int) -> torch.Tensor:
    """How often each token id is a response token (``loss_mask`` 1) in ``rows``."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids, mask in zip(rows["input_ids"], rows["loss_mask"], strict=True):
        ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        counts += torch.bincount(ids[mask], minlength=vocab_size)[:vocab_size]
    return counts


def write_counts(folder: Path | str, counts: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / COUNTS_NAME
    save_file({"counts": counts.contiguous()}, path)
    return path


def read_counts(folder: Path | str) -> torch.Tensor:
    from safetensors.torch import load_file

    path = Path(folder) / COUNTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"draft_vocab needs the token counts of the drafter's training data, and {path} is "
            f"missing: write them with `python -m models.vocab DATASET {folder}` (DATASET: the "
            "distillation dataset folder it was trained on)"
        )
    return load_file(path)["counts"]


def frequent_ids(counts: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` most frequent token ids (ties: the lower id first), in increasing id order."""
    if not 1 <= n <= counts.numel():
        raise ValueError(f"draft_vocab={n}: must be 1..{counts.numel()} (the vocabulary size)")
    order = torch.sort(-counts, stable=True).indices  # most frequent first, ties by id
    return order[:n].sort().values


class SubsetLinear(torch.nn.Module):
    """A vocabulary projection restricted to ``ids``: the other tokens' logits are -inf."""

    def __init__(self, linear: torch.nn.Linear, ids: torch.Tensor):
        super().__init__()
        ids = ids.to(linear.weight.device)
        self.weight = torch.nn.Parameter(linear.weight.detach()[ids].clone(), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach()[ids].clone())
        self.register_buffer("ids", ids, persistent=False)
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = torch.nn.functional.linear(x, self.weight, self.bias)
        out = small.new_full((*small.shape[:-1], self.out_features), float("-inf"))
        return out.index_copy_(-1, self.ids, small)


def restrict_vocab(drafter: torch.nn.Module, ids: torch.Tensor) -> int:
    """Replace every output projection of ``drafter`` onto the target's vocabulary (a Linear
    with ``vocab_size`` outputs) by its ``ids`` rows; returns how many were replaced."""
    vocab = drafter.target.vocab_size
    found = [
        (name, module)
        for name, module in drafter.named_modules()
        if isinstance(module, torch.nn.Linear) and module.out_features == vocab
    ]
    if not found:
        raise ValueError(
            f"draft_vocab: drafter type '{drafter.drafter_type}' has no vocabulary projection of "
            "its own (it scores drafts with the target's LM head); it applies to draft_lm, deer, "
            "medusa, hydra and eagle3 drafters"
        )
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = drafter.get_submodule(parent_name) if parent_name else drafter
        setattr(parent, child, SubsetLinear(module, ids))
    return len(found)


def main(argv: list[str]) -> int:
    """``python -m models.vocab DATASET DRAFTER``: write the drafter's token counts."""
    import datasets

    from models.drafter import read_drafter_config

    if len(argv) != 2:
        print(__doc__.splitlines()[0] + "\n\nusage: python -m models.vocab DATASET DRAFTER")
        return 2
    data, folder = Path(argv[0]), Path(argv[1])
    rows = datasets.load_from_disk(str(data / "dataset" if (data / "dataset").is_dir() else data))
    vocab = read_drafter_config(folder)["target"]["vocab_size"]
    counts = response_token_counts(rows, vocab)
    path = write_counts(folder, counts)
    print(f"{int(counts.sum())} response tokens, {int((counts > 0).sum())} distinct -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
