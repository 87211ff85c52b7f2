"""D²SD: dual diffusion drafting (arXiv 2606.04446), with a trained confidence head.

Two block drafters of the DFlash architecture (``models/dflash.py``), trained one after the
other in one run and saved in one folder:

1. **drafter 1** (``first``): a DFlash drafter plus a **confidence head**. Per slot k the head
   predicts the probability that the target accepts the drafted token given slots before it
   were accepted: c_k = sigmoid(z_k / T_k), z_k = Linear([h_k ; log max_v q_k(v) ; entropy of
   q_k]) on the slot's final hidden state h_k (detached: the head never changes what is drafted)
   and the draft distribution q_k. Trained with BCE against the acceptance event of the rule
   decoding uses (``confidence_targets``): at T = 0 the greedy hit (draft argmax = target
   argmax, teacher-forced), at T > 0 rejection sampling's sum_v min(q_k, p_k); one output per
   rule asked for. After training, ``after_stage`` walks the held-out rows as greedy decoding
   does and, on drafter 1's blocks at the cycle roots it visits, fits the temperatures T_k by
   sequential temperature scaling on half the rows (``models/calibration.py``), scores head,
   softmax and the constant base rate on the other half, and records the better-ranking of
   head and softmax as the drafter's ``confidence``.
2. **the variable-prefix (VP) re-anchoring drafter** (``vp``): the same architecture with its
   own block size B2. Each training block shows a prefix of l real tokens after the anchor,
   l ~ beta^l on ``prefix_min .. prefix_max`` (default 1 .. B2 - 2, beta 0.9), and masks the
   rest; CE only on the masked slots, with weights exp(-(k - l - 1) / gamma) restarting at 1 on
   the first masked slot (gamma 7). At inference it re-drafts a branch that keeps drafter 1's
   first i tokens; ``draft_branches`` runs all K branches in one forward that reads the shared
   context once and merges it with each branch's own block by log-sum-exp (cascade attention).

The proposer (``infer/proposers/d2sd.py``, ``D2SDProposer``) ranks the rejection points
r(i) = prod_{k <= i} c_k * (1 - c_{i+1}) and turns the main draft and the top-K branches into
one prefix tree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.reference import attention_with_lse, merge_states
from models.calibration import (
    chain_cycles,
    constant_rates,
    fit_temperatures,
    slot_calibration,
)
from models.dflash import DFlash, empty_kv
from models.drafter import Batch, Drafter, LossOutput, Stage, TargetInfo, Teacher
from models.losses import logit_stats
from models.registry import register_drafter


@dataclass
class BlockOutput:
    """Drafter 1's training forward: logits (b, N, B, V), confidence logits (b, N, B) and the
    logits' log-sum-exp (b, N, B), which the head read and the acceptance target reuses."""

    logits: torch.Tensor
    confidence: torch.Tensor
    lse: torch.Tensor | None = None


RULES = ("greedy", "sampled")


class ConfidenceHead(torch.nn.Module):
    """z_k = Linear([h_k ; log max q_k ; entropy(q_k)]) with one output per acceptance rule it
    was trained for (``targets``: ``greedy`` and/or ``sampled``); c_k = sigmoid(z_k / T_k), the
    temperatures a buffer (1 until calibrated) per rule and slot 1 .. B - 1."""

    def __init__(self, hidden: int, block_size: int, targets: list[str]):
        super().__init__()
        bad = [t for t in targets if t not in RULES]
        if bad or not targets:
            raise ValueError(f"confidence targets {targets}: each one of {', '.join(RULES)}")
        self.targets = list(targets)
        self.proj = torch.nn.Linear(hidden + 2, len(targets))
        # start as the softmax confidence's logit-like score z = log max q (an Adam step moves
        # a weight by about lr, so a random start would take thousands of steps to wash out)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, hidden] = 1.0
            self.proj.bias.zero_()
        self.register_buffer("temperature", torch.ones(len(targets), block_size - 1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "temperature"
        if key in state_dict and state_dict[key].dim() == 1:  # saved with one rule, (B - 1,)
            state_dict[key] = state_dict[key][None]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor, stats=None) -> torch.Tensor:
        """(..., H) hidden states and (..., V) draft logits -> (..., R) logits z (uncalibrated),
        one per rule; ``stats``: the logits' ``logit_stats`` when the caller has them."""
        if stats is None:
            stats = logit_stats(logits.detach())  # chunked float32: log max q, entropy of q
        top, entropy = stats.max_logprob, stats.entropy
        features = torch.cat(
            [hidden.detach().to(self.proj.weight.dtype), top[..., None], entropy[..., None]], -1
        )
        return self.proj(features.to(self.proj.weight.dtype)).float()

    def column(self, rule: str) -> int:
        """The output for ``rule``; a head trained for the other rule only answers with its
        own."""
        return self.targets.index(rule) if rule in self.targets else 0

    def confidence(self, z: torch.Tensor, rule: str = "greedy") -> torch.Tensor:
        """(..., S, R) logits of slots 1..S -> (..., S) calibrated c in (0, 1) for ``rule``."""
        j = self.column(rule)
        return torch.sigmoid(z[..., j] / self.temperature[j, : z.shape[-2]].to(z.device))


class ConfidentDFlash(DFlash):
    """Drafter 1: DFlash + confidence head, trained together (the head on detached inputs).
    config: DFlash's plus ``confidence_targets`` (default ``["sampled"]``, what drafters saved
    before the rule was chosen were trained on)."""

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__(config, target)
        targets = config.get("confidence_targets", ["sampled"])
        self.confidence = ConfidenceHead(self.norm.weight.shape[0], config["block_size"], targets)

    def needs_target_logits(self, cached_topk: bool) -> bool:
        # the head's targets need the target's distribution, or at least its top-k (its argmax)
        return self.config["loss"] == "fkl" or not cached_topk

    def forward(self, batch: Batch, teacher: Teacher) -> BlockOutput:
        hidden = self.block_hidden(batch, teacher)
        logits = self.head(hidden)
        stats = logit_stats(logits.detach())  # one pass over the logits for head and target
        return BlockOutput(logits, self.confidence(hidden, logits, stats), stats.lse)

    def acceptance_target(self, logits, batch: Batch, teacher: Teacher, lse=None) -> torch.Tensor:
        """(b, N, B, R) per rule of the head: ``greedy``, 1 where the draft's argmax is the
        target's argmax at the position predicting the slot (teacher-forced); ``sampled``,
        sum_v min(q_k(v), p_k(v)) = 1 - TV(q_k, p_k), the probability that speculative sampling
        accepts slot k's token. From the cached top-k alone that sum runs over the target's
        top-k tokens: a lower bound, short by at most the target's mass outside its top-k.
        ``lse``: the logits' log-sum-exp when the caller has it."""
        seq = batch.input_ids.shape[1]
        rows = (self.label_positions(batch) - 1).clamp(0, seq - 1).flatten(1)
        logits = logits.detach()
        out = []
        for rule in self.confidence.targets:
            if rule == "greedy":
                best = (teacher.logits.argmax(-1) if teacher.logits is not None
                        else teacher.topk_ids[..., 0])  # fmt: skip
                best = best.gather(1, rows).view(logits.shape[:-1])
                out.append((logits.argmax(-1) == best).float())
            else:
                out.append(self._sampled_acceptance(logits, rows, teacher, lse))
        return torch.stack(out, -1)

    def _sampled_acceptance(self, logits, rows, teacher: Teacher, lse) -> torch.Tensor:
        if teacher.logits is None:  # q at the target's top-k ids only: exp(z - logsumexp z)
            k = teacher.topk_ids.shape[-1]
            ids = teacher.topk_ids.gather(1, rows[..., None].expand(-1, -1, k))
            logp = teacher.topk_logprobs.gather(1, rows[..., None].expand(-1, -1, k))
            z_top = logits.gather(-1, ids.view(*logits.shape[:-1], k)).float()
            lse = logit_stats(logits).lse if lse is None else lse
            q_top = torch.exp(z_top - lse[..., None])
            return torch.minimum(q_top, logp.view_as(q_top).float().exp()).sum(-1)
        q = F.softmax(logits.float(), -1)
        target_logits = teacher.logits.gather(
            1, rows[..., None].expand(-1, -1, teacher.logits.shape[-1])
        ).view_as(logits)
        p = F.softmax(target_logits.float(), -1)
        return 1.0 - 0.5 * (p - q).abs().sum(-1)

    def objective(self, output: BlockOutput, batch: Batch, teacher: Teacher) -> LossOutput:
        out = super().objective(output.logits, batch, teacher)
        _, valid = self.block_labels(batch)
        target = self.acceptance_target(output.logits, batch, teacher, output.lse)
        bce = F.binary_cross_entropy_with_logits(output.confidence, target, reduction="none")
        bce = bce * valid[..., None]
        per_block = bce.sum() / (self.block_size - 1)
        n_blocks = out.n_positions.clamp(min=1)
        out.loss = out.loss + per_block / n_blocks
        with torch.no_grad():
            scored = valid.sum().clamp(min=1)
            c = torch.sigmoid(output.confidence)
            out.metrics["conf_bce"] = bce.sum() / scored * out.n_positions
            for j, rule in enumerate(self.confidence.targets):
                for name, value in (("target", target), ("mean", c)):
                    mean = (value[..., j] * valid).sum() / scored
                    out.metrics[f"conf_{name}_{rule}"] = mean * out.n_positions
        return out

    @torch.no_grad()
    def draft_with_confidence(self, root: int, start: int, context, state):
        """``draft_block`` plus the head: ((B - 1, V) logits, (B - 1, R) confidence logits z)."""
        hidden = self.draft_hidden(root, start, context, state)
        logits = self.head(hidden)
        return logits, self.confidence(hidden, logits)

    @torch.no_grad()
    def root_blocks(self, pairs) -> dict[str, torch.Tensor]:
        """Drafter 1's blocks where greedy chain decoding starts its cycles on held-out rows:
        walk each row as decoding does (``chain_cycles``) and keep the blocks at the roots it
        visits whose slots all lie inside the response. Returns ``z`` (n, S, R) head logits,
        ``softmax`` (n, S) the drafted token's draft probability, ``hits`` (n, S) 0/1 the draft
        equals the row's token (the target's own greedy token) and ``row`` (n,) the held-out
        row each block comes from."""
        slots, found = self.block_size - 1, {"z": [], "softmax": [], "hits": [], "row": []}
        was_training, offset = self.training, 0
        self.eval()
        for batch, teacher in pairs:
            b, seq = batch.input_ids.shape
            z = torch.zeros(b, seq, slots, len(self.confidence.targets))
            soft, hits = torch.zeros(b, seq, slots), torch.zeros(b, seq, slots, dtype=torch.bool)
            full = torch.zeros(b, seq, dtype=torch.bool)
            for rows, at, probe in self.each_anchor(batch):
                out = self(probe, teacher)
                labels, valid = self.block_labels(probe)
                real = probe.anchors.cpu() >= 0
                top = out.logits.max(-1)
                hits[rows, at] = ((top.indices == labels) & valid)[..., 1:].cpu()[real]
                soft[rows, at] = (top.values.float() - out.lse).exp()[..., 1:].cpu()[real]
                z[rows, at] = out.confidence[..., 1:, :].float().cpu()[real]
                full[rows, at] = valid[..., 1:].all(-1).cpu()[real]
            runs = torch.cumprod(hits.long(), -1).sum(-1).tolist()
            for row, mask in enumerate(batch.loss_mask.tolist()):
                for t, _, _ in chain_cycles(runs[row], mask):
                    if full[row, t]:
                        for key, value in (("z", z), ("softmax", soft), ("hits", hits)):
                            found[key].append(value[row, t])
                        found["row"].append(torch.tensor(offset + row))
            offset += b
        self.train(was_training)
        if not found["row"]:
            return {}
        return {key: torch.stack(value).float() if key != "row" else torch.stack(value)
                for key, value in found.items()}  # fmt: skip


def prefix_prior(low: int, high: int, beta: float) -> torch.Tensor:
    """(high - low + 1,) probabilities of l = low..high, proportional to beta^l."""
    weights = beta ** torch.arange(low, high + 1, dtype=torch.float64)
    return (weights / weights.sum()).float()


class VPDrafter(DFlash):
    """The variable-prefix re-anchoring drafter. config (beyond DFlash's): ``prefix_min``,
    ``prefix_max``, ``prefix_beta``."""

    def prepare_batch(self, batch: Batch) -> Batch:
        """Anchors as DFlash, plus each block's visible prefix length l (``extra['visible']``)."""
        batch = super().prepare_batch(batch)
        low, high = self.config["prefix_min"], self.config["prefix_max"]
        prior = prefix_prior(low, high, self.config["prefix_beta"])
        draws = torch.multinomial(prior, batch.anchors.numel(), replacement=True) + low
        batch.extra["visible"] = draws.view_as(batch.anchors).to(batch.anchors.device)
        return batch

    def training_blocks(self, batch: Batch) -> torch.Tensor:
        """[x_anchor, x_anchor+1 .. x_anchor+l, MASK ...]: the first l slots after the anchor
        carry the real tokens."""
        seq = batch.input_ids.shape[1]
        at = self.label_positions(batch)  # (b, N, B): anchor + k
        real = batch.input_ids.gather(1, at.clamp(max=seq - 1).flatten(1)).view_as(at)
        k = torch.arange(self.block_size, device=at.device)
        shown = k <= batch.extra["visible"][..., None]
        return torch.where(shown, real, torch.full_like(real, self.mask_token_id))

    def heldout_hits(self, batch: Batch, teacher: Teacher):
        return None  # it drafts branches after a rejection, not a chain from a root

    def block_labels(self, batch: Batch):
        labels, valid = super().block_labels(batch)
        k = torch.arange(self.block_size, device=labels.device)
        return labels, valid & (k > batch.extra["visible"][..., None])

    def slot_weights(self, batch: Batch, per_slot: torch.Tensor, valid: torch.Tensor):
        """exp(-(k - l - 1) / gamma) on masked slots k > l (the first has weight 1), normalised
        over the block's masked slots."""
        gamma = self.config["decay_gamma"] or 7.0
        k = torch.arange(self.block_size, device=per_slot.device, dtype=torch.float32)
        since = k - (batch.extra["visible"][..., None].float() + 1)  # (b, N, B)
        weights = torch.where(since >= 0, torch.exp(-since.clamp(min=0) / gamma), 0.0)
        return weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)

    def objective(self, logits: torch.Tensor, batch: Batch, teacher: Teacher) -> LossOutput:
        """DFlash's objective with VP weights; ``top1`` is the accuracy on each block's first
        masked slot (slot 1 is usually shown)."""
        out = super().objective(logits, batch, teacher)
        labels, valid = self.block_labels(batch)
        with torch.no_grad():
            visible = batch.extra["visible"][..., None]  # (b, N, 1)
            hit = (logits.max(-1).indices == labels) & valid
            first = (visible + 1).clamp(max=self.block_size - 1)
            scored = valid.gather(-1, first).float().sum()
            top1 = hit.gather(-1, first).float().sum() / scored.clamp(min=1)
            out.metrics["top1"] = top1 * out.n_positions
        return out

    @torch.no_grad()
    def draft_branches(self, root: int, prefixes: list[list[int]], start: int, context, state):
        """Re-draft K branches in one forward: branch j is the block ``[root, *prefixes[j],
        MASK ...]`` (length B2) at positions ``start ..``. The shared context is attended once
        for all branches and merged with each branch's own block by log-sum-exp.

        Returns:
            (K, B2 - 1, V) float32 logits of slots 1 .. B2 - 1.
        """
        self.feed(start, context, state)
        device = self.norm.weight.device
        ids = torch.full((len(prefixes), self.block_size), self.mask_token_id, device=device)
        ids[:, 0] = root
        for j, prefix in enumerate(prefixes):
            if len(prefix) > self.block_size - 1:
                raise ValueError(
                    f"prefix of {len(prefix)} tokens: the block holds {self.block_size}"
                )
            ids[j, 1 : 1 + len(prefix)] = torch.tensor(prefix, dtype=torch.long, device=device)
        positions = start + torch.arange(self.block_size, device=device)[None]
        ctx = state.kv or empty_kv(self.layers, 1, device, self.norm.weight.dtype)
        hidden = self.embed_block(ids)
        for layer, (ctx_k, ctx_v) in zip(self.layers, ctx, strict=True):
            hidden = self._cascade_layer(layer, hidden, positions, ctx_k[0], ctx_v[0])
        return self.head(self.norm(hidden))[:, 1:]

    def _cascade_layer(self, layer, hidden, positions, ctx_k, ctx_v):
        """One decoder layer for K blocks (K, n, H) sharing the context keys/values
        (Hkv, c, D): every query over the context in one pass, each block over itself
        (bidirectional), merged by log-sum-exp."""
        branches, n, _ = hidden.shape
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = self._roped(self._heads(attn, x, attn.q_proj, "q_norm"), positions)  # (K, Hq, n, D)
        k = self._roped(self._heads(attn, x, attn.k_proj, "k_norm"), positions)  # (K, Hkv, n, D)
        v = self._heads(attn, x, attn.v_proj)
        heads, dim = q.shape[1], q.shape[-1]
        shared = q.transpose(0, 1).reshape(heads, branches * n, dim)  # (Hq, K*n, D)
        o_ctx, lse_ctx = attention_with_lse(shared, ctx_k, ctx_v, None, attn.scaling)
        o_own, lse_own = attention_with_lse(
            q.reshape(branches * heads, n, dim), k.flatten(0, 1), v.flatten(0, 1), None,
            attn.scaling,
        )  # fmt: skip
        o_own = o_own.view(branches, heads, n, dim).transpose(0, 1).reshape(heads, -1, dim)
        lse_own = lse_own.view(branches, heads, n).transpose(0, 1).reshape(heads, -1)
        out, _ = merge_states(o_ctx, lse_ctx, o_own, lse_own)  # (Hq, K*n, D)
        out = out.view(heads, branches, n, dim).permute(1, 2, 0, 3).reshape(branches, n, -1)
        hidden = hidden + attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@register_drafter("d2sd")
class D2SD(Drafter):
    """Drafter 1 (``first``) and the VP drafter (``vp``) in one folder. config: ``first`` and
    ``vp`` (their DFlash configs), ``num_branches`` (K), ``num_draft``, ``vp_steps``,
    ``heldout_rows``, ``calibrate``."""

    windowed = True  # both drafters' block attention

    def __init__(self, config: dict, target: TargetInfo):
        super().__init__(config, target)
        self.first = ConfidentDFlash(config["first"], target)
        self.vp = VPDrafter(config["vp"], target)
        self.block_size = self.first.block_size

    @classmethod
    def from_recipe(cls, cfg, target_model, target: TargetInfo, tokenizer=None) -> D2SD:
        b2 = cfg.vp_block_size or cfg.block_size
        high = cfg.vp_prefix_max or b2 - 2
        if not cfg.vp_prefix_min <= high <= b2 - 2:
            raise ValueError(
                f"drafter.vp_prefix_min={cfg.vp_prefix_min}, drafter.vp_prefix_max={high}: "
                f"need vp_prefix_min <= vp_prefix_max <= vp_block_size - 2 = {b2 - 2}"
            )
        first = ConfidentDFlash.from_recipe(cfg, target_model, target, tokenizer)
        vp_cfg = dataclasses.replace(cfg, block_size=b2)
        vp = VPDrafter.from_recipe(vp_cfg, target_model, target, tokenizer)
        vp_config = {**vp.config, "prefix_min": cfg.vp_prefix_min, "prefix_max": high,
                     "prefix_beta": cfg.vp_prefix_beta}  # fmt: skip
        targets = (
            ["greedy", "sampled"]
            if cfg.confidence_target.value == "both"
            else [cfg.confidence_target.value]
        )
        config = {
            "first": {**first.config, "confidence_targets": targets}, "vp": vp_config,
            "num_branches": cfg.num_branches,
            "num_draft": cfg.block_size - 1, "vp_steps": cfg.vp_steps,
            "heldout_rows": cfg.heldout_rows if cfg.calibrate else 0, "calibrate": cfg.calibrate,
        }  # fmt: skip
        drafter = cls(config, target)
        trunk = {k: v for k, v in first.state_dict().items() if not k.startswith("confidence.")}
        missing, _ = drafter.first.load_state_dict(trunk, strict=False)  # its own head, rule-sized
        assert all(k.startswith("confidence.") for k in missing), missing
        drafter.vp.load_state_dict(vp.state_dict())
        drafter.attach_target(target_model)
        return drafter

    def attach_target(self, target_model) -> None:
        self.first.attach_target(target_model)
        self.vp.attach_target(target_model)

    def target_layers(self) -> list[int]:
        return self.first.target_layers()

    def stages(self) -> list[Stage]:
        return [Stage("first", self.first), Stage("vp", self.vp, self.config["vp_steps"])]

    def heldout_rows(self) -> int:
        return self.config["heldout_rows"]

    def eval_variants(self) -> dict[str, list[str]]:
        return {"drafter 1 alone (K=0)": ["branches=0"]}

    def forward(self, batch: Batch, teacher: Teacher):
        raise RuntimeError("d2sd trains in stages: train its .stages() modules one by one")

    @torch.no_grad()
    def after_stage(self, name: str, heldout) -> dict:
        """After drafter 1, on its blocks at the cycle roots of the held-out rows
        (``ConfidentDFlash.root_blocks``), split by row into a fitting and a scoring half:
        fit the head's greedy temperatures on the first (when ``calibrate``), score head,
        softmax and the constant base rate on the second (per-slot ECE, AUROC, Brier of the
        cumulative product against greedy prefix acceptance), and make the confidence that
        ranks rejections better there (mean AUROC over slots) the drafter's ``confidence``."""
        if name != "first":
            return {}
        blocks = self.first.root_blocks(heldout)
        if not blocks:
            return {"calibration": "no full blocks at the cycle roots of the held-out rows"}
        head = self.first.confidence
        rows, hits = blocks["row"], blocks["hits"]
        fit = rows % 2 == 0
        if fit.all() or not fit.any():  # one held-out row: fit and score on the same blocks
            fit, score = torch.ones_like(fit), torch.ones_like(fit)
        else:
            score = ~fit
        greedy = "greedy" in head.targets
        head.temperature.fill_(1.0)
        z = blocks["z"][..., head.column("greedy")]
        if greedy and self.config["calibrate"]:
            fitted = fit_temperatures(z[fit], hits[fit])
            head.temperature[head.column("greedy")] = torch.tensor(fitted)
        rate = constant_rates(hits[fit])
        scored = {
            "head": head.confidence(blocks["z"][score], "greedy"),
            "head_uncalibrated": torch.sigmoid(z[score]),
            "softmax": blocks["softmax"][score],
            "constant": rate.expand(int(score.sum()), -1),
        }
        report = {"blocks": int(hits.shape[0]), "fit_blocks": int(fit.sum()),
                  "scored_blocks": int(score.sum()), "head_rule": head.targets,
                  "temperature": head.temperature.tolist()}  # fmt: skip
        for key, c in scored.items():
            per_slot = slot_calibration(c, hits[score])
            report[key] = {m: [r[m] for r in per_slot] for m in ("ece", "auroc", "brier")}
            report[key]["mean_auroc"] = _nanmean(report[key]["auroc"])
            report[key]["mean_ece"] = _nanmean(report[key]["ece"])
        report["accept"] = [r["accept"] for r in per_slot]  # the scored half's, any confidence
        better = report["head"]["mean_auroc"] >= report["softmax"]["mean_auroc"]
        self.config["confidence"] = "head" if greedy and better else "softmax"
        report["confidence"] = self.config["confidence"]
        return {"calibration": report}


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")
