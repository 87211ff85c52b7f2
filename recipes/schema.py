"""Typed schema behind every recipe.

Each section is a dataclass; a recipe YAML (``recipes/recipe/NAME.yaml``) states only the values
that differ from the defaults here. ``recipes.load_config`` composes defaults + recipe +
``key=value`` overrides with Hydra and returns a ``Config`` instance.

Enumerated options are ``Enum`` subclasses (OmegaConf validates them and lists the valid
names on a bad value).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum

DEFAULT_TARGET = "stdlib-llama"


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: ``low``/``high`` bounds (None = unbounded), each
    included unless ``*_open``. Written as an interval: ``[1, inf)``, ``(0, 1]``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (
            value > self.high or (self.high_open and value == self.high)
        )

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low is None or self.low_open else "["
        right = ")" if self.high is None or self.high_open else "]"
        return f"{left}{low}, {high}{right}"


_RANGE_SPEC = re.compile(r"^(?:(>=|>)\s*(\S+)|([\[(])\s*(\S+),\s*(\S+)\s*([\])]))$")


def parse_range(spec: str) -> Range:
    """``">=1"``, ``">0"``, ``"[0, 1]"``, ``"(0, 1]"`` -> ``Range``."""
    found = _RANGE_SPEC.match(spec.strip())
    if not found:
        raise ValueError(f"bad range spec {spec!r}")
    op, bound, left, low, high, right = found.groups()
    if op:
        return Range(low=float(bound), low_open=op == ">")
    return Range(float(low), float(high), left == "(", right == ")")


def ranged(default, spec: str):
    """A numeric field whose valid values are ``spec`` (checked when the config is loaded);
    a list default means every element must be in range."""
    meta = {"range": parse_range(spec)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    auto = "auto"  # bfloat16 where the hardware runs it natively (a GPU, an AMX CPU), else float32


class Topology(str, Enum):
    auto = (
        "auto"  # from the launcher: accelerate's DeepSpeed settings, else DDP when WORLD_SIZE > 1
    )
    single = "single"
    ddp = "ddp"
    zero2 = "zero2"
    zero3 = "zero3"


class MixedPrecision(str, Enum):
    auto = "auto"  # the launcher's bf16, else bf16 on a GPU or CPU that has it, else no
    no = "no"
    bf16 = "bf16"


class DraftLoss(str, Enum):
    ce = "ce"  # cross-entropy on the target's tokens (the regenerated responses)
    fkl = "fkl"  # forward KL(target || drafter) over the full vocabulary
    fkl_topk = "fkl_topk"  # forward KL on the target's top-k (drafter.topk) tokens
    tvdpp = "tvdpp"  # TVD++ (Direct Alignment): variance-reduced total-variation objective


class PositionWeight(str, Enum):
    decay = "decay"  # block drafters: w_k = exp(-(k - 1) / gamma) on slot k (DFlash)
    dpace = "dpace"  # D-PACE: weights from the detached per-slot acceptance (needs loss=ce)
    uniform = "uniform"  # every scored slot alike


class ConfidenceTarget(str, Enum):
    """What D²SD's confidence head estimates: P(slot k accepted | slots before accepted) under
    the acceptance rule decoding will use."""

    greedy = "greedy"  # T = 0: the draft's argmax is the target's argmax (teacher-forced)
    sampled = "sampled"  # T > 0: rejection sampling's acceptance sum_v min(p(v), q(v))
    both = "both"  # two outputs; the proposer reads the one of its temperature


class LayerStyle(str, Enum):
    """The decoder layers of a block drafter (dflash, d2sd, deer)."""

    target = "target"  # the target's own layer class (e.g. Llama: no q/k norm)
    qwen3 = "qwen3"  # Qwen3 layers (q/k RMSNorm) at the target's widths: what the serving
    # engines' DFlash drafter is, whatever the target (``python -m models.export --format zlab``)


class WandbMode(str, Enum):
    disabled = "disabled"
    offline = "offline"
    online = "online"


@dataclass
class ModelConfig:
    """Architecture of a causal LM trained from scratch by ``train/pretrain.py`` (Llama family)."""

    vocab_size: int = ranged(4096, ">=2")
    hidden_size: int = ranged(256, ">=1")
    num_layers: int = ranged(6, ">=1")
    num_heads: int = ranged(8, ">=1")
    num_kv_heads: int = ranged(4, ">=1")
    intermediate_size: int = ranged(768, ">=1")
    max_position_embeddings: int = ranged(1024, ">=2")
    rope_theta: float = ranged(10000.0, ">0")
    tie_embeddings: bool = False
    save_dtype: Dtype = Dtype.float32  # dtype of the exported weights


@dataclass
class CorpusConfig:
    """Pretraining corpus. ``source: stdlib`` is the running interpreter's standard library."""

    source: str = "stdlib"
    heldout_fraction: float = ranged(0.08, "(0, 1)")  # share of modules (whole files) held out
    seq_len: int = ranged(512, ">=2")
    eval_windows: int = ranged(
        48, ">=1"
    )  # held-out windows of seq_len tokens scored at each evaluation


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training entry point."""

    steps: int = ranged(1000, ">=1")
    batch_size: int = ranged(8, ">=1")
    grad_accum: int = ranged(1, ">=1")
    lr: float = ranged(3e-4, ">0")
    min_lr_ratio: float = ranged(0.1, "[0, 1]")  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = ranged(50, ">=0")
    weight_decay: float = ranged(0.1, ">=0")
    grad_clip: float = ranged(1.0, ">0")
    log_every: int = ranged(10, ">=1")
    eval_every: int = ranged(200, ">=1")
    save_every: int = ranged(200, ">=1")
    keep_last: int = ranged(2, ">=1")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = ranged(0, ">=0")  # torch intra-op threads on CPU; 0: the cores / local processes
    max_seq_len: int = ranged(
        2048, ">=2"
    )  # drafter training: longer rows are cut to this many tokens
    topology: Topology = Topology.auto
    mixed_precision: MixedPrecision = MixedPrecision.auto
    shard_target: bool = False  # under zero3: shard the frozen target too (else replicated)


@dataclass
class PromptsConfig:
    """Where prompts come from: a bundled set, a local file, or any ``datasets`` name."""

    source: str = "stdlib-distill"
    split: str = "train"
    prompt_column: str = "prompt"
    category_column: str = "category"
    id_column: str = "id"
    limit: int = ranged(0, ">=0")  # 0 = all


@dataclass
class DistillConfig:
    """Regeneration of responses by the target (``python -m data.distill``)."""

    out: str = ""  # empty: <output_dir>/data
    max_new_tokens: int = ranged(256, ">=1")
    temperature: float = ranged(0.0, ">=0")  # 0 = greedy
    top_p: float = ranged(1.0, "(0, 1]")
    batch_size: int = ranged(32, ">=1")  # the best of 8-64 measured on a 2-core CPU
    shard_size: int = ranged(256, ">=1")  # prompts per shard: the unit of resume
    max_prompt_tokens: int = ranged(1024, ">=1")
    max_drop_rate: float = ranged(
        0.05, "[0, 1]"
    )  # abort when more prompts than this are dropped as bad input
    topk_logprobs: int = ranged(
        0, ">=0"
    )  # teacher signal: top-k target logprobs per response token (0 = off)
    hidden_layers: list[int] = ranged([], ">=0")  # teacher hidden states (empty = off)
    # also cache what the recipe's drafter reads from the target (its layers, a top-k), when
    # that spares training the online target forward (``data/teacher_cache.py``)
    teacher_cache: bool = True
    max_signal_gb: float = ranged(
        10.0, ">0"
    )  # refuse teacher-signal caches projected above this size


@dataclass
class DrafterConfig:
    """Which drafter family to train (a registered name), how it starts, and its objective."""

    type: str = ""
    init: str = "target"  # target: copy the target's embeddings/head and first layers;
    # random: fresh weights of the target's family; or a pretrained model (path or Hub id)
    num_layers: int = ranged(2, ">=1")
    loss: DraftLoss = DraftLoss.fkl
    topk: int = ranged(
        32, ">=1"
    )  # tokens per position for fkl_topk (a dataset's cached top-k is used if present)
    num_draft: int = ranged(
        4, ">=1"
    )  # draft length gamma used by the acceptance proxies (expected tau)
    lora_rank: int = ranged(0, ">=0")  # > 0: LoRA adapters (peft) on a pretrained init
    lora_alpha: float = ranged(16.0, ">0")
    # block drafters (dflash, deer): a block is [anchor token, mask x (block_size - 1)]
    block_size: int = ranged(16, ">=2")
    num_anchors: int = ranged(32, ">=1")  # blocks trained per sequence in one forward
    mask_token_id: int = ranged(-1, ">=-1")  # -1: tokenizer's mask, a free row, or its pad
    layer_style: LayerStyle = LayerStyle.target  # qwen3: exportable to vLLM/SGLang's DFlash
    # eagle3: training-time test steps unrolled (weights 0.8^j), and the draft vocabulary (the N
    # most frequent training-response tokens; 0 = the target's whole vocabulary)
    ttt_steps: int = ranged(7, ">=1")
    draft_vocab: int = ranged(0, ">=0")
    # dflash: 0-based target decoder layers whose outputs condition the drafter (empty: evenly
    # from layer 1 to L-3); the last layer is refused (HF stores it after the final norm)
    target_layers: list[int] = ranged([], ">=0")
    position_weight: PositionWeight = PositionWeight.decay
    decay_gamma: float = ranged(0.0, ">=0")  # 0: 7 for block_size 16, 4 for 8, else 7B/16
    dpace_alpha: float = ranged(0.5, "(0, 1]")  # D-PACE floor mixed into the acceptance
    # deer: causal context-encoder layers over tokens; optimiser step where stage II starts
    context_layers: int = ranged(2, ">=1")
    stage2_step: int = ranged(0, ">=0")  # stage I (uniform weights) before it; 0: stage II only
    # d2sd: drafter 1 (block_size, + confidence head), then the variable-prefix (VP) drafter
    vp_block_size: int = ranged(0, ">=0")  # B2 of the VP drafter; 0: block_size
    vp_prefix_min: int = ranged(1, ">=0")  # visible prefix lengths l drawn ~ beta^l in
    vp_prefix_max: int = ranged(0, ">=0")  # vp_prefix_min .. vp_prefix_max (0: B2 - 2)
    vp_prefix_beta: float = ranged(0.9, "(0, 1]")
    vp_steps: int = ranged(0, ">=0")  # optimiser steps of the VP stage; 0: train.steps
    num_branches: int = ranged(4, ">=0")  # K: branches re-drafted per cycle at inference
    confidence_target: ConfidenceTarget = ConfidenceTarget.greedy  # the eval temperature's rule
    # medusa, hydra: heads on the target's final hidden state (head i predicts token t + 2 + i)
    num_heads: int = ranged(4, ">=1")
    head_decay: float = ranged(0.8, "(0, 1]")  # head i's loss weighted head_decay^i
    tree_nodes: int = ranged(60, ">=1")  # nodes of the static candidate tree at inference
    variant: str = "hydra"  # hydra: hydra | hydra++ (a prefix decoder layer, distillation only)
    # long prompts (dflash, deer's blocks, d2sd, the draft LM): attend to the first
    # attention_sinks and the last attention_window context positions only (0: everything);
    # trained with LongSpec's anchor-offset position indices (models/window.py)
    attention_window: int = ranged(0, ">=0")
    attention_sinks: int = ranged(4, ">=0")
    # hidden_transfer: HF hidden-state index L whose states are transferred into num_heads
    # pseudo states run through the target's layers L .. N - 1 (0: N // 2)
    transfer_layer: int = ranged(0, ">=0")
    # falcon: semi-autoregressive blocks of k tokens, CSGD glancing, passes and tree width
    semi_ar_k: int = ranged(2, ">=1")
    csgd_steps: int = ranged(0, ">=0")  # glancing ratio decays over these steps (0: no CSGD)
    falcon_passes: int = ranged(3, ">=1")  # drafter passes per cycle (k tokens each)
    falcon_width: int = ranged(3, ">=1")  # ranked tokens at the first slot of every pass
    calibrate: bool = True  # fit the confidence head's temperatures on held-out rows
    # rows (whole source modules) kept out of training: D²SD calibrates on them, and every family
    # reports its held-out chain-walk tau on them (at most a quarter of the rows)
    heldout_rows: int = ranged(32, ">=1")


@dataclass
class FinalEvalConfig:
    """``infer.eval`` run on the bundled eval prompts when training finished (and on the
    drafter's ablations, e.g. D²SD's drafter 1 alone), printed as the run's last table."""

    limit: int = ranged(0, ">=0")  # prompts (0: no evaluation)
    max_new_tokens: int = ranged(64, ">=1")
    prompts: str = "stdlib-eval"  # the prompt set (infer.eval's prompts=)
    tune: bool = False  # first tune the drafting settings to this device (tuned.json)
    repeats: int = ranged(1, ">=1")  # rotations over the prompts: median speedup and its range


@dataclass
class HubConfig:
    repo_id: str | None = None  # set to push the result to the Hugging Face Hub
    private: bool = True
    # also write the drafter in a serving engine's layout (zlab, medusa, hf: models/export.py)
    # into <drafter>/served-<format>/, pushed with it
    export_format: str = ""


@dataclass
class WandbConfig:
    project: str | None = None
    mode: WandbMode = WandbMode.disabled


@dataclass
class Config:
    """Root of every run's configuration."""

    recipe: str = ""  # filled in by the loader from ``recipe=NAME``
    target: str = DEFAULT_TARGET  # an embedded target name, a local directory, or a Hub id
    target_dtype: Dtype = Dtype.auto  # the frozen target (distillation, online teacher signals)
    output_dir: str = ""  # empty: runs/<recipe>
    seed: int = ranged(0, ">=0")
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    final_eval: FinalEvalConfig = field(default_factory=FinalEvalConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


class ProposerShape(str, Enum):
    chain = "chain"  # the drafter's own draft (a chain for most families)
    tree = "tree"  # a static tree: the top-`tree_width` tokens at every draft position


class Attention(str, Enum):
    dense = "dense"  # a dense ancestor mask through SDPA
    kernel = "kernel"  # the tree-attention kernels (Triton on CUDA, the eager reference elsewhere)


class BranchDrafter(str, Enum):
    vp = "vp"  # d2sd: branches re-drafted by the variable-prefix drafter
    naive = "naive"  # d2sd: branches re-sampled from drafter 1's own slots (ablation)


class Confidence(str, Enum):
    head = "head"  # d2sd: the trained, calibrated confidence head ranks the branch points
    softmax = "softmax"  # d2sd: the draft softmax's probability of the drafted token (the paper's)
    auto = "auto"  # d2sd: the one training found to rank rejections better on held-out roots


class Anchor(str, Enum):
    """Where a D²SD branch's alternative token comes from; its tail is drafted given it."""

    drafter1 = "drafter1"  # drafter 1's slot distribution, its token removed: one VP forward
    vp = "vp"  # a first VP forward picks it, a second drafts the tails
    none = "none"  # one VP forward without it (the tail ignores the alternative; an ablation)


class Acceptance(str, Enum):
    rejection = "rejection"  # T > 0: drafts sampled, verified by (recursive) rejection sampling
    matching = "matching"  # T > 0: argmax drafts, the target's sample matched (the D2SD paper's)


@dataclass
class EvalConfig:
    """Options of ``python -m infer.eval CKPT [key=value ...]``."""

    target: str = ""  # empty: the drafter's own target (prompt-lookup: the embedded default)
    prompts: str = "stdlib-eval"
    limit: int = ranged(48, ">=0")  # prompts to use (0 = all)
    max_new_tokens: int = ranged(128, ">=1")
    temperature: float = ranged(0.0, ">=0")  # 0 = greedy
    top_k: int = ranged(0, ">=0")  # 0 = off
    top_p: float = ranged(1.0, "(0, 1]")
    proposer: ProposerShape = ProposerShape.chain
    num_draft: int = ranged(0, ">=0")  # 0: the drafter's default (prompt lookup: 8)
    tree_width: int = ranged(2, ">=1")
    attention: Attention = Attention.dense
    # d2sd drafters: K (-1: the drafter's own; 0: drafter 1 alone), what drafts the branches,
    # what ranks them, and how T > 0 verifies
    branches: int = ranged(-1, ">=-1")
    branch_drafter: BranchDrafter = BranchDrafter.vp
    confidence: Confidence = Confidence.auto
    acceptance: Acceptance = Acceptance.rejection
    anchor: Anchor = Anchor.drafter1  # d2sd: where a branch's alternative comes from
    branch_depth: int = ranged(0, ">=0")  # d2sd: deepest slot a branch reaches (B2 - 1; 0: VP's)
    # dflash/deer: a best-first tree (DDTree) of at most this many nodes from the per-slot
    # probabilities (0: the chain); cost_cut cuts it each cycle where the expected tokens stop
    # paying for the verification time (CaDDTree; needs the drafter's tuned cost curve)
    tree_budget: int = ranged(0, ">=0")
    cost_cut: bool = False
    tree_topk: int = ranged(4, ">=1")  # eagle3 with tree_budget: children expanded per depth
    tree_nodes: int = ranged(0, ">=0")  # medusa/hydra: static tree nodes (0: the drafter's)
    falcon_width: int = ranged(0, ">=0")  # falcon: ranked tokens per pass's first slot (0: own)
    # draft_lm/deer/medusa/hydra: score only the N tokens most frequent in the drafter's training
    # responses (FR-Spec style, ``models/vocab.py``; 0: the whole vocabulary)
    draft_vocab: int = ranged(0, ">=0")
    tuned: bool = True  # use the drafter's tuned.json settings (options you set win)
    tune: bool = False  # first tune the drafting settings on this device (writes tuned.json)
    tune_prompts: int = ranged(8, ">=1")  # held-out prompts the tuner replays (the set's last)
    compare: bool = False  # also run the Hugging Face peers on the same prompts
    # rotations over the prompts, each starting the per-prompt order one place later; the
    # speedup is the median of the rotations' speedups, reported with their range
    repeats: int = ranged(1, ">=1")
    dtype: Dtype = Dtype.float32
    device: str = "auto"
    seed: int = ranged(0, ">=0")
    out: str = ""  # empty: <CKPT>/eval for a local drafter, else eval-<name>
    card: bool = True  # write eval.json into a local drafter folder and refresh its model card
    threads: int = ranged(0, ">=0")  # torch intra-op threads on CPU; 0 keeps torch's default
