"""Typed schema behind every recipe.

Each section is a dataclass; a recipe YAML (``recipes/recipe/NAME.yaml``) states only the values
that differ from the defaults here. ``recipes.load_config`` composes defaults + recipe +
``key=value`` overrides with Hydra and returns a ``Config`` instance.

Enumerated options are ``Enum`` subclasses (OmegaConf validates them and lists the valid
names on a bad value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

DEFAULT_TARGET = "stdlib-llama"


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Topology(str, Enum):
    auto = (
        "auto"  # from the launcher: accelerate's DeepSpeed settings, else DDP when WORLD_SIZE > 1
    )
    single = "single"
    ddp = "ddp"
    zero2 = "zero2"
    zero3 = "zero3"


class MixedPrecision(str, Enum):
    auto = "auto"  # the launcher's setting, else bf16 on a GPU that supports it, else no
    no = "no"
    bf16 = "bf16"


class DraftLoss(str, Enum):
    ce = "ce"  # cross-entropy on the target's tokens (the regenerated responses)
    fkl = "fkl"  # forward KL(target || drafter) over the full vocabulary
    fkl_topk = "fkl_topk"  # forward KL on the target's top-k (drafter.topk) tokens
    tvdpp = "tvdpp"  # TVD++ (Direct Alignment): variance-reduced total-variation objective


class WandbMode(str, Enum):
    disabled = "disabled"
    offline = "offline"
    online = "online"


@dataclass
class ModelConfig:
    """Architecture of a causal LM trained from scratch by ``train/pretrain.py`` (Llama family)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 768
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    save_dtype: Dtype = Dtype.float32  # dtype of the exported weights


@dataclass
class CorpusConfig:
    """Pretraining corpus. ``source: stdlib`` is the running interpreter's standard library."""

    source: str = "stdlib"
    heldout_fraction: float = 0.08  # share of modules (whole files) held out
    seq_len: int = 512
    eval_windows: int = 48  # held-out windows of seq_len tokens scored at each evaluation


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training entry point."""

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    keep_last: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    max_seq_len: int = 2048  # drafter training: longer rows are cut to this many tokens
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
    limit: int = 0  # 0 = all


@dataclass
class DistillConfig:
    """Regeneration of responses by the target (``python -m data.distill``)."""

    out: str = ""  # empty: <output_dir>/data
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 8
    shard_size: int = 256  # prompts per shard: the unit of resume
    max_prompt_tokens: int = 1024
    max_drop_rate: float = 0.05  # abort when more prompts than this are dropped as bad input
    topk_logprobs: int = 0  # teacher signal: top-k target logprobs per response token (0 = off)
    hidden_layers: list[int] = field(default_factory=list)  # teacher hidden states (empty = off)
    max_signal_gb: float = 10.0  # refuse teacher-signal caches projected above this size


@dataclass
class DrafterConfig:
    """Which drafter family to train (a registered name), how it starts, and its objective."""

    type: str = ""
    init: str = "target"  # target: copy the target's embeddings/head and first layers;
    # random: fresh weights of the target's family; or a pretrained model (path or Hub id)
    num_layers: int = 2
    loss: DraftLoss = DraftLoss.fkl
    topk: int = 32  # tokens per position for fkl_topk (a dataset's cached top-k is used if present)
    num_draft: int = 4  # draft length gamma used by the acceptance proxies (expected tau)
    lora_rank: int = (
        0  # > 0: train LoRA adapters (peft) on a pretrained init instead of all weights
    )
    lora_alpha: float = 16.0


@dataclass
class HubConfig:
    repo_id: str | None = None  # set to push the result to the Hugging Face Hub
    private: bool = True


@dataclass
class WandbConfig:
    project: str | None = None
    mode: WandbMode = WandbMode.disabled


@dataclass
class Config:
    """Root of every run's configuration."""

    recipe: str = ""  # filled in by the loader from ``recipe=NAME``
    target: str = DEFAULT_TARGET  # an embedded target name, a local directory, or a Hub id
    target_dtype: Dtype = Dtype.float32
    output_dir: str = ""  # empty: runs/<recipe>
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
