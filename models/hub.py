"""Publish a trained drafter folder to the Hugging Face Hub, with a generated model card.

The card (``README.md``) is rendered only from what the folder records: ``config.json``,
``training.json`` and, once measured, ``eval.json``, ``comparison.json`` (a multi-drafter run)
and ``tuned.json`` (drafting settings tuned to a device). Pushing accepts safetensors weights only.

    python -m models.hub FOLDER REPO_ID [--public] [--endpoint URL]   # card + push
    python -m models.hub FOLDER --card-only                           # just write README.md

The token comes from ``HF_TOKEN`` or a cached ``hf auth login``, never from the command line.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINING_NAME = "training.json"
EVAL_NAME = "eval.json"
COMPARISON_NAME = "comparison.json"  # the multi-drafter run it took part in (infer.eval)
TUNED_NAME = "tuned.json"  # drafting settings tuned to a device (infer/tune.py)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")

_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]{0,94}\w)?$")
_PLAIN_YAML = re.compile(r"^[A-Za-z0-9][\w./-]*$")


def is_hub_id(value: str) -> bool:
    """Whether ``value`` has the form of a Hub repo id, ``owner/name``."""
    return bool(_HUB_ID.match(value)) and ".." not in value and "--" not in value


def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path.parent} is not a drafter folder: no {path.name}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "lm_config" and isinstance(value, dict):  # a transformers config: its gist
            flat[f"{prefix}architecture"] = (
                f"{value.get('model_type')}, {value.get('num_hidden_layers')} layers, "
                f"width {value.get('hidden_size')}"
            )
        elif isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _cell(value: Any) -> str:
    if value is None or isinstance(value, bool):
        text = json.dumps(value).replace("null", "n/a")
    elif isinstance(value, float):
        text = repr(round(value, 4)) if not 0 < abs(value) < 1e-3 else f"{value:.3g}"
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, separators=(", ", ": "))
    else:
        text = str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(data: dict[str, Any], head: str) -> list[str]:
    rows = [f"| {head} | value |", "| --- | --- |"]
    return rows + [f"| `{key}` | {_cell(value)} |" for key, value in _flatten(data).items()]


def render_model_card(folder: Path | str, repo_id: str | None = None) -> str:
    """Render the Hugging Face model card (``README.md``) of a drafter folder.

    Args:
        folder: drafter folder; ``config.json`` is required, ``training.json`` and ``eval.json``
            are rendered when present (evaluation reads "not measured yet" otherwise).
        repo_id: Hub id for the usage line; defaults to a ``<repo_id or path>`` placeholder.

    Returns:
        Markdown with YAML front matter (``base_model`` only for an ``owner/name`` target id).

    Raises:
        FileNotFoundError: no ``config.json``. ValueError: a malformed JSON file.
    """
    folder = Path(folder)
    config = _read_json(folder / CONFIG_NAME, required=True)
    training = _read_json(folder / TRAINING_NAME)
    evaluation = _read_json(folder / EVAL_NAME)
    kind = str(config.get("drafter_type", "unknown"))
    target = config.get("target") or {}
    target_id = str(target.get("id", "unknown"))

    tags = ("speculative-decoding", "drafter", kind)
    lines = ["---", "library_name: draftkit", "tags:"]
    lines += [f"- {t if _PLAIN_YAML.match(t) else json.dumps(t)}" for t in tags]
    if is_hub_id(target_id):
        lines.append(f"base_model: {target_id}")
    lines += ["---", "", f"# {kind} drafter for `{target_id}`", "", "## What it is", ""]
    lines += [
        f"A **{kind}** drafter for speculative decoding, trained with draftkit: it proposes "
        f"tokens that the target model `{target_id}` verifies, so generation gets faster while "
        "the output stays the target's own. It only works with the target it was trained for:",
        "",
        *_table(target, "target"),
    ]
    if config.get("drafter"):
        lines += ["", "Drafter configuration:", "", *_table(config["drafter"], "drafter")]

    usage = repo_id or "<repo_id or path>"
    lines += ["", "## How to use", "", "```bash", f"python -m infer.eval {usage}", "```"]
    lines += ["", "## Training", ""]
    if not training:
        lines.append("No training record (`training.json`) was saved with this drafter.")
    else:
        lines.append(f"Recipe: `{training.get('recipe', 'unknown')}`")
        if training.get("command"):
            lines += ["", "Command:", "", "```bash", str(training["command"]), "```"]
        for key, title, head in (("data", "Data", "data"), ("metrics", "Metrics", "metric")):
            if training.get(key):
                lines += ["", f"### {title}", "", *_table(training[key], head)]
        if training.get("config"):
            recipe = json.dumps(training["config"], indent=2, sort_keys=True)
            lines += ["", "### Resolved recipe", "", "```json", recipe, "```"]

    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += _table(evaluation, "measure")
    else:
        lines.append("Acceptance and speed-up are not measured yet (`python -m infer.eval`).")
    lines += _comparison(_read_json(folder / COMPARISON_NAME))
    lines += _tuned(_read_json(folder / TUNED_NAME))
    return "\n".join(lines) + "\n"


def _comparison(record: dict[str, Any]) -> list[str]:
    """The rows of the multi-drafter run this drafter took part in (``comparison.json``)."""
    if not record.get("rows"):
        return []
    lines = [
        "", "### Compared with other drafters in one run", "",
        f"{record.get('n_prompts')} prompts of `{record.get('prompts')}`, "
        f"{record.get('max_new_tokens')} new tokens, temperature {record.get('temperature')}, "
        f"on {record.get('device')}; speedup over plain decoding in the same run (Spec-Bench: "
        "mean per-prompt tokens/s over plain decoding's), mean of per-prompt time ratios beside "
        "it. This drafter's rows are in bold.", "",
        "| drafter | family | drafting | τ | speedup | mean time ratio | lossless |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for row in sorted(record["rows"], key=lambda r: -r.get("speedup", 0)):
        cells = [_cell(row.get(k)) for k in ("drafter", "family", "drafting")]
        cells += [f"{row.get('tau', 0):.2f}", f"{row.get('speedup', 0):.2f}x",
                  f"{row.get('speedup_ratio_mean', 0):.2f}x", _cell(row.get("lossless"))]  # fmt: skip
        if row.get("this drafter"):
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _tuned(record: dict[str, Any]) -> list[str]:
    """The drafting settings tuned to a device (``tuned.json``), predicted and measured."""
    if "settings" not in record:
        return []
    chosen = " ".join(f"`{k}={_cell(v)}`" for k, v in record["settings"].items()) or "its defaults"
    predicted = record.get("predicted", {})
    lines = [
        "", "## Tuned drafting settings", "",
        f"Tuned on {record.get('device')} ({record.get('tuned_at', '')}): {chosen}, used by "
        "`infer.eval` by default (`tuned=false` or any option you set overrides them).", "",
        "| | τ | speedup |", "| --- | --- | --- |",
        f"| predicted (cost model, T = 0 replay) | {predicted.get('tau', 0):.2f} | "
        f"{predicted.get('predicted_speedup', 0):.2f}x |",
    ]  # fmt: skip
    defaults = record.get("defaults")
    if defaults:
        lines.append(
            f"| predicted with the defaults | {defaults['tau']:.2f} | "
            f"{defaults['predicted_speedup']:.2f}x |"
        )
    measured = record.get("measured")
    if measured:
        lines.append(
            f"| measured ({measured['n_prompts']} prompts, T = {measured['temperature']}) | "
            f"{measured['tau']:.2f} | {measured['speedup']:.2f}x |"
        )
    return lines


def write_model_card(folder: Path | str, repo_id: str | None = None) -> Path:
    """Write ``folder/README.md`` (see :func:`render_model_card`) and return its path."""
    path = Path(folder) / CARD_NAME
    path.write_text(render_model_card(folder, repo_id=repo_id), encoding="utf-8")
    return path


def check_drafter_folder(folder: Path | str) -> dict[str, Any]:
    """Check that ``folder`` is a publishable drafter and return its ``config.json``.

    Raises:
        FileNotFoundError: the folder, ``config.json`` or ``model.safetensors`` is missing.
        ValueError: no ``drafter_type`` in the config, or a pickle-based file is present.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"drafter folder {folder} does not exist")
    config = _read_json(folder / CONFIG_NAME, required=True)
    if not config.get("drafter_type"):
        raise ValueError(f"{folder / CONFIG_NAME} has no 'drafter_type': not a drafter config")
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a drafter folder: no {WEIGHTS_NAME}")
    pickled = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        names = ", ".join(str(p.relative_to(folder)) for p in pickled)
        raise ValueError(
            f"refusing to push {names} from {folder}: pickle files can run code when loaded; "
            f"drafters are published as safetensors only ({WEIGHTS_NAME}), remove them"
        )
    return config


def check_repo_id(repo_id: str) -> None:
    """Raise ValueError naming ``repo_id`` unless it has the Hub form ``owner/name``."""
    if not is_hub_id(repo_id):
        raise ValueError(
            f"bad repo id {repo_id!r}: expected the form owner/name (letters, digits, '-', '_', "
            "'.'), e.g. my-org/draft-lm-llama"
        )


def push_drafter(
    folder: Path | str,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Write the model card, then push the drafter folder to a Hub repo (created if missing).

    Args:
        folder: drafter folder (``config.json`` + ``model.safetensors``, no pickle files).
        repo_id: ``owner/name``.
        private: visibility of a newly created repo (an existing repo keeps its own).
        token: default: huggingface_hub's resolution (``HF_TOKEN``, else a cached login).
            Never printed nor written to any file.
        endpoint: Hub URL; default: huggingface_hub's (``HF_ENDPOINT`` or huggingface.co).
        commit_message: default: "Upload <drafter_type> drafter (draftkit)".

    Returns:
        The URL of the commit (the repo URL if the client reports none).

    Raises:
        FileNotFoundError, ValueError: folder or repo id refused, or a file (not the weights)
            contains the token; nothing was sent. RuntimeError: offline mode, or no token.
    """
    config = check_drafter_folder(folder)
    check_repo_id(repo_id)
    from huggingface_hub import HfApi, constants, get_token

    # huggingface_hub reads HF_HUB_OFFLINE once, at import, and then refuses every request.
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError("HF_HUB_OFFLINE is set: unset it to push to the Hub")
    secret = token or get_token()
    if not secret:
        raise RuntimeError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    card, card_path = render_model_card(folder, repo_id=repo_id), Path(folder) / CARD_NAME
    others = [p for p in Path(folder).rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    leaked = [str(p) for p in others if p != card_path and secret.encode() in p.read_bytes()]
    if leaked or secret in card:  # e.g. a training command that carried HF_TOKEN=...
        names = ", ".join(leaked or [f"the card rendered into {card_path}"])
        raise ValueError(f"refusing to push: {names} would publish your Hub token")
    card_path.write_text(card, encoding="utf-8")
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or f"Upload {config['drafter_type']} drafter (draftkit)",
    )
    return str(getattr(commit, "commit_url", None) or repo_url)


def main(argv: list[str]) -> int:
    """Command line (see the module docstring); returns 0, or 2 after ``error: ...`` on stderr."""
    if any(arg == "--token" or arg.startswith("--token=") for arg in argv):
        print(
            "error: --token is refused on the command line (it would leak into shell history "
            "and process lists); set the HF_TOKEN environment variable instead",
            file=sys.stderr,
        )
        return 2
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # report as main()'s "error: ..." instead of exiting
            raise ValueError(message)

    parser = Parser(prog="python -m models.hub", allow_abbrev=False, description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("folder", help="drafter folder (config.json + model.safetensors)")
    parser.add_argument("repo_id", nargs="?", help="Hub repo, owner/name")
    parser.add_argument("--card-only", action="store_true", help="only write README.md")
    parser.add_argument("--public", action="store_true", help="create the repo public")
    parser.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--commit-message", help="commit message of the upload")
    try:
        args = parser.parse_args(argv)
        if args.repo_id is not None:
            check_repo_id(args.repo_id)
        if args.card_only:
            print(write_model_card(args.folder, repo_id=args.repo_id))
            return 0
        if args.repo_id is None:
            raise ValueError("REPO_ID is required to push (or pass --card-only)")
        print(
            push_drafter(
                args.folder,
                args.repo_id,
                private=not args.public,
                endpoint=args.endpoint,
                commit_message=args.commit_message,
            )
        )
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except Exception as err:  # the CLI boundary: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
