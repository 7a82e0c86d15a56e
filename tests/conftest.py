"""Shared fixtures: the untrained tiny model, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from grpo_dist.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with an untrained tiny Qwen2 (config, safetensors, tokenizer.json, chat template)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), size="tiny", seed=0)
