"""What can be checked of the CUDA flavour without a GPU (run by scripts/check_gpu_stack.sh inside
the `gpu` venv). Each check prints one line `ok|FAIL <what>: <detail>`; the exit code is the
number of failures."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
failures = 0


def check(what: str, fn) -> None:
    global failures
    try:
        detail = fn()
        print(f"ok   {what}" + (f": {detail}" if detail else ""))
    except Exception as e:  # report every failing check, not just the first
        failures += 1
        print(f"FAIL {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def versions() -> str:
    import deepspeed
    import ray
    import torch
    import transformers
    import vllm

    return (
        f"vllm {vllm.__version__}, torch {torch.__version__} (CUDA build {torch.version.cuda}), "
        f"transformers {transformers.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}"
    )


def import_all() -> str:
    names = []
    for pkg in ("grpo_dist", "rollout_server", "reward_server", "learner", "deploy"):
        mod = importlib.import_module(pkg)
        names.append(pkg)
        for info in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}."):
            if info.name.endswith("entrypoint"):
                continue  # a script: it runs a job on import
            importlib.import_module(info.name)
            names.append(info.name)
    return f"{len(names)} modules"


def gpu_configs():
    from grpo_dist.config import load_config

    return {p.name: load_config(p) for p in sorted((ROOT / "deploy" / "configs").glob("*gpu*.yaml"))}


def validate_configs() -> str:
    from grpo_dist.cli import main

    for name in gpu_configs():
        rc = main(["validate", str(ROOT / "deploy" / "configs" / name)])
        if rc:
            raise RuntimeError(f"grpo-dist validate {name} exited {rc}")
    return ", ".join(gpu_configs())


def engine_args() -> str:
    import vllm

    from rollout_server.worker import engine_kwargs

    out = []
    for name, cfg in gpu_configs().items():
        for tp in sorted({cfg.rollout.tensor_parallel_size, 2}):
            rollout = cfg.rollout.model_copy(update={"tensor_parallel_size": tp})
            kw = engine_kwargs(rollout, cfg.model, cfg.max_model_len, cuda=True)
            # vllm.LLM forwards its keyword arguments into EngineArgs: an unknown or renamed one is a TypeError.
            args = vllm.EngineArgs(**kw)
            assert args.worker_extension_cls == kw["worker_extension_cls"] and args.tensor_parallel_size == tp
            out.append(f"{name} tp={tp}")
    return ", ".join(out)


def deepspeed_bf16() -> str:
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig

    from learner.ds_config import build_ds_config, ref_ds_config

    # Without torch.distributed DeepSpeed parses for a world of 1 (the batch arithmetic per world
    # size is unit-tested in tests/test_learner_unit.py).
    for cfg in gpu_configs().values():
        ds = build_ds_config(cfg.learner, torch.bfloat16, 1, cfg.gradient_accumulation_steps)
        parsed = DeepSpeedConfig(ds)
        assert parsed.bfloat16_config.enabled and parsed.zero_optimization_stage == cfg.learner.zero_stage
        assert DeepSpeedConfig(
            ref_ds_config(3, torch.bfloat16, cfg.learner.micro_batch_size, 1)
        ).bfloat16_config.enabled
    return "policy and ZeRO-3 reference configs parse with bf16"


def worker_methods() -> str:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from rollout_server.vllm_extension import WeightSyncExtension

    # The extension calls self.reload_weights(weights_iterator=...), which Worker forwards to its
    # model runner, and reads self.model_runner, self.device and self.rank.
    assert "self.model_runner.reload_weights(" in inspect.getsource(Worker.reload_weights)
    params = inspect.signature(GPUModelRunner.reload_weights).parameters
    assert "weights_iterator" in params, (
        f"GPUModelRunner.reload_weights{inspect.signature(GPUModelRunner.reload_weights)}"
    )
    src = inspect.getsource(Worker)
    for attr in ("model_runner", "device", "rank"):
        assert re.search(rf"self\.{attr}\s*(:[^=\n]*)?=", src), f"Worker sets no self.{attr}"
    assert hasattr(GPUModelRunner, "get_model")
    clash = [m for m in vars(WeightSyncExtension) if not m.startswith("__") and hasattr(Worker, m)]
    assert not clash, f"extension methods shadow Worker's: {clash}"
    return (
        "Worker.reload_weights -> GPUModelRunner.reload_weights(weights_iterator=...), get_model, "
        "model_runner/device/rank set; no name clashes"
    )


def lora_api() -> str:
    import vllm
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from grpo_dist.config import LoraConfig
    from grpo_dist.lora import peft_config_dict
    from rollout_server.worker import engine_kwargs

    # What WeightSyncExtension.grpo_receive_adapter and RolloutWorker._load_adapter call.
    params = inspect.signature(LoRAModel.from_lora_tensors).parameters
    for name in (
        "lora_model_id",
        "tensors",
        "peft_helper",
        "device",
        "dtype",
        "model_vocab_size",
        "weights_mapper",
        "skip_prefixes",
    ):
        assert name in params, (
            f"LoRAModel.from_lora_tensors has no {name!r}: {inspect.signature(LoRAModel.from_lora_tensors)}"
        )
    PEFTHelper.from_dict(peft_config_dict(LoraConfig(rank=16), "base"))
    for m in ("list_adapters", "remove_adapter", "_adapter_manager"):
        assert m in inspect.getsource(LRUCacheWorkerLoRAManager) or hasattr(LRUCacheWorkerLoRAManager, m), m
    assert "self.lora_manager = LRUCacheWorkerLoRAManager(" in inspect.getsource(
        inspect.getmodule(GPUModelRunner.load_lora_model)
    )
    LoRARequest("grpo-policy", 1, lora_path="grpo-dist:in-memory/v1")
    for cfg in gpu_configs().values():
        model = cfg.model.model_copy(update={"lora": LoraConfig(rank=16)})
        kw = engine_kwargs(cfg.rollout, model, cfg.max_model_len, cuda=True)
        args = vllm.EngineArgs(**kw)
        assert args.enable_lora and args.max_lora_rank == 16 and args.max_loras == 1
    return "LoRAModel.from_lora_tensors, PEFTHelper.from_dict, LRUCacheWorkerLoRAManager, LoRA engine kwargs"


def nccl_sync_api() -> str:
    import threading

    import torch
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup
    from vllm.utils.nccl import unpinned_nccl_env

    from grpo_dist.weight_sync import NcclSyncGroup, open_sync_store, store_barrier

    # What NcclSyncGroup calls: PyNcclCommunicator(group, device), .disabled, .broadcast(tensor, src=,
    # stream=), .destroy(); StatelessProcessGroup(rank=, world_size=, store=); unpinned_nccl_env().
    params = list(inspect.signature(PyNcclCommunicator.__init__).parameters)
    assert params[1:3] == ["group", "device"], f"PyNcclCommunicator{inspect.signature(PyNcclCommunicator.__init__)}"
    assert "self.disabled = True" in inspect.getsource(PyNcclCommunicator.__init__)
    bcast = inspect.signature(PyNcclCommunicator.broadcast).parameters
    assert {"tensor", "src", "stream"} <= set(bcast), f"broadcast{inspect.signature(PyNcclCommunicator.broadcast)}"
    assert callable(PyNcclCommunicator.destroy) and callable(unpinned_nccl_env)
    assert callable(torch.cuda.set_stream) and hasattr(torch.cuda.Event, "query")
    src = inspect.getsource(NcclSyncGroup)
    assert "StatelessProcessGroup(rank=rank, world_size=sync_group_size, store=store)" in src
    # The rendezvous half runs without a device: the store barrier, then the unique-id broadcast
    # PyNcclCommunicator makes through a StatelessProcessGroup on our store, between two threads.
    store = open_sync_store(30)
    peer = torch.distributed.TCPStore("127.0.0.1", store.port, None, is_master=False)
    got = []

    def receiver():
        store_barrier(peer, 1, 2, 30)
        got.append(StatelessProcessGroup(rank=1, world_size=2, store=peer).broadcast_obj(None, src=0))

    t = threading.Thread(target=receiver)
    t.start()
    store_barrier(store, 0, 2, 30)
    StatelessProcessGroup(rank=0, world_size=2, store=store).broadcast_obj(b"unique-id", src=0)
    t.join(30)
    assert got == [b"unique-id"], got
    return (
        "PyNcclCommunicator(group, device).broadcast(tensor, src, stream)/.destroy(), StatelessProcessGroup on "
        "our TCPStore (barrier + unique-id broadcast ran), unpinned_nccl_env"
    )


if __name__ == "__main__":
    for what, fn in [
        ("stack", versions),
        ("every module imports", import_all),
        ("grpo-dist validate accepts the GPU configs", validate_configs),
        ("GPU engine kwargs build vllm.EngineArgs (extension, TP)", engine_args),
        ("bf16 DeepSpeed configs", deepspeed_bf16),
        ("extension's Worker API", worker_methods),
        ("vLLM LoRA API the adapter sync calls", lora_api),
        ("NCCL weight-sync communicator API", nccl_sync_api),
    ]:
        check(what, fn)
    print(f"{failures} failed")
    sys.exit(failures)
