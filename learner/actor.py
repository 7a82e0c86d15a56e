"""One learner rank: a Ray actor holding a DeepSpeed ZeRO engine of the policy.

The class is plain Python; ``learner.group`` wraps it with ``ray.remote``. All ranks run the
same calls in the same order (train_step, broadcast_weights, save_*), because ZeRO gathers
and gradient all-reduces are collective over the data-parallel group.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from grpo_dist import lora as lora_lib
from grpo_dist.batch import RolloutBatch
from grpo_dist.config import AlgoConfig, ClusterConfig, LearnerConfig, ModelConfig
from grpo_dist.forward import (
    final_hidden,
    row_logprobs,
    shared_prompt_logprobs,
    shared_prompt_refusal,
    unwrap,
)
from grpo_dist.losses import grpo_loss, sampler_gap
from grpo_dist.weight_sync import (
    ParamSpec,
    dtype_name,
    init_sync_group,
    open_sync_store,
    pick_backend,
    plan_buckets,
    send_weights,
)
from learner.ds_config import build_ds_config, grad_accum_steps, lr_multiplier, ref_ds_config, resolve_dtype
from learner.rank_placement import rank_env
from learner.step import (
    backward_scale,
    forward_positions,
    lerp_,
    micro_slices,
    pack_metrics,
    rank_rows,
    token_micro_batches,
    unique_tokens,
    unpack_metrics,
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


class LearnerActor:
    def __init__(
        self,
        rank: int,
        world_size: int,
        learner_cfg: LearnerConfig,
        model_cfg: ModelConfig,
        algo_cfg: AlgoConfig,
        cluster_cfg: ClusterConfig,
        total_steps: int,
        gradient_accumulation_steps: int,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.lcfg, self.mcfg, self.acfg, self.ccfg = learner_cfg, model_cfg, algo_cfg, cluster_cfg
        self.total_steps = total_steps
        self.ga = gradient_accumulation_steps
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        self.dtype = resolve_dtype(model_cfg, self.cuda)
        self.step = 0  # GRPO steps trained (rollout batches), drives the reference refresh
        self._sync_store = None  # rank 0: the TCPStore sync_address opened for the next weight sync
        # Ray sets OMP_NUM_THREADS from the actor's CPU share; keep torch's intra-op pool in line.
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    # ---- rendezvous -------------------------------------------------------------------------

    def where(self) -> dict:
        """Node and process of this rank (the job logs its placement and names a dead node's ranks)."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": node_ip(), "pid": os.getpid()}

    def master_address(self) -> tuple[str, int]:
        """Rank 0's node IP and a free port for the DeepSpeed group's rendezvous."""
        return node_ip(), free_port()

    def sync_address(self) -> tuple[str, int]:
        """Rank 0's node IP and the port of the TCPStore it opens now for the next weight-sync group
        (replacing any earlier one), so receivers never connect before it listens."""
        self._sync_store = open_sync_store(self.ccfg.collective_timeout_s / 2)
        return node_ip(), self._sync_store.port

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the data-parallel group, load policy (+ reference) and build the engines."""
        import deepspeed

        os.environ.update(rank_env(self.rank, self.world_size, master_addr, master_port))
        timeout = _dt.timedelta(seconds=self.ccfg.collective_timeout_s)
        deepspeed.init_distributed(
            dist_backend=pick_backend(self.device), auto_mpi_discovery=False, timeout=timeout, verbose=False
        )
        ds_cfg = build_ds_config(self.lcfg, self.dtype, self.world_size, self.ga)
        policy = self._load_model(ds_cfg)
        if self.mcfg.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
            if self.mcfg.lora is not None:
                # Frozen embeddings give the checkpointed blocks no input that requires grad.
                policy.enable_input_require_grads()
        if self.mcfg.lora is not None:
            policy = lora_lib.wrap(policy, self.mcfg.lora, self.mcfg.path)
        schedule_steps = self.total_steps * self.lcfg.optimizer_steps_per_batch * self.acfg.num_iterations
        lr_fn = partial(
            lr_multiplier,
            warmup_steps=self.lcfg.warmup_steps,
            total_steps=schedule_steps,
            schedule=self.lcfg.lr_schedule,
        )
        self.engine, *_ = deepspeed.initialize(
            model=policy,
            model_parameters=[p for p in policy.parameters() if p.requires_grad],
            config=ds_cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn),
        )
        self._check_logits_path()
        self._check_shared_prompt_model(unwrap(self.engine).config)
        # With LoRA the reference is the policy with its adapter switched off: no second model.
        self.ref = self._build_reference() if self.acfg.beta > 0 and self.mcfg.lora is None else None
        self.manifest = self._manifest()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            self.mcfg.tokenizer_path or self.mcfg.path, trust_remote_code=self.mcfg.trust_remote_code
        )
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _load_model(self, ds_cfg: dict[str, Any] | None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        # Under ZeRO-3 a live HfDeepSpeedConfig makes from_pretrained partition while loading,
        # so no rank ever materialises the whole model.
        zero3 = ds_cfg is not None and ds_cfg["zero_optimization"]["stage"] == 3
        hf_ds = HfDeepSpeedConfig(ds_cfg) if zero3 else None
        model = AutoModelForCausalLM.from_pretrained(
            self.mcfg.path, dtype=self.dtype, trust_remote_code=self.mcfg.trust_remote_code
        )
        del hf_ds
        return model

    @torch.no_grad()
    def _check_logits_path(self) -> None:
        """The learner's log-probs are ``lm_head(final hidden state)``; a model family that
        post-processes its logits (soft-capping, scaling) would silently train on other log-probs
        than the ones it samples with, so it is refused here. Collective under ZeRO-3."""
        self.engine.eval()
        vocab = unwrap(self.engine).get_output_embeddings().weight
        n = int(getattr(vocab, "ds_shape", vocab.shape)[0])
        ids = torch.arange(1, 9, device=self.device).unsqueeze(0) % n
        hidden = final_hidden(self.engine, input_ids=ids, attention_mask=torch.ones_like(ids))
        via_head = unwrap(self.engine).get_output_embeddings()(hidden).float()
        full = self.engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        if not torch.allclose(via_head, full, rtol=1e-3, atol=1e-3 * float(full.abs().max())):
            raise ValueError(
                f"model.path={self.mcfg.path!r}: {type(unwrap(self.engine)).__name__} computes its logits from more "
                "than its LM head (soft-capping or scaling); grpo-dist's log-prob path does not support it"
            )

    def _check_shared_prompt_model(self, hf_config) -> None:
        """With the shared-prompt forward: refuse a model it cannot run at any length (what depends
        on the length is checked per batch; preflight checks local models against the config's
        longest row before launch)."""
        if self.lcfg.shared_prompt_forward and (refusal := shared_prompt_refusal(hf_config, None, self.mcfg.path)):
            raise ValueError(refusal)

    def _build_reference(self) -> torch.nn.Module:
        """Frozen copy of the initial policy: a ZeRO-3 inference engine (partitioned exactly like
        the policy) under ZeRO-3, a plain replica otherwise."""
        import deepspeed

        if self.lcfg.zero_stage == 3:
            cfg = ref_ds_config(3, self.dtype, self.lcfg.micro_batch_size, self.world_size)
            # Kept alive: the engine owns the parameter coordinator behind the module's hooks.
            self._ref_engine, *_ = deepspeed.initialize(model=self._load_model(cfg), config=cfg)
            ref = self._ref_engine.module
        else:
            ref = self._load_model(None).to(self.device)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # ---- weights ----------------------------------------------------------------------------

    def _entries(
        self, module: torch.nn.Module | None = None, mode: str | None = None
    ) -> list[tuple[str, list, float | None]]:
        """What a weight transfer sends, in order: ``(name, params, lora scaling)`` per tensor.

        Full fine-tune: the HF parameters of the policy (or ``module``, the reference), one each; a
        tied ``lm_head.weight`` is left out (it is the embedding; vLLM ties it itself). With LoRA,
        ``mode`` (default ``model.lora.sync``) picks: ``adapter``, the adapter tensors by their saved
        PEFT names; ``merged``, the base model's HF names with each targeted weight sent together
        with its ``A``, ``B`` and scaling (merged on the fly); ``base``, the base weights alone (the
        reference)."""
        module = self.engine.module if module is None else module
        tied = bool(getattr(module.config, "tie_word_embeddings", False))
        lora = self.mcfg.lora if module is self.engine.module else None
        if lora is None:
            return [(n, [p], None) for n, p in module.named_parameters() if not (tied and n == "lm_head.weight")]
        mode = mode or lora.sync
        named = list(module.named_parameters())
        if mode == "adapter":
            return [(lora_lib.sync_name(n), [p], None) for n, p in named if lora_lib.is_adapter_param(n)]
        layers = dict(module.named_modules())
        out = []
        for n, p in named:
            hf = lora_lib.base_name(n)
            if lora_lib.is_adapter_param(n) or (tied and hf == "lm_head.weight"):
                continue
            if mode == "merged" and n.endswith(".base_layer.weight"):
                layer = layers[n.removesuffix(".base_layer.weight")]
                a, b = layer.lora_A[lora_lib.ADAPTER].weight, layer.lora_B[lora_lib.ADAPTER].weight
                out.append((hf, [p, a, b], float(layer.scaling[lora_lib.ADAPTER])))
            else:
                out.append((hf, [p], None))
        return out

    @staticmethod
    def _specs(entries: list[tuple[str, list, float | None]]) -> list[ParamSpec]:
        # ZeRO-3 leaves an empty placeholder in p.shape; ds_shape is the full shape.
        return [
            ParamSpec(n, tuple(getattr(ps[0], "ds_shape", ps[0].shape)), dtype_name(ps[0].dtype))
            for n, ps, _ in entries
        ]

    def _manifest(self) -> list[ParamSpec]:
        return self._specs(self._entries())

    def weight_manifest(self) -> list[ParamSpec]:
        return list(self.manifest)

    def _gathered(
        self, bucket_bytes: int, entries: list[tuple[str, list, float | None]] | None = None
    ) -> Iterator[torch.Tensor | None]:
        """The full tensors of ``entries`` (default: what a weight sync sends) in order, gathered one
        bucket at a time (collective under ZeRO-3, so every rank iterates it); rank 0 gets copies,
        the others ``None``."""
        import deepspeed

        entries = self._entries() if entries is None else entries
        for bucket in plan_buckets(self._specs(entries), bucket_bytes):
            chosen = [entries[i] for i in bucket]
            with deepspeed.zero.GatheredParameters([p for _, ps, _ in chosen for p in ps], modifier_rank=None):
                for _, ps, scaling in chosen:
                    if self.rank != 0:
                        yield None
                    elif scaling is None:
                        yield ps[0].detach().clone()
                    else:
                        yield lora_lib.merged_weight(ps[0].detach(), ps[1].detach(), ps[2].detach(), scaling)

    def broadcast_weights(self, host: str, port: int, sync_group_size: int, version: int, timeout_s: float) -> dict:
        """Send the policy to the weight-sync group (rank 0 is its group rank 0). All ranks call."""
        if timeout_s >= self.ccfg.collective_timeout_s:
            # The other ranks wait for rank 0's join in a DeepSpeed-group collective: if the join could
            # outlast that group's timeout, a missing receiver would break the learner group for good.
            raise ValueError(
                f"weight-sync timeout {timeout_s:.0f}s must be shorter than "
                f"cluster.collective_timeout_s={self.ccfg.collective_timeout_s:.0f}s"
            )
        t0 = time.perf_counter()
        group, error = None, None
        if self.rank == 0:
            store, self._sync_store = self._sync_store, None  # one group per store
            if store is not None and store.port != port:
                store = None
            try:
                group = init_sync_group(
                    host,
                    port,
                    0,
                    sync_group_size,
                    timeout_s,
                    backend=pick_backend(self.device),
                    store=store,
                    device=self.device,
                )
            except Exception as e:  # re-raised below, after the other ranks have been told
                error = e
        # Everyone learns whether rank 0 got its group, so no rank waits in a gather that
        # rank 0 will never join.
        self._raise_if_rank_failed(
            error, TimeoutError(f"weight-sync group {host}:{port} failed on learner rank 0 (version {version})")
        )
        bucket_bytes = int(self.lcfg.weight_sync_bucket_mb * 2**20)
        tensors = self._gathered(bucket_bytes)
        sent, failure = 0, None
        if group is not None:
            try:
                sent = send_weights(group, self.manifest, tensors, bucket_bytes, device=self.device)
            except Exception as e:  # a receiver died mid-transfer: finish the gathers first
                failure = e
            # Freed now, not with this frame (a traceback keeps it): an NCCL group's communicator is aborted.
            del group
        for _ in tensors:  # ZeRO-3 gathers are collective: every rank walks every bucket
            pass
        self._raise_if_rank_failed(
            failure, RuntimeError(f"weight broadcast v{version} to {host}:{port} failed on learner rank 0")
        )
        return {"bytes": sent, "seconds": time.perf_counter() - t0, "version": version}

    def _raise_if_rank_failed(self, error: Exception | None, elsewhere: Exception) -> None:
        """Collective: every rank learns whether any rank failed; the failing rank re-raises its own
        error, the others raise ``elsewhere``, so no rank goes on alone into a later collective."""
        ok = torch.tensor([0 if error else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if error is not None:
            raise error
        if not ok.item():
            raise elsewhere

    def gathered_state_dict(self, reference: bool = False) -> dict[str, torch.Tensor]:
        """Full CPU tensors on rank 0 (empty elsewhere) by name: what a weight sync sends (the
        policy, or its adapter with LoRA), or with ``reference`` the reference model's weights (with
        LoRA: the base model's). All ranks call."""
        if reference and self.ref is None and self.mcfg.lora is None:
            raise ValueError("there is no reference model (algorithm.beta = 0)")
        if reference:
            entries = self._entries(mode="base") if self.mcfg.lora is not None else self._entries(self.ref)
        else:
            entries = self._entries()
        out = {}
        for (name, _, _), t in zip(entries, self._gathered(int(self.lcfg.weight_sync_bucket_mb * 2**20), entries)):
            if t is not None:
                out[name] = t.cpu()
        return out

    def save_hf(self, path: str) -> None:
        """Policy in HF format (safetensors + config + tokenizer) into ``path``. All ranks call."""
        from safetensors.torch import save_file

        lora = self.mcfg.lora
        entries = self._entries(mode="adapter") if lora is not None else self._entries()
        state = {
            name: t.cpu()
            for (name, _, _), t in zip(entries, self._gathered(int(self.lcfg.weight_sync_bucket_mb * 2**20), entries))
            if t is not None
        }
        if self.rank != 0:
            return
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in state.items()}
        if lora is not None:
            # PEFT's own layout: `PeftModel.from_pretrained(base, path)` and vLLM's LoRARequest load it;
            # `grpo-dist export-merged` turns it into a plain model directory.
            save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
            (out / "adapter_config.json").write_text(
                json.dumps(lora_lib.peft_config_dict(lora, self.mcfg.path), indent=2)
            )
            self.tokenizer.save_pretrained(out)
            return
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        module = self.engine.module
        module.config.save_pretrained(out)
        if getattr(module, "generation_config", None) is not None:
            module.generation_config.save_pretrained(out)
        self.tokenizer.save_pretrained(out)

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer, scheduler, counters) for exact resume. All ranks call."""
        self.engine.save_checkpoint(path, tag="state", client_state={"grpo_step": self.step})
        if self.ref is not None and self.lcfg.ref_sync_every is not None:
            # A refreshed reference is no longer the initial model: keep each rank's own part.
            parts = [t.detach().cpu().clone() for t in self._local_tensors(self.ref)]
            torch.save(parts, Path(path) / f"ref_rank{self.rank}.pt")
        dist.barrier()

    def load_checkpoint(self, path: str) -> None:
        """Restore what ``save_checkpoint`` wrote (same number of ranks). All ranks call."""
        load_path, client = self.engine.load_checkpoint(path, tag="state")
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag 'state' under {path}")
        self.step = int(client["grpo_step"])
        if self.ref is not None and self.lcfg.ref_sync_every is not None:
            saved = torch.load(Path(path) / f"ref_rank{self.rank}.pt", weights_only=True)
            params = list(self.ref.parameters())
            if len(saved) > len(params):
                # An older checkpoint (ZeRO-3): each small persistent parameter's partition was followed
                # by its full copy, which the partition already holds.
                it, kept = iter(saved), []
                for p in params:
                    kept.append(next(it))
                    if hasattr(p, "ds_tensor") and p.ds_persist:
                        next(it)
                saved = kept
            with torch.no_grad():
                for dst, src in zip(self._local_tensors(self.ref), saved, strict=True):
                    dst.copy_(src)
            self._drop_gathered(self.ref)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    @staticmethod
    def _local_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
        """This rank's storage of each parameter: the full tensor, or under ZeRO-3 its partition (the
        copy the optimizer writes; ``_drop_gathered`` after writing into the reference's)."""
        return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in module.parameters()]

    @staticmethod
    def _drop_gathered(module: torch.nn.Module) -> None:
        """ZeRO-3: release every full copy gathered from ``module``'s partitions before they were written,
        so the next forward gathers them again. Small "persistent" parameters otherwise stay gathered
        between forwards, and whether one is gathered at a given moment depends on the forwards before."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        stale = [p for p in module.parameters() if hasattr(p, "ds_tensor") and p.ds_status == ZeroParamStatus.AVAILABLE]
        if stale:
            stale[0].partition(param_list=stale)

    # ---- training ----------------------------------------------------------------------------

    def _forward(
        self, module: torch.nn.Module, t: dict[str, torch.Tensor], rows: slice, entropy: bool | Literal["grad"] = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logp_BT, ent_BT)`` of the completion tokens of ``rows`` (``ent_BT`` zeros unless
        ``entropy``): each unique prompt forwarded once (``learner.shared_prompt_forward``) or every
        row whole. Both stop at the final hidden state and project only completion tokens through
        the LM head, ``learner.logits_chunk_tokens`` at a time (``grpo_dist.forward``)."""
        fn = shared_prompt_logprobs if self.lcfg.shared_prompt_forward else row_logprobs
        return fn(
            module,
            t,
            rows,
            self.acfg.temperature,
            lm_head=self._lm_head(module),
            chunk_tokens=self.lcfg.logits_chunk_tokens,
            entropy=entropy,
        )

    def _lm_head(self, module: torch.nn.Module):
        """The LM head to project hidden states with. A frozen head (LoRA) under ZeRO-3 becomes a
        plain function of a gathered copy of its weight: the chunked projection is recomputed in
        backward, and ZeRO-3 re-gathers only trainable parameters then (measured: the recompute saw
        the released [0]-shaped weight and torch.utils.checkpoint refused it)."""
        head = unwrap(module).get_output_embeddings()
        params = list(head.parameters())
        if (
            not torch.is_grad_enabled()
            or any(p.requires_grad for p in params)
            or not any(hasattr(p, "ds_id") for p in params)
        ):
            return head
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            weight = head.weight.detach().clone()
            bias = head.bias.detach().clone() if getattr(head, "bias", None) is not None else None
        return partial(torch.nn.functional.linear, weight=weight, bias=bias)

    def _micro_batches(self, t: dict[str, torch.Tensor]) -> list[list[slice]]:
        """This rank's micro-batches (slices of its shard ``t``) for each optimizer step: fixed row
        counts, or packed under ``learner.max_tokens_per_micro_batch`` with, in every step, the
        largest count of any rank. Collective with a token budget; deterministic, so every call on
        the same shard gives the same micro-batches."""
        lc = self.lcfg
        steps = lc.optimizer_steps_per_batch
        mini = len(t["prompt_len_B"]) // steps  # rows per rank per optimizer step
        if lc.max_tokens_per_micro_batch is None:
            return [micro_slices(k * mini, lc.micro_batch_size, mini // lc.micro_batch_size) for k in range(steps)]
        lengths, prompts = t["attention_mask_BL"].sum(1).tolist(), self._prompts(t)
        counts = torch.tensor(
            [len(m) for m in token_micro_batches(lengths, steps, lc.max_tokens_per_micro_batch, prompts=prompts)],
            device=self.device,
        )
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        return token_micro_batches(lengths, steps, lc.max_tokens_per_micro_batch, counts.tolist(), prompts)

    def _prompts(self, t: dict[str, torch.Tensor]) -> list[tuple[int, int]] | None:
        """Per row of the shard: (group id, prompt length) under the shared-prompt forward, whose
        micro-batch cost counts each prompt once; None in the row layout."""
        if not self.lcfg.shared_prompt_forward:
            return None
        return list(zip(t["group_B"].tolist(), t["prompt_len_B"].tolist()))

    @torch.no_grad()
    def _logp_all(self, module: torch.nn.Module, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-probs of every row of the shard, micro-batch by micro-batch, without gradients."""
        # The training micro-batches: under ZeRO-3 every rank must run as many forwards.
        return torch.cat([self._forward(module, t, rows)[0] for micro in self._micro_batches(t) for rows in micro])

    def _reference_logp(self, t: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Reference log-probs of the shard (None when beta = 0): the reference model's, or with
        LoRA the policy's own with its adapter switched off (the base model)."""
        if self.ref is not None:
            return self._logp_all(self.ref, t)
        if self.acfg.beta == 0:
            return None
        with unwrap(self.engine).disable_adapter():
            return self._logp_all(self.engine, t)

    def _sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.cpu()

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        """One GRPO step on this rank's shard of ``batch``; metrics are over all ranks."""
        if batch.advantages is None:
            raise ValueError("train_step needs batch.advantages (the driver fills them before training)")
        lc, ac, world = self.lcfg, self.acfg, self.world_size
        if lc.max_tokens_per_micro_batch is None:  # whole row micro-batches; rank_rows checks ranks x mini-batches
            grad_accum_steps(len(batch), world, lc.micro_batch_size, lc.optimizer_steps_per_batch)
        lengths = [len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)]
        prompts = None
        if lc.shared_prompt_forward:  # deal a prompt's rows together
            prompts = [(g, len(p)) for g, p in zip(batch.group_ids, batch.prompt_ids)]
            # A completion sits after its micro-batch's longest prompt in the cache: that is the row length to check.
            span = max(map(len, batch.prompt_ids)) + max(map(len, batch.completion_ids))
            if refusal := shared_prompt_refusal(unwrap(self.engine).config, span, self.mcfg.path):
                raise ValueError(refusal)
        mine = rank_rows(lengths, world, lc.optimizer_steps_per_batch, prompts)[self.rank]
        t = batch.select(mine).to_tensors(self.pad_id, self.device)
        timings = {}

        t0 = time.perf_counter()
        ref_logp = self._reference_logp(t)
        timings["ref_logp"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # mu == 1: the policy has not moved yet, so the ratio's denominator is logp.detach().
        old_logp = self._logp_all(self.engine, t) if ac.num_iterations > 1 else None
        timings["old_logp"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        self.engine.train()
        per_micro, loss_sum, grad_norms, lrs = [], 0.0, [], []
        plan = self._micro_batches(t)
        mini = len(t["prompt_len_B"]) // lc.optimizer_steps_per_batch  # rows per rank per optimizer step
        for _ in range(ac.num_iterations):
            for k, micro in enumerate(plan):
                ga = len(micro)  # the same on every rank
                if ga != self.engine.gradient_accumulation_steps():
                    self.engine.set_train_batch_size(self.engine.train_micro_batch_size_per_gpu() * ga * world)
                scale = backward_scale(self.engine.gradient_accumulation_steps(), world)  # DeepSpeed's divisor
                num_tokens_total = float(self._sum_over_ranks(t["loss_mask_BT"][k * mini : (k + 1) * mini].sum()))
                lrs.append(float(self.engine.get_lr()[0]))
                for j, rows in enumerate(micro):
                    # DeepSpeed's own boundary counts micro-steps since the first step, which goes
                    # wrong as soon as the accumulation steps change between optimizer steps.
                    self.engine.set_gradient_accumulation_boundary(j == ga - 1)
                    # The entropy keeps its gradient only when the loss has the bonus.
                    logp_BT, ent_BT = self._forward(self.engine, t, rows, entropy="grad" if ac.entropy_coef else True)
                    loss, m = grpo_loss(
                        logp_BT,
                        old_logp[rows] if old_logp is not None else None,
                        ref_logp[rows] if ref_logp is not None else None,
                        t["adv_B"][rows],
                        t["loss_mask_BT"][rows],
                        ac,
                        num_sequences_total=mini * world,
                        num_tokens_total=max(num_tokens_total, 1.0),
                        sampling_logp_BT=t["sampling_logp_BT"][rows],
                        ent_BT=ent_BT if ac.entropy_coef else None,
                    )
                    self.engine.backward(loss * scale)
                    self.engine.step()  # applies the update only at the accumulation boundary
                    m["entropy"] = (ent_BT.detach() * t["loss_mask_BT"][rows]).sum() / t["loss_mask_BT"][
                        rows
                    ].sum().clamp(min=1)
                    # The learner's log-probs of these tokens (the behaviour policy's when mu > 1) against the
                    # engine's: the check that the engine serves the weights the learner thinks it does.
                    behaviour_BT = old_logp[rows] if old_logp is not None else logp_BT
                    m["sampler_gap"] = sampler_gap(behaviour_BT, t["sampling_logp_BT"][rows], t["loss_mask_BT"][rows])
                    per_micro.append(m)
                    loss_sum += float(loss.detach())
                grad_norms.append(float(self.engine.get_global_grad_norm() or 0.0))
        timings["train"] = time.perf_counter() - t0

        self.step += 1
        if self.ref is not None and lc.ref_sync_every and self.step % lc.ref_sync_every == 0:
            lerp_(self._local_tensors(self.ref), self._local_tensors(self.engine.module), lc.ref_sync_alpha)
            self._drop_gathered(self.ref)

        n_steps = ac.num_iterations * lc.optimizer_steps_per_batch
        out = unpack_metrics(self._sum_over_ranks(pack_metrics(per_micro, loss_sum)), n_steps)
        # Every pass sees the same tokens; count the batch once.
        row_lengths = t["attention_mask_BL"].sum(1).tolist()
        flat = [rows for micro in plan for rows in micro]
        prompts = self._prompts(t)
        positions = forward_positions(row_lengths, flat, prompts)
        real = sum(row_lengths) if prompts is None else unique_tokens(row_lengths, flat, prompts)
        tokens, rows_total, real, computed = self._sum_over_ranks(
            torch.tensor([float(t["loss_mask_BT"].sum()), sum(row_lengths), real, positions], dtype=torch.float64)
        ).tolist()
        out.update(
            grad_norm=sum(grad_norms) / len(grad_norms),
            lr=lrs[-1],
            tokens=tokens,
            # Share of the positions the training forwards compute that are padding.
            padding_fraction=1.0 - real / max(computed, 1.0),
            # Share of the rows' prompt + completion tokens not forwarded: prompts shared by their rows.
            shared_prompt_saving=1.0 - real / max(rows_total, 1.0),
            # Trained tokens (every pass counts) per second of the update phase.
            tokens_per_s=tokens * ac.num_iterations / max(timings["train"], 1e-9),
            optimizer_steps=float(self.engine.global_steps),
        )
        out.update({f"time/{k}": v for k, v in timings.items()})
        out["peak_memory_mb"] = self._peak_memory_mb()
        return out

    def _peak_memory_mb(self) -> float:
        """Peak memory of the most loaded rank so far: the CUDA allocator's peak on GPU, the process's
        peak resident set on CPU (which includes the Python runtime and the libraries)."""
        if self.cuda:
            mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            import resource

            mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak = torch.tensor([mb], dtype=torch.float64, device=self.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return float(peak.item())
