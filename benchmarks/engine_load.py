"""Load draftkit's exports with a serving engine's own code: speculators 0.9 (the pure-Python
loader vLLM's speculators path follows), in a separate virtual environment with its own pins.

    python -m benchmarks.engine_load [DRAFTER] [--venv DIR]

DRAFTER: a dflash/d2sd drafter trained with ``drafter.layer_style=qwen3`` (default: a fresh
one-layer drafter of the embedded target, weights perturbed so no tensor is trivially equal).
Exports it as ``zlab`` and ``speculators`` (``models/export.py``), then inside the venv:

1. speculators' own z-lab converter (``DFlashConverter``, with its validation) converts the
   ``zlab`` export, as a user moving a z-lab checkpoint to vLLM would;
2. ``DFlashDraftModel.from_pretrained`` loads both the converted folder and draftkit's direct
   ``speculators`` export, reporting missing and unexpected keys;
3. the two loaded models' drafter tensors and config fields (layer ids, mask id, block) must be
   identical, and equal to draftkit's weights.

vLLM has only third-party CPU builds and SGLang needs CUDA, so they are not loaded here.
Writes its section of ``benchmarks/results/RESULTS.md``. Not part of the test run (it installs packages).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import write_section

PINS = ["speculators==0.9.0", "torch==2.13.0", "transformers==5.19.0"]  # torch pinned: CPU wheel

CHILD = r"""
import json, sys
import torch
from safetensors.torch import load_file
from speculators.convert.dflash.converter import DFlashConverter
from speculators.models.dflash import DFlashDraftModel

zlab, spec, converted, target = sys.argv[1:5]
DFlashConverter().convert(zlab, converted, base_model=target, validate=True)
report, models = {}, {}
for name, path in (("draftkit speculators export", spec), ("speculators' zlab converter", converted)):
    model, info = DFlashDraftModel.from_pretrained(path, output_loading_info=True)
    models[name] = model
    c = model.config
    report[name] = {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                    "aux_hidden_state_layer_ids": c.aux_hidden_state_layer_ids,
                    "mask_token_id": c.mask_token_id, "block_size": c.block_size,
                    "layers": len(model.layers)}
body = lambda m: {k: v for k, v in m.state_dict().items()
                  if k.startswith(("layers.", "fc.", "norm.", "hidden_norm."))}
a, b = (body(m) for m in models.values())
ours = {k: v for k, v in load_file(zlab + "/model.safetensors").items()}
report["same tensor names"] = sorted(a) == sorted(b) == sorted(ours)
report["max |difference| between the two loads"] = max(float((a[k] - b[k]).abs().max()) for k in a)
report["max |difference| from draftkit's weights"] = max(
    float((a[k].float() - ours[k].float()).abs().max()) for k in a)
print("REPORT" + json.dumps(report))
"""


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS], check=True)
        # pip may pull torchvision/torchaudio builds for another torch, which break imports
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision",
                        "torchaudio"], check=False)  # fmt: skip
    return python


def fresh_drafter(folder: Path) -> Path:
    import torch

    from models.drafter import build_drafter
    from models.target import load_target
    from recipes import load_config

    target, tokenizer = load_target("stdlib-llama")
    cfg = load_config(["recipe=dflash", "drafter.num_layers=1", "drafter.layer_style=qwen3",
                       "drafter.block_size=8"])  # fmt: skip
    torch.manual_seed(0)
    drafter = build_drafter(cfg.drafter, target, tokenizer, "stdlib-llama")
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return drafter.save_pretrained(folder)


def main() -> None:
    from models.export import export
    from models.target import resolve_target

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("drafter", nargs="?", default="")
    parser.add_argument("--venv", default=str(Path(tempfile.gettempdir()) / "draftkit-speculators"))
    args = parser.parse_args()
    python = ensure_venv(Path(args.venv))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        drafter = Path(args.drafter) if args.drafter else fresh_drafter(tmp / "drafter")
        meta = json.loads((drafter / "config.json").read_text())
        target = resolve_target(meta["target"]["id"])
        zlab = export(drafter, "zlab", tmp / "zlab")
        spec = export(drafter, "speculators", tmp / "speculators")
        started = time.perf_counter()
        done = subprocess.run([str(python), "-c", CHILD, str(zlab), str(spec),
                               str(tmp / "converted"), target],
                              capture_output=True, text=True)  # fmt: skip
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("REPORT")]
        if done.returncode or not lines:
            print(done.stdout[-3000:], done.stderr[-3000:])
            raise SystemExit(f"speculators could not load the exports (exit {done.returncode})")
        report = json.loads(lines[-1][len("REPORT") :])
    print(json.dumps(report, indent=2))
    version = subprocess.run([str(python), "-m", "pip", "list", "--format=json"],
                             capture_output=True, text=True).stdout  # fmt: skip
    pins = {p["name"]: p["version"] for p in json.loads(version)
            if p["name"] in ("speculators", "torch", "transformers")}  # fmt: skip
    what = args.drafter or "a fresh one-layer qwen3-style dflash drafter of the embedded target"
    rows = [f"| {name} | {r['missing']} | {r['unexpected']} | {r['aux_hidden_state_layer_ids']} "
            f"| {r['mask_token_id']} | {r['block_size']} |"
            for name, r in report.items() if isinstance(r, dict)]  # fmt: skip
    text = "\n".join([
        "## Exports loaded by a serving engine's own code (speculators)",
        "",
        f"`python -m benchmarks.engine_load` ({time.strftime('%Y-%m-%d')}; {what}; "
        f"{', '.join(f'{k} {v}' for k, v in sorted(pins.items()))} in its own venv; "
        f"{time.perf_counter() - started:.0f}s).",
        "",
        "| loaded with `DFlashDraftModel.from_pretrained` | missing keys | unexpected keys "
        "| aux layer ids | mask id | block |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Same tensor names in both loads and draftkit's file: {report['same tensor names']}; "
        f"largest difference between the two loads "
        f"{report['max |difference| between the two loads']:.3g}, from draftkit's weights "
        f"{report['max |difference| from draftkit' + chr(39) + 's weights']:.3g}.",
    ])  # fmt: skip
    write_section("engine_load", text)


if __name__ == "__main__":
    main()
