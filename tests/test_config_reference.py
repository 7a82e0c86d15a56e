"""The configuration reference (docs/configuration.md) is generated from the schema and kept current:
every field is described there, every section and nested model has its heading, every validator
states its rules."""

from __future__ import annotations

import re

import pytest

from grpo_dist import config_reference as ref
from grpo_dist.config import Config

NODES = ref.nodes()
MODELS = [Config, *dict.fromkeys(node.model for node in NODES)]
HEADINGS = {line for line in ref.render().splitlines() if line.startswith("#")}


def test_every_model_reachable_from_config_is_a_node():
    names = {node.model.__name__ for node in NODES}
    assert {"ModelConfig", "LoraConfig", "SyntheticTaskConfig", "RewardSpec", "RolloutCorrectionConfig"} <= names
    assert {"MultiTurnConfig", "ClusterConfig"} <= names
    assert [node.path for node in NODES if node.level == 2] == list(Config.model_fields)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_has_a_description(model):
    missing = [name for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"{model.__name__}: fields without a description: {missing}"


def test_the_page_is_current():
    assert ref.PAGE.is_file(), "docs/configuration.md is missing: run `python -m grpo_dist.config_reference --write`"
    assert ref.PAGE.read_text(encoding="utf-8") == ref.render(), (
        "docs/configuration.md is older than grpo_dist/config.py: run `python -m grpo_dist.config_reference --write`"
    )


@pytest.mark.parametrize("path", [*Config.model_fields, *(n.path for n in NODES if n.level > 2)])
def test_every_section_and_nested_model_has_its_heading(path):
    level = 2 if path in Config.model_fields else 3
    assert f"{'#' * level} {path}" in HEADINGS


def test_nested_paths():
    paths = {node.path for node in NODES}
    assert {"model.lora", "data.synthetic", "rewards.functions[]", "algorithm.rollout_correction"} <= paths
    assert "rollout.multi_turn" in paths
    assert "## Rules across sections" in HEADINGS


VALIDATORS = [(model, name, func) for model in MODELS for name, func in ref.validators(model)]


def test_validators_are_found():
    found = {f"{model.__name__}.{name}" for model, name, _ in VALIDATORS}
    assert {"Config._cross_checks", "AlgoConfig._renamed", "ClusterConfig._selector_syntax"} <= found


@pytest.mark.parametrize(("model", "name", "func"), VALIDATORS, ids=lambda x: x if isinstance(x, str) else "")
def test_every_validator_states_its_rules(model, name, func):
    assert func.__doc__, f"{model.__name__}.{name} has no docstring listing its rules"
    assert any(line.strip().startswith("- ") for line in func.__doc__.splitlines()), (
        f"{model.__name__}.{name}: its docstring has no `- ` rule line"
    )
    assert ref.rules(func)


def test_rules_join_their_continuation_lines():
    def v():
        """Intro, not a rule.

        - one rule
          that goes on
        - another"""

    assert ref.rules(v) == ["one rule that goes on", "another"]


def test_rendering_of_types_defaults_and_constraints():
    page = ref.render()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", page, re.M)}
    assert '| "token" \\| "sequence" \\| "geometric" | `token` |' in rows["level"]
    assert "| str \\| None | `null` |" in rows["tokenizer_path"]
    assert "| [LoraConfig](#modellora) \\| None | `null` |" in rows["lora"]
    assert (
        "| list[[RewardSpec](#rewardsfunctions)] | `[{name: accuracy}, {name: format, weight: 0.2}]` |"
        in (rows["functions"])
    )
    assert "| `1.0e-05` | `> 0` |" in rows["lr"]
    assert "| bool | `false` |" in rows["gradient_checkpointing"]
    assert "`>= 0`, `< 1`" in rows["dropout"]
    assert "`len >= 1`" in rows["target_modules"]
    assert "| str | required |" in rows["name"]
    assert "clip_ratio_c * \\|A\\|" in rows["clip_ratio_c"]  # a pipe in a description does not split the row
    for row in rows.values():  # five cells: six pipes outside code spans, none unescaped in a cell
        assert len(re.findall(r"(?<!\\)\|", re.sub(r"`[^`]*`", "", row))) == 6, row


def test_anchors_resolve():
    markdown = pytest.importorskip("markdown")
    html = markdown.markdown(ref.render(), extensions=["tables", "toc"])
    ids = set(re.findall(r'id="([^"]+)"', html))
    links = set(re.findall(r'href="#([^"]+)"', html))
    assert links and links <= ids, f"links to missing anchors: {sorted(links - ids)}"


def test_check_reports_a_stale_page(tmp_path, monkeypatch, capsys):
    page = tmp_path / "configuration.md"
    monkeypatch.setattr(ref, "PAGE", page)
    assert ref.main(["--check"]) == 1
    page.write_text("stale\n")
    assert ref.main(["--check"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("python -m grpo_dist.config_reference --write" in line for line in err)
    assert ref.main(["--write"]) == 0
    assert page.read_text() == ref.render()
    assert ref.main(["--check"]) == 0
