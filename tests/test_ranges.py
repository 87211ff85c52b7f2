"""Every numeric setting has a valid range, checked when the config is loaded (before the target
is loaded or any data is built); the error names the key, the bad value and the valid range.

The table is the schema itself: a numeric field added later without ``ranged(...)`` fails
``test_every_numeric_field_declares_a_range``, and its out-of-range values are tried here
automatically.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

import train.drafter as drafter_entry
from recipes import ConfigError, check_ranges, load_config, load_options, numeric_fields
from recipes.schema import Config, EvalConfig, Range, parse_range, ranged


def outside(valid: Range, is_int: bool) -> list[float]:
    """Values just outside each finite bound of ``valid``."""
    step = 1 if is_int else 0.5
    bad = []
    if valid.low is not None:
        bad.append(valid.low if valid.low_open else valid.low - step)
    if valid.high is not None:
        bad.append(valid.high if valid.high_open else valid.high + step)
    return [int(v) if is_int else v for v in bad]


def cases(schema: type) -> list[tuple[str, str, float, Range]]:
    """(key, override item, bad value, range) for every bound of every numeric field."""
    found = []
    for key, f in numeric_fields(schema).items():
        valid = f.metadata["range"]
        is_list = str(f.type).startswith("list")
        for bad in outside(valid, is_int="int" in str(f.type)):
            item = f"{key}=[{bad}]" if is_list else f"{key}={bad}"
            found.append((key, item, bad, valid))
    return found


CONFIG_CASES = cases(Config)
EVAL_CASES = cases(EvalConfig)


def _named(cases_):
    return [pytest.param(*case, id=case[1]) for case in cases_]


@pytest.mark.parametrize("schema", [Config, EvalConfig], ids=lambda s: s.__name__)
def test_every_numeric_field_declares_a_range(schema):
    fields = numeric_fields(schema)
    assert len(fields) >= (40 if schema is Config else 8)
    missing = [key for key, f in fields.items() if "range" not in f.metadata]
    assert missing == [], f"numeric settings without a range (use recipes.schema.ranged): {missing}"
    check_ranges(schema())  # the defaults themselves are valid


@dataclasses.dataclass
class Section:
    ok: int = ranged(1, ">=1")
    forgot: float = 0.5  # a later field without a range


@dataclasses.dataclass
class Root:
    section: Section = dataclasses.field(default_factory=Section)


def test_a_field_without_a_range_is_caught():
    with pytest.raises(TypeError, match="'section.forgot' is numeric but declares no range"):
        check_ranges(Root())


def _check_message(exc: ConfigError, key: str, bad: float, valid: Range) -> None:
    message = str(exc)
    found = re.match(rf"^{re.escape(key)}=(\S+): out of range, valid values are (.+)$", message)
    assert found, message
    assert float(found.group(1)) == bad and found.group(2) == str(valid)


@pytest.mark.parametrize("key,item,bad,valid", _named(CONFIG_CASES))
def test_recipe_setting_out_of_range_is_refused(key, item, bad, valid):
    with pytest.raises(ConfigError) as caught:
        load_config(["recipe=draft_lm", item])
    _check_message(caught.value, key, bad, valid)


@pytest.mark.parametrize("key,item,bad,valid", _named(EVAL_CASES))
def test_eval_option_out_of_range_is_refused(key, item, bad, valid):
    with pytest.raises(ConfigError) as caught:
        load_options(EvalConfig, [item])
    _check_message(caught.value, key, bad, valid)


def test_the_table_covers_the_issue_examples():
    items = {item for _, item, _, _ in CONFIG_CASES}
    assert {"train.batch_size=0", "train.lr=0.0", "distill.top_p=0.0", "seed=-1"} <= items


@pytest.mark.parametrize(
    "spec,inside,outside_",
    [(">=1", [1, 5], [0, -1]), (">0", [1e-9], [0, -1]), ("[0, 1]", [0, 1], [-0.1, 1.1]),
     ("(0, 1]", [1, 0.5], [0, 1.5]), ("(0, 1)", [0.5], [0, 1])],
)  # fmt: skip
def test_range_specs(spec, inside, outside_):
    valid = parse_range(spec)
    assert all(v in valid for v in inside) and not any(v in valid for v in outside_)
    assert float("nan") not in valid


def test_out_of_range_fails_before_the_target_or_data(monkeypatch, capsys, tmp_path):
    def forbidden(*args, **kwargs):
        raise AssertionError("nothing may be loaded or built for an invalid config")

    monkeypatch.setattr(drafter_entry, "load_target", forbidden)
    monkeypatch.setattr(drafter_entry, "ensure_dataset", forbidden)
    for item in ("train.batch_size=0", "train.steps=-5"):
        assert drafter_entry.main(["recipe=draft_lm", item, f"output_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {item}: out of range, valid values are [1, inf)"), err
    assert not any(tmp_path.iterdir())
