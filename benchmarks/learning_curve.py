"""Learning curves: held-out τ against response tokens seen, per family, and against data size.

    python -m benchmarks.learning_curve data [--rows 8192]           # the shared dataset, once
    python -m benchmarks.learning_curve train FAMILY [--minutes 60]  # d2sd, dflash, draft_lm, hydra, eagle3
    python -m benchmarks.learning_curve sizes [--rows 512,2048,8192] [--steps 1200]
    python -m benchmarks.learning_curve train d2sd --name d2sd-lr3e-3 --set train.lr=3e-3
    python -m benchmarks.learning_curve report                       # table + plot -> RESULTS.md

Every run trains with the recipe of its family on one dataset built once from the embedded
target (``--rows`` prompts of ``stdlib-distill`` x 128 tokens, with the teacher signals the
block drafters and the draft LM read cached), one torch thread, ``train.steps`` large enough that
the time limit ends it. Two figures per checkpoint:

- ``heldout_tau``: the training log's chain-walk τ on the dataset's held-out rows (whole source
  modules kept out; ``train/heldout.py``), every ``--every`` steps;
- ``eval_tau``: ``infer.eval`` on the first ``--eval-prompts`` prompts of ``stdlib-eval``
  (held-out corpus modules), greedy, measured on the checkpoint exported as a drafter folder,
  evaluated as the checkpoints land (in this process, beside the training process).

Everything is resumable: ``train`` rerun with the same arguments resumes the training from its
last checkpoint (when the recipe file changed since, pin the old values with ``--set KEY=VALUE``:
the training refuses to resume a run whose settings changed, naming them) (``train.steps`` is kept, so the schedule is the same) and evaluates only the
checkpoints not yet in ``curve.jsonl``. ``sizes`` trains dflash for the same steps on the first
1x, 4x, 16x rows of the dataset. D²SD's curve is its first stage (drafter 1, a DFlash drafter
with the confidence head) evaluated alone; its VP stage is not on the curve.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = Path("runs/curves")
DATA = RUNS / "data"
FAMILIES = ("d2sd", "dflash", "draft_lm", "hydra", "eagle3")
STEPS = 40_000  # the schedule's length: longer than any time limit lets a run go
BATCH = 8


def overrides(family: str, out: Path, data: Path, steps: int, every: int) -> list[str]:
    return [
        f"recipe={family}", f"output_dir={out}", f"distill.out={data}", "prompts.limit=0",
        f"train.steps={steps}", f"train.save_every={every}", f"train.eval_every={every}",
        f"train.log_every={min(every, 50)}", "train.keep_last=100000", "train.threads=1",
        f"train.batch_size={BATCH}", "final_eval.limit=0", "drafter.heldout_rows=128",
    ]  # fmt: skip


def build_data(rows: int) -> None:
    """The shared dataset: D²SD's teacher cache (its feature layers and the top-32 logprobs)
    serves dflash, d2sd and the draft LM; hydra (its logits) and eagle3 (its three taps) run the
    target online."""
    from data.distill import main as distill

    args = ["recipe=d2sd", f"distill.out={DATA}", f"prompts.limit={rows}", "train.threads=2"]
    if distill(args) != 0:
        raise SystemExit("the dataset build failed")


def subset(rows: int) -> Path:
    """The first ``rows`` rows of the shared dataset as a dataset of its own (the prompt set's
    prefix is a balanced sample, so this is the dataset ``prompts.limit=rows`` would build)."""
    import datasets

    out = RUNS / f"data-{rows}"
    if (out / "manifest.json").is_file():
        return out
    full = datasets.load_from_disk(str(DATA / "dataset"))
    if rows >= len(full):
        return DATA
    part = full.select(range(rows))
    part.save_to_disk(str(out / "dataset"))
    manifest = json.loads((DATA / "manifest.json").read_text())
    mask = part.with_format("numpy", dtype=None)["loss_mask"]
    manifest.update(rows=rows, response_tokens=int(sum(int(m.sum()) for m in mask)))
    manifest["prompts"]["limit"] = rows
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


class Exporter:
    """Turns a training checkpoint into a drafter folder ``infer.eval`` loads."""

    def __init__(self, args: list[str]):
        from models.drafter import TargetInfo
        from models.registry import DRAFTERS, load_families
        from models.target import load_target
        from recipes import load_config

        self.cfg = load_config(args)
        load_families()
        self.target, self.tokenizer = load_target(self.cfg.target, "auto", "cpu")
        self.info = TargetInfo.of(self.target, self.tokenizer, self.cfg.target)
        self.family = DRAFTERS[self.cfg.drafter.type]

    def export(self, ckpt: Path, folder: Path) -> Path:
        from safetensors.torch import load_file

        drafter = self.family.from_recipe(self.cfg.drafter, self.target, self.info,
                                          tokenizer=self.tokenizer)  # fmt: skip
        stage = drafter.stages()[0].module  # the drafter that drafts first
        stage.load_state_dict(load_file(ckpt / "model.safetensors"))
        return drafter.save_pretrained(folder)


def eval_tau(folder: Path, prompts: int, max_new: int, extra: list[str]) -> dict:
    from infer.eval import evaluate
    from infer.report import lossless_text
    from recipes import load_options
    from recipes.schema import EvalConfig

    options = load_options(EvalConfig, [
        f"limit={prompts}", f"max_new_tokens={max_new}", "threads=1", "card=false",
        f"out={folder / 'eval'}", *extra,
    ])  # fmt: skip
    overall = evaluate(str(folder), options)["overall"]
    return {"eval_tau": overall["tau"], "eval_speedup": overall["speedup"],
            "lossless": lossless_text(overall["lossless"])}  # fmt: skip


def log_records(out: Path) -> dict[int, dict]:
    path = out / "log.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records if r.get("stage", "first") in ("", "first")}


def stage_dir(out: Path) -> Path:
    ckpts = out / "checkpoints"
    return ckpts / "first" if (ckpts / "first").is_dir() else ckpts


def evaluate_landed(out: Path, exporter: Exporter, args, rows_meta: dict) -> int:
    """Evaluate every checkpoint not yet in ``curve.jsonl``; returns how many were."""
    from train.loop import checkpoints

    curve = out / "curve.jsonl"
    done = {r["step"] for r in read_curve(out)}
    logged = log_records(out)
    n = 0
    for ckpt in checkpoints(stage_dir(out)):
        step = int(ckpt.name[5:])
        if step in done or not (ckpt / "state.json").is_file():
            continue
        state = json.loads((ckpt / "state.json").read_text())
        folder = exporter.export(ckpt, out / "exported" / f"step-{step}")
        record = {
            "step": step, "train_seconds": round(state["seconds"], 1),
            "response_tokens_seen": step * BATCH * rows_meta["tokens_per_row"],
            **{k: v for k, v in logged.get(step, {}).items()
               if k.startswith("heldout_") or k == "loss"},
            **eval_tau(folder, args.eval_prompts, args.eval_tokens,
                       ["branches=0"] if exporter.cfg.drafter.type == "d2sd" else []),
        }  # fmt: skip
        with curve.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"{out.name} step {step}: "
            + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
            )
        )
        n += 1
    return n


def rows_meta(data: Path) -> dict:
    manifest = json.loads((data / "manifest.json").read_text())
    return {
        "rows": manifest["rows"],
        "tokens_per_row": manifest["response_tokens"] / manifest["rows"],
    }


class Stop:
    """Ctrl-C or SIGTERM to this process: stop the training child (it saves a checkpoint),
    evaluate what landed, and end; rerun the same command to go on."""

    raised = False

    @classmethod
    def install(cls) -> None:
        def handle(signum, frame):
            cls.raised = True

        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGTERM, handle)


def train(name: str, family: str, data: Path, args) -> None:
    """Train ``family`` on ``data`` in a child process for ``args.minutes`` (then SIGTERM: it
    saves and stops), evaluating its checkpoints here as they land; then the ones left."""
    out = RUNS / name
    steps = args.steps or STEPS
    cli = overrides(family, out, data, steps, args.every) + args.set
    exporter = Exporter(cli)
    meta = rows_meta(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = (RUNS / f"{name}.train.log").open("a")
    child = subprocess.Popen([sys.executable, str(ROOT / "train/drafter.py"), *cli],
                             stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)  # our signals are ours to pass on  # fmt: skip
    import torch

    torch.set_num_threads(1)
    deadline = time.time() + args.minutes * 60
    try:
        while child.poll() is None:
            if time.time() > deadline or Stop.raised:
                child.send_signal(signal.SIGTERM)
                child.wait()
                break
            if not evaluate_landed(out, exporter, args, meta):
                for _ in range(20):
                    if Stop.raised:
                        break
                    time.sleep(1)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            child.wait()
    evaluate_landed(out, exporter, args, meta)


def read_curve(out: Path) -> list[dict]:
    path = out / "curve.jsonl"
    if not path.is_file():
        return []
    return sorted((json.loads(line) for line in path.read_text().splitlines() if line),
                  key=lambda r: r["step"])  # fmt: skip


def plateau(curve: list[dict], key: str) -> dict | None:
    """The first point within 0.05 of the best ``key``: where the curve stops improving."""
    points = [r for r in curve if r.get(key) is not None]
    if not points:
        return None
    best = max(r[key] for r in points)
    return next(r for r in points if r[key] >= best - 0.05)


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from benchmarks.results import RESULTS_DIR, machine, write_section

    torch.set_num_threads(1)  # what the runs used: machine() names the threads
    lines = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs = [(f, RUNS / f) for f in FAMILIES] + sorted(
        (p.name, p) for p in RUNS.iterdir()
        if p.is_dir() and p.name not in FAMILIES and (p / "curve.jsonl").is_file())  # fmt: skip
    lines += ["| run | steps | train time | response tokens seen | held-out chain τ (log) | "
              "infer.eval τ (stdlib-eval) | best τ reached at |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, out in runs:
        curve = read_curve(out)
        if not curve:
            continue
        last = curve[-1]
        stop = plateau(curve, "eval_tau")
        held = next((r["heldout_tau"] for r in reversed(curve) if r.get("heldout_tau")), None)
        lines.append(
            f"| {name} | {last['step']} | {last['train_seconds'] / 60:.0f} min | "
            f"{last['response_tokens_seen'] / 1e6:.2f}M | "
            f"{'n/a' if held is None else f'{held:.2f}'} | {last['eval_tau']:.2f} "
            f"(best {max(r['eval_tau'] for r in curve):.2f}) | step {stop['step']}, "
            f"{stop['response_tokens_seen'] / 1e6:.2f}M tokens |"
        )
        axis = axes[1] if name.startswith("sizes-") else axes[0]
        xs = [r["response_tokens_seen"] / 1e6 for r in curve]
        (line,) = axis.plot(xs, [r["eval_tau"] for r in curve], marker=".",
                            label=f"{name} infer.eval")  # fmt: skip
        if any(r.get("heldout_tau") for r in curve):
            axis.plot([x for x, r in zip(xs, curve, strict=True) if r.get("heldout_tau")],
                      [r["heldout_tau"] for r in curve if r.get("heldout_tau")], "--",
                      color=line.get_color(), label=f"{name} held-out walk")  # fmt: skip
    points = ["", "Every checkpoint (step: held-out walk τ / infer.eval τ):", ""]
    for name, out in runs:
        curve = read_curve(out)
        if curve:
            points.append(f"- {name}: " + ", ".join(
                f"{r['step']}: " + (f"{r['heldout_tau']:.2f}" if r.get("heldout_tau") else "-")
                + f" / {r['eval_tau']:.2f}"
                for r in curve))  # fmt: skip
    lines += points
    for axis, title in zip(axes, ("families, one dataset", "dflash, data size"), strict=True):
        axis.set(xlabel="response tokens seen (M)", ylabel="τ (held-out)", title=title)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "learning_curves.png", dpi=110)
    text = "\n".join([
        "Measured by `python -m benchmarks.learning_curve` on " + machine() + ", one torch "
        "thread per run, each run beside another job (a second run, tests or a training), so the minutes are not a clean measure. Each family's recipe on one dataset (the "
        f"first {rows_meta(DATA)['rows']:,} `stdlib-distill` prompts that fit, x 128 greedy "
        "tokens of the embedded target), "
        f"batch {BATCH}, the schedule set for {STEPS} steps and stopped by time. `infer.eval τ`: "
        "each checkpoint exported and decoded greedily with the family's default drafting (a chain; "
        "Hydra: its 60-node tree; D²SD: drafter 1 alone) on 16 held-out `stdlib-eval` prompts x "
        "64 tokens, which moves by about ±0.2 from one checkpoint to the next; the held-out chain "
        "walk (Hydra: its rank-0 path) is the training log's. `sizes-N`: dflash "
        "for the same steps on the first N rows. Best τ reached at: the first checkpoint within "
        "0.05 of the run's best. A step off the grid is where a run was stopped (no walk).",
        "", *lines, "", "![learning curves](learning_curves.png)",
    ])  # fmt: skip
    title = "## Learning curves (`python -m benchmarks.learning_curve`)\n\n"
    write_section("learning_curve", title + text)
    print(text)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning_curve")
    parser.add_argument("what", choices=("data", "train", "sizes", "report"))
    parser.add_argument("family", nargs="?", choices=FAMILIES)
    parser.add_argument("--rows", default="", help="data: 8192; sizes: 512,2048,8190")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=0, help="schedule length (default 40,000)")
    parser.add_argument("--every", type=int, default=200, help="checkpoint + held-out walk")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override (repeatable), e.g. to pin what a run resumed "
                        "with after its recipe file changed")  # fmt: skip
    parser.add_argument("--name", default="", help="train: the run's folder under runs/curves "
                        "(default the family), e.g. d2sd-lr3e-3 with --set train.lr=3e-3")  # fmt: skip
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--eval-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    RUNS.mkdir(parents=True, exist_ok=True)
    Stop.install()
    if args.what == "data":
        build_data(int(args.rows or 8192))
    elif args.what == "train":
        if not args.family:
            parser.error(f"train needs a family: {', '.join(FAMILIES)}")
        train(args.name or args.family, args.family, DATA, args)
    elif args.what == "sizes":
        args.steps = args.steps or 1200
        for rows in (int(r) for r in (args.rows or "512,2048,8190").split(",")):
            if not Stop.raised:
                train(f"sizes-{rows}", "dflash", subset(rows), args)
    else:
        report()


if __name__ == "__main__":
    main(sys.argv[1:])
