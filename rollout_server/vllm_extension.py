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
        world_size: int,
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
        group = init_sync_group(host, port, rank, world_size, timeout_s, pick_backend(self.device))
        t_join = time.perf_counter()
        try:
            # From the first tensor on, a failure leaves a mix of old and new weights.
            self._grpo_partial = True
            # The worker's reload_weights (not the model runner's) sets vLLM's current-config context.
            self.reload_weights(weights_iterator=recv_weights(group, manifest, bucket_bytes, self.device))
            refreshed = refresh_tied_modules(self.model_runner.get_model()) if self.device.type == "cpu" else 0
            self._grpo_partial = False
        finally:
            # A ProcessGroup without a default group has no destroy hook; dropping it frees it.
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
