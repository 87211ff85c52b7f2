"""DEER's proposer (``models/deer.py``): a block drafter, served like DFlash's blocks."""

from infer.proposers.base import serves
from infer.proposers.dflash import BlockProposer

serves("deer", settings=("tree_budget", "cost_cut"))(BlockProposer)
