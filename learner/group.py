"""Driver-side handle of the learner group: N Ray actors forming one DeepSpeed ZeRO group."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import AlgoConfig, ClusterConfig, LearnerConfig, ModelConfig
from grpo_dist.weight_sync import ParamSpec
from learner.actor import LearnerActor
from learner.rank_placement import placement_bundles


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while one call is handed to every rank. Interrupted half-way, some ranks
    would enter the call's collective and wait until its timeout for ranks that never got it, and
    the checkpoint saved on the way out would meet them there (seen: SIGTERM mid-step, then a gloo
    timeout instead of a checkpoint). A signal that arrives meanwhile is handled right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, _frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            handler = previous[held[0]]
            if callable(handler):
                handler(held[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), held[0])


class LearnerGroup:
    """Every collective method is called on all ranks at once; rank 0's answer is returned.

    ``gradient_accumulation_steps`` only seeds the DeepSpeed config (``Config.gradient_accumulation_steps``);
    each ``train_step`` derives it from the batch size and fails clearly if the batch does not split.
    """

    def __init__(
        self,
        learner_cfg: LearnerConfig,
        model_cfg: ModelConfig,
        algo_cfg: AlgoConfig,
        cluster_cfg: ClusterConfig,
        total_steps: int,
        gradient_accumulation_steps: int = 1,
        name_prefix: str = "learner",
    ) -> None:
        self.learner_cfg, self.model_cfg = learner_cfg, model_cfg
        self.algo_cfg, self.cluster_cfg = algo_cfg, cluster_cfg
        self.total_steps = total_steps
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.name_prefix = name_prefix  # actors are "<prefix>-<rank>"; distinct prefixes let groups coexist
        self.actors: list[Any] = []
        self.pg = None

    @property
    def world_size(self) -> int:
        return self.learner_cfg.num_ranks

    def _get(self, refs: Any, what: str, timeout_s: float | None = None) -> Any:
        """Wait for ``refs`` (one ref or a list) within ``timeout_s``. The first rank that fails
        raises at once: the others would wait in a collective for it until their own timeout."""
        timeout = self.cluster_cfg.rpc_timeout_s if timeout_s is None else timeout_s
        many = isinstance(refs, list)
        pending = list(refs) if many else [refs]
        deadline = time.monotonic() + timeout
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"learner group: {what} did not finish within {timeout:.0f}s")
            ray.get(ready)  # raises the rank's error (RayTaskError, ActorDiedError) now
        return ray.get(refs)

    def _call_all(self, method: str, *args: Any, timeout_s: float | None = None) -> list[Any]:
        with _signals_deferred():
            refs = [getattr(a, method).remote(*args) for a in self.actors]
        return self._get(refs, f"{method} on all ranks", timeout_s)

    def start(self, timeout_s: float = 300.0) -> None:
        """Reserve the placement group, start the ranks, rendezvous and build the engines.
        On failure everything started so far is torn down before the error propagates."""
        try:
            self._start(timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, timeout_s: float) -> None:
        c = self.cluster_cfg
        bundles = placement_bundles(self.world_size, c.num_cpus_per_learner, c.num_gpus_per_learner)
        selector = [dict(c.learner_label_selector)] * len(bundles) if c.learner_label_selector else None
        self.pg = placement_group(bundles, strategy=c.placement_strategy, bundle_label_selector=selector)
        on = f" on nodes matching {c.learner_label_selector}" if selector else ""
        self._get(
            self.pg.ready(),
            f"reserving placement group {bundles}{on} ({c.placement_strategy}; are the cluster's resources free?)",
            timeout_s,
        )
        actor_cls = ray.remote(LearnerActor)
        self.actors = [
            actor_cls.options(
                name=f"{self.name_prefix}-{rank}",
                num_cpus=c.num_cpus_per_learner,
                num_gpus=c.num_gpus_per_learner,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(
                rank,
                self.world_size,
                self.learner_cfg,
                self.model_cfg,
                self.algo_cfg,
                self.cluster_cfg,
                self.total_steps,
                self.gradient_accumulation_steps,
            )
            for rank in range(self.world_size)
        ]
        # Rank 0 picks the rendezvous address on its own node; the others are told.
        host, port = self._get(self.actors[0].master_address.remote(), "rank 0 address", timeout_s)
        self._call_all("setup", host, port, timeout_s=timeout_s)

    def placement(self) -> dict[str, dict]:
        """Actor name -> {node_id, node_ip, pid} of every rank."""
        where = self._get([a.where.remote() for a in self.actors], "where")
        return {f"{self.name_prefix}-{r}": w for r, w in enumerate(where)}

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        ref = ray.put(batch)
        return self._call_all("train_step", ref)[0]

    def weight_manifest(self) -> list[ParamSpec]:
        return self._get(self.actors[0].weight_manifest.remote(), "weight_manifest")

    def sync_address(self) -> tuple[str, int]:
        return self._get(self.actors[0].sync_address.remote(), "sync_address")

    def broadcast_weights(self, host: str, port: int, sync_group_size: int, version: int, timeout_s: float) -> dict:
        """Send the weights into the weight-sync group at ``host:port`` of ``sync_group_size`` ranks
        (learner rank 0 + receivers). Returns ``{"bytes", "seconds", "version"}``."""
        return self._call_all(
            "broadcast_weights",
            host,
            port,
            sync_group_size,
            version,
            timeout_s,
            timeout_s=timeout_s + self.cluster_cfg.rpc_timeout_s,
        )[0]

    def gathered_state_dict(self, reference: bool = False) -> dict:
        """The full policy (or reference-model) weights: CPU tensors, HF names, tied lm_head left out."""
        return self._call_all("gathered_state_dict", reference)[0]

    def save_hf(self, path: str) -> None:
        self._call_all("save_hf", path)

    def save_checkpoint(self, path: str) -> None:
        self._call_all("save_checkpoint", path)

    def load_checkpoint(self, path: str) -> None:
        self._call_all("load_checkpoint", path)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Destroy the process groups, kill the actors, release the placement group."""
        if self.actors:
            try:
                self._call_all("shutdown", timeout_s=timeout_s)
            except (TimeoutError, ray.exceptions.RayError):
                pass  # a dead or stuck rank is killed below either way
            for a in self.actors:
                ray.kill(a)
            self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
