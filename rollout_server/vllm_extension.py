"""vLLM worker extension: receive weights from the learner into a running engine.

vLLM mixes this class into its GPU/CPU worker (``worker_extension_cls``), so ``self`` is the
vLLM worker (``self.model_runner``, ``self.device``, ``self.rank``); the rollout actor calls
the methods through ``LLM.collective_rpc``, which runs them on every engine worker (each
tensor-parallel rank receives the full HF tensors and its weight loader keeps its shard).

The weight-sync group is built per update on a fresh port and destroyed afterwards: nothing
outlives an update, so a restarted learner or rollout worker simply joins the next one.
"""

from __future__ import annotations

import time

import torch

from grpo_dist.weight_sync import ParamSpec, init_sync_group, pick_backend, recv_weights


def tied_followers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose ``weight`` Parameter is the same object as an earlier module's.

    With tied embeddings vLLM's ``lm_head`` shares ``embed_tokens.weight``; the checkpoint has
    no ``lm_head.weight``, so an in-place reload never reprocesses ``lm_head``.
    """
    seen: set[int] = set()
    out = []
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        if id(weight) in seen:
            out.append(module)
        seen.add(id(weight))
    return out


def refresh_tied_modules(model: torch.nn.Module) -> int:
    """Rebuild derived kernel state of tied modules after a reload (CPU only); returns how many.

    On CPU, ``process_weights_after_loading`` packs each linear weight into a oneDNN/SGL
    kernel closure (``layer.cpu_linear``). ``lm_head`` keeps the closure packed from the
    *initial* embedding, so after a reload the logits would come from stale weights while the
    embedding lookup uses new ones (measured: log-probs then match neither weight set).
    """
    n = 0
    for module in tied_followers(model):
        quant_method = getattr(module, "quant_method", None)
        if quant_method is not None and hasattr(module, "cpu_linear"):
            quant_method.process_weights_after_loading(module)
            n += 1
    return n


class WeightSyncExtension:
    """Methods injected into vLLM's worker; called via ``llm.collective_rpc(name, args=...)``."""

    def grpo_receive_weights(
        self,
        manifest: list[ParamSpec],
        host: str,
        port: int,
        rank_offset: int,
        sync_group_size: int,
        timeout_s: float,
        bucket_bytes: int,
    ) -> dict[str, float]:
        """Join the sync group as rank ``rank_offset + self.rank``, stream every bucket into the
        model in place, then refresh tied modules. Blocks until the update is loaded.

        The caller has already checked ``manifest`` against the HF checkpoint's parameters.
        ``grpo_weights_partial()`` tells whether a failure left the model half-updated.
        """
        t0 = time.perf_counter()
        rank = rank_offset + self.rank
        group = init_sync_group(
            host, port, rank, sync_group_size, timeout_s, pick_backend(self.device), device=self.device
        )
        t_join = time.perf_counter()
        try:
            # From the first tensor on, a failure leaves a mix of old and new weights.
            self._grpo_partial = True
            # The worker's reload_weights (not the model runner's) sets vLLM's current-config context.
            self.reload_weights(weights_iterator=recv_weights(group, manifest, bucket_bytes, self.device))
            refreshed = refresh_tied_modules(self.model_runner.get_model()) if self.device.type == "cpu" else 0
            self._grpo_partial = False
        finally:
            # Dropping the group frees it (a gloo group has no default group to destroy it through;
            # an NCCL group aborts its communicator).
            del group
        t_end = time.perf_counter()
        return {
            "join_seconds": t_join - t0,
            "load_seconds": t_end - t_join,
            "bytes": float(sum(s.nbytes for s in manifest)),
            "tied_refreshed": float(refreshed),
        }

    def grpo_weights_partial(self) -> bool:
        return getattr(self, "_grpo_partial", False)

    def grpo_receive_adapter(
        self,
        manifest: list[ParamSpec],
        host: str,
        port: int,
        rank_offset: int,
        sync_group_size: int,
        timeout_s: float,
        bucket_bytes: int,
        lora_id: int,
        peft_config: dict,
    ) -> dict[str, float]:
        """Join the sync group, receive the LoRA adapter's tensors (PEFT names) and serve them as
        adapter ``lora_id`` (``_grpo_install_adapter``). Nothing is installed until every tensor has
        arrived, so a failure leaves the previous adapter (or the base model) serving."""
        self._grpo_lora_manager()
        t0 = time.perf_counter()
        group = init_sync_group(
            host,
            port,
            rank_offset + self.rank,
            sync_group_size,
            timeout_s,
            pick_backend(self.device),
            device=self.device,
        )
        t_join = time.perf_counter()
        try:
            # Views of one flat buffer per bucket; from_lora_tensors copies them into the adapter.
            tensors = dict(recv_weights(group, manifest, bucket_bytes, self.device))
        finally:
            del group
        self._grpo_install_adapter(tensors, lora_id, peft_config)
        return {
            "join_seconds": t_join - t0,
            "load_seconds": time.perf_counter() - t_join,
            "bytes": float(sum(s.nbytes for s in manifest)),
            "tied_refreshed": 0.0,
        }

    def grpo_zero_adapter(self, manifest: list[ParamSpec], lora_id: int, peft_config: dict) -> None:
        """Serve an adapter of zeros as ``lora_id``: the base model's outputs exactly (B = 0, as a
        fresh PEFT adapter), under the id every later version reuses."""
        self._grpo_lora_manager()
        tensors = {s.name: torch.zeros(s.shape, dtype=s.torch_dtype) for s in manifest}
        self._grpo_install_adapter(tensors, lora_id, peft_config)

    def _grpo_lora_manager(self):
        manager = getattr(self.model_runner, "lora_manager", None)
        if manager is None:
            raise RuntimeError("this engine was built without LoRA (vLLM enable_lora=False); it cannot take an adapter")
        return manager

    def _grpo_install_adapter(self, tensors: dict[str, torch.Tensor], lora_id: int, peft_config: dict) -> None:
        """Register ``tensors`` (built in memory, no files) as adapter ``lora_id`` in place of every
        adapter held: the engine holds one, the current version. Registering under an id that running
        requests carry makes their next step run the new adapter: vLLM copies a registered adapter
        into its slot when a step finds the id inactive, and removing it deactivated it. If the new
        one is refused, the old ones are put back: a requested id vLLM does not hold would be loaded
        from its path, which does not exist, and the engine would fail."""
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        manager = self._grpo_lora_manager()
        helper = PEFTHelper.from_dict(peft_config)
        helper.validate_legal(manager.lora_config)
        model = manager._adapter_manager.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        adapter = LoRAModel.from_lora_tensors(
            lora_id,
            tensors,
            helper,
            device="cpu",  # vLLM keeps registered adapters on the host and copies them into its slots
            dtype=manager.lora_config.lora_dtype,
            model_vocab_size=manager.vocab_size,
            weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
            skip_prefixes=getattr(model, "lora_skip_prefixes", None),
        )
        held = [manager._adapter_manager.get_adapter(i) for i in manager.list_adapters()]
        for old in held:
            manager.remove_adapter(old.id)
        try:
            manager._adapter_manager.add_adapter(adapter)
        except BaseException:
            for old in held:
                manager._adapter_manager.add_adapter(old)
            raise
