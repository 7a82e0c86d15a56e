"""The Ray job: start (or join) Ray, create the learner group and rollout workers, run the
driver loop, and release everything on the way out (actors, placement groups, a local head).

This is the only place that knows both `rollout_server` and `learner`; they never import each
other. `RayCluster` implements `grpo_dist.driver.Cluster`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from deploy.cluster_nodes import describe_placement, head_node_id, lost_nodes, selector_problems
from deploy.control import AUTH_HINT
from grpo_dist.config import Config
from grpo_dist.driver import Trainer, evaluate
from grpo_dist.errors import UserError, first_line
from grpo_dist.metrics import COUNT, ROLLOUT_COUNT, counter_names, prometheus_name
from learner import LearnerGroup
from reward_server import RewardGroup
from rollout_server import RolloutManager
from rollout_server.pool import death_reason

log = logging.getLogger("grpo_dist.job")
NAMESPACE = "grpo-dist"


@ray.remote(num_cpus=0)
class MetricsExporter:
    """Named actor holding `ray.util.metrics` gauges so they show in the dashboard's metrics view."""

    def __init__(self) -> None:
        self._gauges: dict[str, Any] = {}

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def record(self, metrics: dict[str, float]) -> None:
        from ray.util.metrics import Gauge

        for key, value in metrics.items():
            name = prometheus_name(key)  # keys and their series: grpo_dist/metrics.py
            g = self._gauges.get(name)
            if g is None:
                g = self._gauges[name] = Gauge(name, description=f"grpo-dist {key}")
            g.set(value)


@ray.remote(num_cpus=0)
class JobControl:
    """Named actor the running job polls between steps; `grpo-dist scale` writes to it."""

    def __init__(self, workers: int, reward_workers: dict[str, int] | None = None) -> None:
        self._workers = workers
        self._reward_workers = dict(reward_workers or {})

    def set_desired_workers(self, n: int) -> int:
        if n < 1:
            raise ValueError(f"the job needs at least one rollout worker, got {n}")
        self._workers = n
        return n

    def desired_workers(self) -> int:
        return self._workers

    def set_desired_reward_workers(self, name: str, n: int) -> int:
        if name not in self._reward_workers:
            raise ValueError(f"the job serves no reward model {name!r}; it serves {sorted(self._reward_workers)}")
        if n < 1:
            raise ValueError(f"reward model {name!r} needs at least one worker, got {n}")
        self._reward_workers[name] = n
        return n

    def desired_reward_workers(self) -> dict[str, int]:
        return dict(self._reward_workers)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class RayCluster:
    """The learner group + rollout workers of one job, and the weight sync between them."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.learner = LearnerGroup(
            cfg.learner,
            cfg.model,
            cfg.algorithm,
            cfg.cluster,
            total_steps=cfg.trainer.steps,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        )
        self.rollout = RolloutManager(
            cfg.rollout,
            cfg.model,
            cfg.algorithm,
            cfg.rewards,
            cfg.cluster,
            max_model_len=cfg.max_model_len,
            ensure_weights=self._push_current_weights,
        )
        self.rewards = {
            m.name: RewardGroup(m, cfg.cluster.max_worker_restarts, cfg.cluster.rpc_timeout_s)
            for m in cfg.rewards.models
        }
        nodes = ray.nodes()
        problems = selector_problems(
            nodes,
            {
                "cluster.learner_label_selector": cfg.cluster.learner_label_selector,
                "cluster.rollout_label_selector": cfg.cluster.rollout_label_selector,
                **{f"rewards.models[{m.name}].label_selector": m.label_selector for m in cfg.rewards.models},
            },
        )
        if problems:
            raise UserError("; ".join(problems))
        # The control and metrics actors live on the head: the cluster does not outlive it anyway,
        # while any other node may go away mid-run with whatever Ray placed there.
        head = head_node_id(nodes)
        on_head = {"scheduling_strategy": NodeAffinitySchedulingStrategy(head, soft=False)} if head else {}
        self._metrics = None
        if cfg.logging.ray_metrics:
            self._metrics = MetricsExporter.options(
                name="grpo-metrics", namespace=NAMESPACE, get_if_exists=True, **on_head
            ).remote()
        self._manifest = None
        self.synced_weight_version = 0  # what every live rollout worker must serve
        # The learner's weights right now (the driver passes it to maintain/sync_weights); a re-push
        # sends these, so it is tagged with this version, which may be newer than synced_weight_version.
        self.learner_weight_version = 0
        self.control = JobControl.options(
            name="grpo-control", namespace=NAMESPACE, get_if_exists=True, **on_head
        ).remote(cfg.rollout.num_workers, {m.name: m.num_workers for m in cfg.rewards.models})
        # Learner ranks and the control actors never move (a lost learner rank fails the job); rollout
        # workers do (Ray restarts them elsewhere) and are asked of the rollout manager each time.
        self._fixed_nodes: dict[str, str] = {}
        self.counters = dict.fromkeys(counter_names("cluster"), 0)  # count/<name> in grpo_dist.metrics

    def start(self) -> None:
        timeout = self.cfg.cluster.rpc_timeout_s
        t0 = time.perf_counter()
        self.learner.start(timeout_s=timeout)
        for group in self.rewards.values():  # before the first batch asks them
            group.start(timeout_s=timeout)
        self.rollout.start(timeout_s=timeout)
        log.info(
            "learner group (%d ranks) and %d rollout workers up in %.1fs",
            self.cfg.learner.num_ranks,
            self.cfg.rollout.num_workers,
            time.perf_counter() - t0,
        )
        log.info("placement: %s", describe_placement(self.placement(), ray.nodes()))

    def placement(self) -> dict[str, str]:
        """Actor name -> node id, for every actor of the job (the last node each was seen on)."""
        for name, where in self.learner.placement().items():
            self._fixed_nodes[name] = where["node_id"]
        rpc = self.cfg.cluster.rpc_timeout_s
        for name, actor in (("grpo-control", self.control), ("grpo-metrics", self._metrics)):
            if actor is not None:
                self._fixed_nodes[name] = ray.get(actor.node_id.remote(), timeout=rpc)
        return self._actor_nodes()

    def _actor_nodes(self) -> dict[str, str]:
        """Where each actor is now, as last seen: a restarted rollout worker on its new node."""
        served = {k: v for g in self.rewards.values() for k, v in g.placement().items()}
        return {**self._fixed_nodes, **self.rollout.placement(), **served}

    def sync_weights(self, version: int) -> dict[str, float]:
        """Broadcast the learner's weights (tagged `version`) to every rollout engine.

        Restarting workers are waited for first. A failed attempt (a worker died mid-transfer, or a
        join timed out) is retried once on a fresh port after the restarted workers are back; a
        manifest mismatch (ValueError) is not retried."""
        self.learner_weight_version = version
        t0 = time.perf_counter()
        self.rollout.refresh()
        try:
            sent = self._sync_once(version)
        except ValueError:
            raise
        except (RayError, TimeoutError, RuntimeError) as first:
            self.counters["sync_retries"] += 1
            log.warning(
                "weight sync v%d failed (%s); retrying once on a fresh port with the workers that answer",
                version,
                first,
            )
            self.rollout.refresh()
            try:
                sent = self._sync_once(version)
            except (RayError, TimeoutError, RuntimeError) as second:
                raise RuntimeError(f"weight sync v{version} failed twice; first: {first}; retry: {second}") from second
        return {
            "seconds": time.perf_counter() - t0,
            "bytes": float(sent.get("bytes", 0)),
            "version": version,
            "wait_seconds": sent["wait_seconds"],
        }

    def _sync_once(self, version: int) -> dict:
        # Half the learner group's collective timeout: while learner rank 0 joins the sync group (and
        # sends each bucket), the other ranks wait in a DeepSpeed-group collective. A join or send
        # that fails must fail before that wait times out, or the timeout breaks the learner group for
        # good (measured: a receiver killed after joining left every later collective failing with
        # "Application timeout caused pair closure").
        timeout = self.cfg.cluster.collective_timeout_s / 2
        rpc = self.cfg.cluster.rpc_timeout_s
        if self._manifest is None:
            self._manifest = self.learner.weight_manifest()
        host, port = self.learner.sync_address()
        self.synced_weight_version = version
        names = self.rollout.worker_names
        t0 = time.perf_counter()
        recv_refs = self.rollout.start_receive_weights(
            self._manifest,
            version,
            host,
            port,
            timeout_s=timeout,
            bucket_bytes=int(self.cfg.learner.weight_sync_bucket_mb * 2**20),
        )
        try:
            sent = self.learner.broadcast_weights(
                host, port, self.rollout.sync_group_size(), version, timeout_s=timeout
            )
        except Exception as e:
            # Let the receivers finish failing (their join/transfer times out) before anyone retries,
            # so no worker's engine thread is still busy with this attempt.
            ray.wait(recv_refs, num_returns=len(recv_refs), timeout=timeout + rpc)
            receivers = "; ".join(f"{n}: {_outcome(r)}" for n, r in zip(names, recv_refs))
            raise RuntimeError(
                f"weight sync v{version} at {host}:{port} failed after {time.perf_counter() - t0:.0f}s: "
                f"learner: {first_line(e)}; {receivers}"
            ) from e
        _, not_ready = ray.wait(recv_refs, num_returns=len(recv_refs), timeout=timeout)
        if not_ready:
            late = [n for n, r in zip(names, recv_refs) if r in not_ready]
            raise TimeoutError(
                f"weight sync v{version}: rollout workers {late} did not finish loading within {timeout:.0f}s"
            )
        waits = [0.0]
        for name, ref in zip(names, recv_refs):
            try:
                waits.append(ray.get(ref, timeout=rpc)["wait_seconds"])
            except RayError as e:
                raise RuntimeError(f"weight sync v{version}: {name} failed while receiving: {first_line(e)}") from e
        versions = self.rollout.weight_versions()
        stale = {k: v for k, v in versions.items() if v != version}
        if stale:
            raise RuntimeError(f"weight sync v{version}: workers still report {stale}")
        self.rollout.mark_synced(version)
        return {**sent, "wait_seconds": max(waits)}

    def _push_current_weights(self) -> None:
        """The rollout manager's hook for a restarted worker: serve the learner's weights again."""
        self.counters["worker_restarts_repushed"] += 1
        self.sync_weights(self.learner_weight_version)

    def maintain(self, version: int) -> dict[str, float]:
        """Between steps: apply a requested worker count (`grpo-dist scale`), and push the learner's
        weights to every worker that does not serve the last sync's version (a restarted or new actor)
        before anything generates. Down workers are not waited for while others serve (the rollout
        manager's docstring); new workers start without blocking the step and join once up."""
        self.learner_weight_version = version
        want = ray.get(self.control.desired_workers.remote(), timeout=self.cfg.cluster.rpc_timeout_s)
        versions = self.rollout.refresh()
        have = self.rollout.num_registered
        while have < want:
            self.rollout.start_add_worker()
            self.counters["workers_added"] += 1
            have += 1
        while have > max(want, 1):
            log.info("scaling down: removed %s", self.rollout.remove_worker())
            self.counters["workers_removed"] += 1
            have -= 1
        versions = {k: v for k, v in versions.items() if k in self.rollout.worker_names}
        states = self.rollout.states()
        behind = {k: v for k, v in versions.items() if v != self.synced_weight_version or states.get(k) != "serving"}
        if behind:
            # The learner may have trained since the last sync (sync_every > 1): push what it holds now,
            # tagged with its own version, to everyone, so no two workers serve different weights.
            log.warning(
                "workers %s do not serve the job's weights (v%d); pushing v%d before they generate",
                behind,
                self.synced_weight_version,
                version,
            )
            self.counters["worker_restarts_repushed"] += len(behind)
            self.sync_weights(version)
        states = self.rollout.states()
        served = self._maintain_rewards()  # before the counters are read: it counts its scaling
        counters = {COUNT + k: v for k, v in self.counters.items()} | {
            ROLLOUT_COUNT + k: v for k, v in self.rollout.counters.items()
        }
        return (
            {k: float(v) for k, v in counters.items()}
            | served
            | {
                "rollout/num_workers": float(sum(s == "serving" for s in states.values())),
                "rollout/workers_down": float(sum(s == "down" for s in states.values())),
                "rollout/workers_starting": float(sum(s == "starting" for s in states.values())),
            }
        )

    def _maintain_rewards(self) -> dict[str, float]:
        """Scale each served reward model to its requested count and poll its actors; their gauges."""
        if not self.rewards:
            return {}
        want = ray.get(self.control.desired_reward_workers.remote(), timeout=self.cfg.cluster.rpc_timeout_s)
        out: dict[str, float] = {}
        for name, group in self.rewards.items():
            added, removed = group.scale(want[name])
            self.counters["reward_workers_added"] += added
            self.counters["reward_workers_removed"] += removed
            group.refresh()
            out |= group.metrics()
        return out

    def dead_actors(self, timeout_s: float = 5.0) -> dict[str, str]:
        """Learner ranks and rollout workers that are dead now, with Ray's reason. A busy actor (stuck in
        a collective) does not answer within ``timeout_s`` and counts as alive."""
        actors = {f"learner rank {r} ({self.learner.name_prefix}-{r})": a for r, a in enumerate(self.learner.actors)}
        dead = {}
        for name in self.rollout.worker_names:
            try:
                actors[name] = ray.get_actor(name)
            except ValueError as e:  # no longer registered: dead for good
                dead[name] = first_line(e)
        refs = {name: a.__ray_ready__.remote() for name, a in actors.items()}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for name, ref in refs.items():
            try:
                ray.get(ref, timeout=0.1)
            except ActorDiedError as e:
                dead[name] = death_reason(e)
            except (GetTimeoutError, RayError):
                pass
        return dead

    def lost_nodes(self) -> str | None:
        """One line naming each dead node that hosted actors of this job, with those actors."""
        try:
            return lost_nodes(self._actor_nodes(), ray.nodes())
        except RayError:
            return None

    def record_metrics(self, metrics: dict[str, float]) -> None:
        if self._metrics is not None:
            self._metrics.record.remote(metrics)

    def shutdown(self) -> None:
        """Release every actor; never blocks longer than the learner's bounded shutdown (30 s)."""
        for part in (self.rollout, *self.rewards.values(), self.learner):
            try:
                part.shutdown()
            except Exception as e:  # keep releasing the rest
                log.warning("shutdown of %s failed: %s", type(part).__name__, e)
        for actor in (self._metrics, self.control):
            if actor is not None:
                ray.kill(actor)


def _ray_init(cfg: Config) -> bool:
    """Join a cluster if one is named (or we run inside a submitted job), else start a local head.
    Returns True when this process started Ray (and so must stop it)."""
    if ray.is_initialized():
        return False
    env = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}}
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address=cfg.cluster.address, namespace=NAMESPACE, runtime_env=env, log_to_driver=True)
        except ConnectionError as e:  # `auto` with no cluster to find, or a refused token
            raise UserError(f"cluster.address={cfg.cluster.address!r}: {first_line(e)}; {AUTH_HINT}") from None
        return False
    # Logical CPUs: every actor asks for its share; on a small machine they time-share the cores.
    need = (
        cfg.learner.num_ranks * cfg.cluster.num_cpus_per_learner
        + cfg.rollout.num_workers * cfg.cluster.num_cpus_per_rollout
        + 1
    )
    ctx = ray.init(
        namespace=NAMESPACE,
        num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=env,
        log_to_driver=True,
    )
    log.info("local Ray head started; dashboard: http://%s", ctx.dashboard_url or "unavailable")
    return True


def _raise_stop(signum, frame):  # SIGTERM from `ray job stop` becomes a clean unwind
    raise KeyboardInterrupt(f"signal {signum}")


def run_job(cfg: Config, train_rows: list[dict], test_rows: list[dict], resume: bool = False) -> dict[str, Any]:
    """The training job on rows loaded beforehand (``grpo_dist.data.load_run_rows``), so that data
    errors surface before any actor starts."""
    started = _ray_init(cfg)
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    cluster = RayCluster(cfg)
    try:
        cluster.start()
        trainer = Trainer(cfg, cluster, train_rows, test_rows, Path(cfg.trainer.output_dir))
        try:
            return trainer.run(resume=resume)
        except KeyboardInterrupt:
            if cfg.checkpoint.save_every or cfg.checkpoint.save_at_end:
                log.warning("stopping: saving a checkpoint at step %d first", trainer.step)
                trainer.save()
            raise
        except Exception as e:
            dead = cluster.dead_actors()
            if not dead:
                raise
            # A dead learner rank leaves the ZeRO group unusable: no checkpoint is attempted; the
            # last complete one (saves are atomic) is where `--resume` continues.
            nodes = cluster.lost_nodes()
            who = nodes or "actors died: " + "; ".join(f"{name}: {why}" for name, why in dead.items())
            where = " on a cluster with room for the learner again" if nodes else ""
            raise RuntimeError(
                f"job failed at step {trainer.step + 1}: {who}. Resume from the last complete "
                f"checkpoint under {cfg.checkpoint_dir} with --resume{where}"
            ) from e
    finally:
        cluster.shutdown()
        signal.signal(signal.SIGTERM, previous)
        if started:
            ray.shutdown()


def run_eval(cfg: Config, test_rows: list[dict]) -> dict[str, Any]:
    """Evaluate `cfg.model.path` on the held-out rows with rollout workers only."""
    started = _ray_init(cfg)
    rollout = RolloutManager(
        cfg.rollout, cfg.model, cfg.algorithm, cfg.rewards, cfg.cluster, max_model_len=cfg.max_model_len
    )
    try:
        rollout.start(timeout_s=cfg.cluster.rpc_timeout_s)
        return evaluate(rollout, test_rows[: cfg.trainer.eval_num_prompts], cfg)
    finally:
        rollout.shutdown()
        if started:
            ray.shutdown()


def _outcome(ref) -> str:
    """What a settled (or still running) receive call ended with, in one line."""
    try:
        ray.get(ref, timeout=0.1)
        return "loaded"
    except GetTimeoutError:
        return "still running"
    except RayError as e:
        return first_line(e)
