"""Shared fixtures: the untrained tiny model and its classifier variant, built once per session, and a
perturbed copy of the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from grpo_dist.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with an untrained tiny Qwen2 (config, safetensors, tokenizer.json, chat template)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), size="tiny", seed=0)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance for one test module (none started if one is up already)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's body with a one-label score head (a reward classifier)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-classifier"), size="tiny", seed=0, classifier=True)


@pytest.fixture(scope="module")
def hf_models(tiny_model_dir):
    """The checkpoint the engines start from, and a perturbed copy to push (embedding included:
    it is tied to the LM head)."""
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    new = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return {"base": base, "new": new}
