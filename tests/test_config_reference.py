"""The configuration reference (hvpmtl.config_reference) and ``hvpmtl config --explain``."""

from __future__ import annotations

import dataclasses

import pytest

from hvpmtl.cli import main
from hvpmtl.config import Config, ConfigError, to_dict
from hvpmtl.config_reference import config_keys, explain, markdown, show


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v and k != "kwargs" else {f"{prefix}{k}": v})
    return out


def test_every_key_of_the_config_is_listed_once_with_its_default_and_help():
    keys = config_keys()
    names = [k.key for k in keys]
    assert len(names) == len(set(names))
    defaults = flat(to_dict(Config()))
    assert set(names) == set(defaults)
    for k in keys:
        plain = list(k.default) if isinstance(k.default, tuple) else k.default
        assert plain == defaults[k.key], k.key
        assert k.help.strip(), f"{k.key} has no help: give its field a comment or metadata={{'help': ...}}"


def test_help_comes_from_the_field_comment():
    (swav_norm,) = explain("tasks.swav.head_norm")
    assert "SyncBatchNorm" in swav_norm.help  # the comment on the field's line in objectives/swav.py
    (dataset,) = explain("data.dataset")
    assert "shards" in dataset.help  # the "# | ..." line below continues the comment


@dataclasses.dataclass
class Block:
    size: int = 3  # the comment
    name: str = dataclasses.field(default="a", metadata={"help": "from metadata"})


@dataclasses.dataclass
class Root:
    block: Block = dataclasses.field(default_factory=Block)


def test_help_from_metadata_wins():
    got = {k.key: k.help for k in config_keys(Root)}
    assert got == {"block.size": "the comment", "block.name": "from metadata"}


def test_explain_a_block_and_an_unknown_key():
    assert {k.key for k in explain("tasks.mlc")} >= {"tasks.mlc.weight", "tasks.mlc.eta", "tasks.mlc.reduction"}
    with pytest.raises(ConfigError, match="unknown config key 'tasks.mlc.wieght'"):
        explain("tasks.mlc.wieght")
    with pytest.raises(ConfigError):
        explain("tasks.ml")  # a prefix of a block's name is not a block


def test_markdown_has_a_table_per_block():
    page = markdown()
    assert "## `tasks.mlc`" in page and "## `train.wandb`" in page
    assert "| `tasks.mlc.weight` | `float` | `0.001` |" in page


def test_show_writes_values_as_yaml_does():
    shown = [show(v) for v in (None, True, "", "x", (1, 2), {"a": [1]})]
    assert shown == ["null", "true", '""', "x", "[1, 2]", "{a: [1]}"]


def test_cli_explain_one_key(capsys):
    assert main(["config", "--explain", "tasks.mlc.weight"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tasks.mlc.weight: float = 0.001")
    assert "alpha_1" in out and "Eq. (7)" in out


def test_cli_explain_shows_the_preset_value_where_it_differs(capsys):
    assert main(["config", "-c", "cpu-micro", "--explain", "tasks.mlc.weight"]) == 0
    assert "(here: 0.0016)" in capsys.readouterr().out


def test_cli_explain_all(capsys):
    assert main(["config", "--explain"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") > len(config_keys()) and "train.wandb.project: str" in out


def test_cli_explain_unknown_key_is_one_line_and_exit_2(capsys):
    assert main(["config", "--explain", "tasks.mlc.wieght"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'tasks.mlc.wieght'") and err.count("\n") == 1
