"""One learner rank: a Ray actor holding a DeepSpeed ZeRO engine of the policy.

The class is plain Python; ``learner.group`` wraps it with ``ray.remote``. All ranks run the
same calls in the same order (train_step, broadcast_weights, save_*), because ZeRO gathers
and gradient all-reduces are collective over the data-parallel group.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import AlgoConfig, ClusterConfig, LearnerConfig, ModelConfig
from grpo_dist.losses import completion_logprobs, grpo_loss, sampler_gap
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
from learner.placement import rank_env
from learner.step import lerp_, micro_slices, pack_metrics, rank_rows, unpack_metrics


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DeepSpeed engine (or the model itself)."""
    return getattr(module, "module", module)


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
        self.ref = self._build_reference() if self.acfg.beta > 0 else None
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
        vocab = _unwrap(self.engine).get_output_embeddings().weight
        n = int(getattr(vocab, "ds_shape", vocab.shape)[0])
        ids = torch.arange(1, 9, device=self.device).unsqueeze(0) % n
        hidden = self._final_hidden(self.engine, ids, torch.ones_like(ids))
        via_head = _unwrap(self.engine).get_output_embeddings()(hidden).float()
        full = self.engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        if not torch.allclose(via_head, full, rtol=1e-3, atol=1e-3 * float(full.abs().max())):
            raise ValueError(
                f"model.path={self.mcfg.path!r}: {type(_unwrap(self.engine)).__name__} computes its logits from more "
                "than its LM head (soft-capping or scaling); grpo-dist's log-prob path does not support it"
            )

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

    def _named_params(self, module: torch.nn.Module | None = None) -> list[tuple[str, torch.nn.Parameter]]:
        """HF parameter names of the unwrapped policy (or ``module``); a tied ``lm_head.weight``
        is left out (it is the embedding; vLLM ties it itself)."""
        module = self.engine.module if module is None else module
        tied = bool(getattr(module.config, "tie_word_embeddings", False))
        return [(n, p) for n, p in module.named_parameters() if not (tied and n == "lm_head.weight")]

    def _manifest(self) -> list[ParamSpec]:
        # ZeRO-3 leaves an empty placeholder in p.shape; ds_shape is the full shape.
        return [
            ParamSpec(n, tuple(getattr(p, "ds_shape", p.shape)), dtype_name(p.dtype)) for n, p in self._named_params()
        ]

    def weight_manifest(self) -> list[ParamSpec]:
        return list(self.manifest)

    def _gathered(self, bucket_bytes: int, module: torch.nn.Module | None = None) -> Iterator[torch.Tensor | None]:
        """Full parameters of the policy (or ``module``, same architecture) in manifest order,
        gathered one bucket at a time (collective under ZeRO-3, so every rank iterates it);
        rank 0 gets clones, the others ``None``."""
        import deepspeed

        params = [p for _, p in self._named_params(module)]
        for bucket in plan_buckets(self.manifest, bucket_bytes):
            ps = [params[i] for i in bucket]
            with deepspeed.zero.GatheredParameters(ps, modifier_rank=None):
                for p in ps:
                    yield p.detach().clone() if self.rank == 0 else None

    def broadcast_weights(self, host: str, port: int, world_size: int, version: int, timeout_s: float) -> dict:
        """Send the policy to the weight-sync group (rank 0 is its group rank 0). All ranks call."""
        if timeout_s >= self.ccfg.collective_timeout_s:
            # The other ranks wait for rank 0's join in a DeepSpeed-group collective: if the join could
            # outlast that group's timeout, a missing receiver would break the learner group for good.
            raise ValueError(f"weight-sync timeout {timeout_s:.0f}s must be shorter than "
                             f"cluster.collective_timeout_s={self.ccfg.collective_timeout_s:.0f}s")
        t0 = time.perf_counter()
        group, error = None, None
        if self.rank == 0:
            store, self._sync_store = self._sync_store, None  # one group per store
            if store is not None and store.port != port:
                store = None
            try:
                group = init_sync_group(host, port, 0, world_size, timeout_s, backend=pick_backend(self.device),
                                        store=store)
            except Exception as e:  # re-raised below, after the other ranks have been told
                error = e
        # Everyone learns whether rank 0 got its group, so no rank waits in a gather that
        # rank 0 will never join.
        self._raise_if_rank_failed(error, TimeoutError(f"weight-sync group {host}:{port} failed on learner rank 0 "
                                                       f"(version {version})"))
        bucket_bytes = int(self.lcfg.weight_sync_bucket_mb * 2**20)
        tensors = self._gathered(bucket_bytes)
        sent, failure = 0, None
        if group is not None:
            try:
                sent = send_weights(group, self.manifest, tensors, bucket_bytes, device=self.device)
            except Exception as e:  # a receiver died mid-transfer: finish the gathers first
                failure = e
        for _ in tensors:  # ZeRO-3 gathers are collective: every rank walks every bucket
            pass
        self._raise_if_rank_failed(failure, RuntimeError(f"weight broadcast v{version} to {host}:{port} failed on "
                                                         "learner rank 0"))
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
        """Full CPU weights of the policy (or the reference model) by HF name on rank 0 (empty
        elsewhere). All ranks call."""
        if reference and self.ref is None:
            raise ValueError("there is no reference model (algorithm.beta = 0)")
        module = self.ref if reference else None
        out = {}
        for spec, t in zip(self.manifest, self._gathered(int(self.lcfg.weight_sync_bucket_mb * 2**20), module)):
            if t is not None:
                out[spec.name] = t.cpu()
        return out

    def save_hf(self, path: str) -> None:
        """Policy in HF format (safetensors + config + tokenizer) into ``path``. All ranks call."""
        from safetensors.torch import save_file

        state = self.gathered_state_dict()
        if self.rank != 0:
            return
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in state.items()}
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
            with torch.no_grad():
                for dst, src in zip(self._local_tensors(self.ref), saved, strict=True):
                    dst.copy_(src)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    @staticmethod
    def _local_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
        """This rank's storage of each parameter: the full tensor, or under ZeRO-3 its shard plus
        the full replica ZeRO-3 keeps of small "persistent" parameters (the one forward uses)."""
        out = []
        for p in module.parameters():
            if hasattr(p, "ds_tensor"):
                out.append(p.ds_tensor)
                if p.ds_persist:
                    out.append(p.data)
            else:
                out.append(p.data)
        return out

    # ---- training ----------------------------------------------------------------------------

    def _forward(
        self, module: torch.nn.Module, t: dict[str, torch.Tensor], rows: slice, entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logp_BT, ent_BT)`` of the completion tokens of ``rows`` (``ent_BT`` zeros unless
        ``entropy``). The forward is cut to the micro-batch's longest row (rows are right-padded, so
        later columns are all padding) and stops at the final hidden state: the vocabulary projection
        runs only on completion tokens, in chunks of ``learner.logits_chunk_tokens``."""
        attn_BL = t["attention_mask_BL"][rows]
        L = int(attn_BL.sum(1).max())
        ids_BL = t["input_ids_BL"][rows, :L]
        hidden_BLH = self._final_hidden(module, ids_BL, attn_BL[:, :L])
        return completion_logprobs(
            hidden_BLH, ids_BL, t["prompt_len_B"][rows], t["mask_BT"][rows], self.acfg.temperature,
            lm_head=_unwrap(module).get_output_embeddings(), chunk_tokens=self.lcfg.logits_chunk_tokens,
            entropy=entropy,
        )

    @staticmethod
    def _final_hidden(module: torch.nn.Module, ids_BL: torch.Tensor, attn_BL: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden state (after its final norm), the input of the LM head.

        Captured by a hook on the decoder so the full forward (and DeepSpeed's ZeRO-3 hooks) runs
        unchanged, with ``logits_to_keep=1``: no ``[B, L, V]`` logits are made."""
        captured: list[torch.Tensor] = []

        def grab(_mod, _inputs, output):
            captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

        handle = _unwrap(module).get_decoder().register_forward_hook(grab)
        try:
            module(input_ids=ids_BL, attention_mask=attn_BL, logits_to_keep=1)
        finally:
            handle.remove()
        return captured[-1]

    @torch.no_grad()
    def _logp_all(self, module: torch.nn.Module, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-probs of every row of the shard, micro-batch by micro-batch, without gradients."""
        micro = self.lcfg.micro_batch_size
        slices = micro_slices(0, micro, t["mask_BT"].shape[0] // micro)
        return torch.cat([self._forward(module, t, rows)[0] for rows in slices])

    def _sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.cpu()

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        """One GRPO step on this rank's shard of ``batch``; metrics are over all ranks."""
        if batch.advantages is None:
            raise ValueError("train_step needs batch.advantages (the driver fills them before training)")
        lc, ac, world = self.lcfg, self.acfg, self.world_size
        ga = grad_accum_steps(len(batch), world, lc.micro_batch_size, lc.optimizer_steps_per_batch)
        if ga != self.engine.gradient_accumulation_steps():
            self.engine.set_train_batch_size(lc.micro_batch_size * ga * world)
        lengths = [len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)]
        mine = rank_rows(lengths, world, lc.optimizer_steps_per_batch)[self.rank]
        t = batch.select(mine).to_tensors(self.pad_id, self.device)
        timings = {}

        t0 = time.perf_counter()
        ref_logp = self._logp_all(self.ref, t) if self.ref is not None else None
        timings["ref_logp"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # mu == 1: the policy has not moved yet, so the ratio's denominator is logp.detach().
        old_logp = self._logp_all(self.engine, t) if ac.num_iterations > 1 else None
        timings["old_logp"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        self.engine.train()
        per_micro, loss_sum, grad_norms, lrs = [], 0.0, [], []
        mini = lc.micro_batch_size * ga  # rows per rank per optimizer step
        for _ in range(ac.num_iterations):
            for k in range(lc.optimizer_steps_per_batch):
                # Micro-batch losses are normalised by the mini-batch totals over all ranks, so
                # their sum is the mini-batch loss; DeepSpeed divides each backward by GA and
                # averages over ranks, which the factor ga * world undoes.
                n_tokens = float(self._sum_over_ranks(t["mask_BT"][k * mini : (k + 1) * mini].sum()))
                lrs.append(float(self.engine.get_lr()[0]))
                for rows in micro_slices(k * mini, lc.micro_batch_size, ga):
                    logp_BT, ent_BT = self._forward(self.engine, t, rows, entropy=True)
                    loss, m = grpo_loss(
                        logp_BT,
                        old_logp[rows] if old_logp is not None else None,
                        ref_logp[rows] if ref_logp is not None else None,
                        t["adv_B"][rows],
                        t["mask_BT"][rows],
                        ac,
                        global_num_tokens=max(n_tokens, 1.0),
                        num_sequences_total=mini * world,
                        sampling_logp_BT=t["sampling_logp_BT"][rows] if ac.tis_cap is not None else None,
                    )
                    self.engine.backward(loss * (ga * world))
                    self.engine.step()  # applies the update only at the accumulation boundary
                    m["entropy"] = (ent_BT * t["mask_BT"][rows]).sum() / t["mask_BT"][rows].sum().clamp(min=1)
                    # The learner's log-probs of these tokens (the behaviour policy's when mu > 1) against the
                    # engine's: the check that the engine serves the weights the learner thinks it does.
                    behaviour_BT = old_logp[rows] if old_logp is not None else logp_BT
                    m["sampler_gap"] = sampler_gap(behaviour_BT, t["sampling_logp_BT"][rows], t["mask_BT"][rows])
                    per_micro.append(m)
                    loss_sum += float(loss.detach())
                grad_norms.append(float(self.engine.get_global_grad_norm() or 0.0))
        timings["train"] = time.perf_counter() - t0

        self.step += 1
        if self.ref is not None and lc.ref_sync_every and self.step % lc.ref_sync_every == 0:
            lerp_(self._local_tensors(self.ref), self._local_tensors(self.engine.module), lc.ref_sync_alpha)

        n_steps = ac.num_iterations * lc.optimizer_steps_per_batch
        out = unpack_metrics(self._sum_over_ranks(pack_metrics(per_micro, loss_sum)), n_steps)
        # Every pass sees the same tokens; count the batch once.
        tokens = float(self._sum_over_ranks(t["mask_BT"].sum()))
        out.update(
            grad_norm=sum(grad_norms) / len(grad_norms),
            lr=lrs[-1],
            tokens=tokens,
            # Trained tokens (every pass counts) per second of the update phase.
            tokens_per_s=tokens * ac.num_iterations / max(timings["train"], 1e-9),
            optimizer_steps=float(self.engine.global_steps),
        )
        out.update({f"time/{k}": v for k, v in timings.items()})
        return out
