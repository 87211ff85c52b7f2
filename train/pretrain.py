"""Plain causal-LM pretraining through the recipe system.

    python train/pretrain.py recipe=stdlib_target [key=value ...]

Trains a byte-level BPE tokenizer and a Llama-architecture model from scratch on
``corpus.source`` (default: the running interpreter's standard library, held-out split by whole
module), then exports a Hugging Face directory to ``<output_dir>/model`` with a
``provenance.json``. This is how the embedded default target was made; FastDraft-style draft-LM
pretraining reuses it.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data.corpus import corpus_hash, load_corpus, shuffled_batches, split_files, token_windows
from data.tokenizer import train_bpe
from models.drafter import LossOutput
from models.target import DTYPES, pick_device
from recipes import load_config
from recipes.cli import command, summary
from recipes.schema import Config, ModelConfig
from train.engine import single_process
from train.loop import run_loop


def build_llama(model_cfg: ModelConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads,
        intermediate_size=model_cfg.intermediate_size,
        max_position_embeddings=model_cfg.max_position_embeddings,
        rope_theta=model_cfg.rope_theta,
        tie_word_embeddings=model_cfg.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def causal_lm_loss(model, batch: torch.Tensor) -> LossOutput:
    """Next-token cross-entropy over a ``(B, T)`` batch of token windows."""
    out = model(input_ids=batch, labels=batch)
    return LossOutput(out.loss, torch.tensor(batch[:, 1:].numel()))


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss (nats/token) over ``(N, T)`` windows."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        n = batch[:, 1:].numel()
        total += model(input_ids=batch, labels=batch).loss.float().item() * n
        count += n
    return total / count


def pretrain(cfg: Config, command: str) -> Path:
    """Run the whole pretraining job; returns the exported model directory."""
    torch.manual_seed(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out_dir = Path(cfg.output_dir)
    device = pick_device(cfg.train.device)
    files = load_corpus(cfg.corpus.source)
    train_files, heldout_files = split_files(files, cfg.corpus.heldout_fraction)
    print(f"corpus: {len(train_files)} train / {len(heldout_files)} held-out modules")
    tokenizer = train_bpe((f.text for f in train_files), cfg.model.vocab_size)
    train_windows = token_windows(train_files, tokenizer, cfg.corpus.seq_len)
    eval_windows = token_windows(heldout_files, tokenizer, cfg.corpus.seq_len)
    eval_windows = eval_windows[: cfg.corpus.eval_windows]
    model = build_llama(cfg.model, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {n_params / 1e6:.2f}M parameters on {device}; "
        f"{train_windows.numel() / 1e6:.2f}M train tokens per epoch"
    )

    started = time.time()
    engine = single_process(model, cfg.train, device)
    result = run_loop(
        cfg.train,
        engine,
        causal_lm_loss,
        lambda start: (
            b.to(device)
            for b in shuffled_batches(train_windows, cfg.train.batch_size, cfg.seed, start)
        ),
        lambda batch: batch[:, 1:].numel(),
        out_dir,
        evaluate=lambda m: {"heldout_loss": heldout_loss(m, eval_windows)},
        fingerprint={
            "recipe": cfg.recipe,
            "model": str(cfg.model),
            "corpus": str(cfg.corpus),
            "steps": cfg.train.steps,
            "batch_size": cfg.train.batch_size,
        },
    )

    export = out_dir / "model"
    model.to(DTYPES[cfg.model.save_dtype.value]).save_pretrained(export)
    tokenizer.save_pretrained(export)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    provenance = {
        "command": command,
        "recipe": cfg.recipe,
        "corpus": {
            "source": cfg.corpus.source,
            "python": platform.python_version(),
            "files": len(files),
            "train_modules": len(train_files),
            "heldout_modules": [f.module for f in heldout_files],
            "corpus_sha256": corpus_hash(files),
            "train_tokens_per_epoch": train_windows.numel(),
            "heldout_fraction": cfg.corpus.heldout_fraction,
        },
        "model": {"parameters": n_params, "saved_dtype": cfg.model.save_dtype.value},
        "training": {
            "steps": result.step,
            "batch_size": cfg.train.batch_size,
            "seq_len": cfg.corpus.seq_len,
            "tokens_seen": result.tokens,
            "lr": cfg.train.lr,
            "train_loss_last_window": result.train_loss,
            "train_seconds": round(result.seconds, 1),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "cpu_threads": torch.get_num_threads(),
            "wall_seconds_this_invocation": round(time.time() - started, 1),
        },
        "eval": {
            "heldout_windows": len(eval_windows),
            "heldout_loss": heldout_loss(saved, eval_windows),  # from the saved weights
            "heldout_loss_in_training_dtype": result.eval_metrics.get("heldout_loss"),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
    }
    (export / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(provenance["eval"]), f"-> {export}")
    return export


@command
def main(argv: list[str]) -> int:
    cfg = load_config(argv)
    started = time.time()
    export = pretrain(cfg, command="python train/pretrain.py " + " ".join(argv))
    out_dir = Path(cfg.output_dir)
    summary(
        f"pretrained in {time.time() - started:.0f}s",
        {"model": export, "checkpoints": out_dir / "checkpoints", "log": out_dir / "log.jsonl"},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
