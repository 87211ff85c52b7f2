"""Topology as configuration: one ``Engine`` interface over single process, DDP and DeepSpeed ZeRO.

``resolve_topology`` reads ``train.topology`` and what the launcher exported:
``accelerate launch --config_file recipes/accelerate/zero2.yaml`` sets ``ACCELERATE_USE_DEEPSPEED``
and the ZeRO stage; ``torchrun``/``accelerate`` set ``WORLD_SIZE``. The engine then wraps the
trainable model with torch DDP or ``deepspeed.initialize`` directly. (accelerate's own
``Accelerator`` reports a world of one for DeepSpeed under several CPU processes, so it is used
as the launcher and its configuration files, not as the wrapper.)

Loss scaling convention: the loop passes each micro-batch's loss already divided by the global
number of positions of the whole optimiser step, times the world size; DDP and DeepSpeed average
gradients over processes, so several processes train exactly like one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from models.target import cpu_has_bf16
from recipes.schema import TrainConfig

KINDS = ("single", "ddp", "zero2", "zero3")
_ZERO_KIND = {"2": "zero2", "3": "zero3"}


@dataclass(frozen=True)
class Topology:
    kind: str  # one of KINDS
    world: int
    rank: int
    local_rank: int
    mixed_precision: str  # "no" | "bf16"
    offload_optimizer: str = "none"  # DeepSpeed: none | cpu
    offload_param: str = "none"

    @property
    def zero_stage(self) -> int:
        return {"zero2": 2, "zero3": 3}.get(self.kind, 0)


def resolve_topology(cfg: TrainConfig, env=os.environ) -> Topology:
    """The topology for this process; conflicting launcher and recipe settings are refused."""
    world, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
    launcher = None
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage not in _ZERO_KIND:
            raise ValueError(f"DeepSpeed ZeRO stage {stage} is not supported; use 2 or 3")
        launcher = _ZERO_KIND[stage]
    elif world > 1:
        launcher = "ddp"
    kind = cfg.topology.value
    if kind == "auto":
        kind = launcher or "single"
    elif launcher and launcher != kind and not (launcher == "ddp" and kind.startswith("zero")):
        raise ValueError(
            f"train.topology={kind} conflicts with the launcher's setting ({launcher}); "
            "set one of them (train.topology=auto follows the launcher)"
        )
    if kind == "single" and world > 1:
        raise ValueError(f"train.topology=single with WORLD_SIZE={world}; use ddp, zero2 or zero3")
    for name, ours in (
        ("GRADIENT_ACCUMULATION_STEPS", cfg.grad_accum),
        ("GRADIENT_CLIPPING", cfg.grad_clip),
    ):
        theirs = env.get(f"ACCELERATE_{name}")
        if theirs is not None and float(theirs) != float(ours):
            key = "train.grad_accum" if "ACCUM" in name else "train.grad_clip"
            raise ValueError(
                f"the accelerate config sets {name.lower()}={theirs} but the recipe has "
                f"{key}={ours}; optimisation settings come from the recipe, set {key} there"
            )
    precision = cfg.mixed_precision.value
    if precision == "auto":
        # the launcher's bf16, else the hardware's choice: `accelerate launch` exports "no" when
        # nothing was asked for, so "no" does not turn bf16 off (train.mixed_precision=no does)
        precision = env.get("ACCELERATE_MIXED_PRECISION", "")
        if precision in ("", "auto", "no"):  # bf16 where the hardware has it: GPU or AMX CPU
            cuda = torch.cuda.is_available()
            bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16()
            precision = "bf16" if bf16 else "no"
    if precision not in ("no", "bf16"):
        raise ValueError(f"mixed precision '{precision}' is not supported; use no or bf16")
    return Topology(
        kind,
        world,
        rank,
        int(env.get("LOCAL_RANK", "0")),
        precision,
        env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"),
        env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"),
    )


def init_distributed(topo: Topology) -> torch.device:
    """Start the process group (gloo on CPU, NCCL on GPU) and return this process's device."""
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", topo.local_rank)
        torch.cuda.set_device(device)
    if topo.world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )


class Engine:
    """The trainable model under one topology. ``model`` is what to call for the forward,
    ``module`` the bare model."""

    def __init__(self, topo: Topology, module: torch.nn.Module, cfg: TrainConfig, device):
        self.topo, self.module, self.cfg, self.device = topo, module, cfg, device
        self.model: torch.nn.Module = module

    def autocast(self):
        if self.topo.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        raise NotImplementedError

    def step(self, lr: float) -> float:
        """Optimiser step at ``lr`` after clipping; returns the gradient norm before clipping."""
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def full_parameters(self):
        """Inside, ``module`` holds every parameter in full (gathered under ZeRO-3)."""
        yield

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.topo.world > 1:
            values = values.clone()
            torch.distributed.all_reduce(values)
        return values

    def barrier(self) -> None:
        if self.topo.world > 1:
            torch.distributed.barrier()


class TorchEngine(Engine):
    """Single process, or torch DDP over the process group."""

    def __init__(self, topo, module, cfg, device):
        super().__init__(topo, module, cfg, device)
        module.to(device)
        if topo.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(module, device_ids=ids)
        self.optimizer = build_optimizer(module, cfg)

    def backward(self, loss, last_micro_step):
        sync = self.topo.kind != "ddp" or last_micro_step
        with contextlib.nullcontext() if sync else self.model.no_sync():
            (loss * self.topo.world).backward()

    def step(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, folder):
        from safetensors.torch import save_file

        if self.topo.rank == 0:
            state = {
                k: v.detach().cpu().contiguous().clone()
                for k, v in self.module.state_dict().items()
            }
            save_file(state, folder / "model.safetensors")
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder):
        from safetensors.torch import load_file

        self.module.load_state_dict(
            load_file(folder / "model.safetensors", device=str(self.device))
        )
        state = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2/3 through ``deepspeed.initialize`` (works with gloo on CPU)."""

    def __init__(self, topo, module, cfg, device, micro_batch: int):
        super().__init__(topo, module, cfg, device)
        import deepspeed

        zero = {"stage": topo.zero_stage}
        if topo.offload_optimizer != "none":
            zero["offload_optimizer"] = {"device": topo.offload_optimizer}
        if topo.offload_param != "none" and topo.zero_stage == 3:
            zero["offload_param"] = {"device": topo.offload_param}
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        module.to(device)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=build_optimizer(module, cfg), config=config
        )

    def backward(self, loss, last_micro_step):
        # the loop already divides by the whole step's positions: no extra 1/grad_accum
        self.model.backward(loss * self.topo.world, scale_wrt_gas=False)
        if not last_micro_step:
            self.model.step()  # only advances DeepSpeed's micro-step counter

    def step(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, folder):
        self.model.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load(self, folder):
        path, _ = self.model.load_checkpoint(str(folder), tag="deepspeed")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder}")

    @contextlib.contextmanager
    def full_parameters(self):
        if self.topo.zero_stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            yield


def make_engine(topo: Topology, module, cfg: TrainConfig, device, micro_batch: int) -> Engine:
    if topo.kind in ("single", "ddp"):
        return TorchEngine(topo, module, cfg, device)
    return DeepSpeedEngine(topo, module, cfg, device, micro_batch)


def single_process(module, cfg: TrainConfig, device="cpu") -> Engine:
    """A one-process engine without a launcher (pretraining, tests)."""
    return TorchEngine(Topology("single", 1, 0, 0, "no"), module, cfg, torch.device(device))


def shard_target(topo: Topology, target: torch.nn.Module) -> torch.nn.Module:
    """Partition the frozen target's parameters with ZeRO-3 (inference only, no optimiser).

    Forwards gather each layer's parameters on the fly; use for targets that do not fit on one
    device. Returns the DeepSpeed-wrapped target, called like the model."""
    if topo.zero_stage != 3:
        raise ValueError(f"train.shard_target needs topology zero3, not {topo.kind}")
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    wrapped, *_ = deepspeed.initialize(model=target, config=config)
    wrapped.eval()
    return wrapped
