"""The GRPO driver loop.

Readable top to bottom: sample unique prompts -> rollout workers generate G completions each
and score them -> advantages -> learner group trains -> every ``sync_every`` steps broadcast
weights -> log, evaluate, checkpoint.

It talks to the cluster only through the two small protocols below; ``deploy/`` implements
them with Ray actors (so this module never imports ray, vllm or deepspeed) and tests can
implement them in-process.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from grpo_dist.advantages import compute_advantages
from grpo_dist.batch import STOP_REASONS, RolloutBatch, check_groups
from grpo_dist.checkpoint import latest_checkpoint, save_checkpoint
from grpo_dist.config import Config, dump_config
from grpo_dist.data import PromptSampler
from grpo_dist.metrics import COUNT, counter_names
from grpo_dist.monitoring import RunLogger
from grpo_dist.rewards import REWARDS
from grpo_dist.streaming import GroupStream, token_age_metrics

log = logging.getLogger("grpo_dist.driver")


class RolloutHandle(Protocol):
    def generate(self, prompts: list[dict], n: int | None = None, sampling: dict | None = None) -> RolloutBatch: ...
    def start_generate(self, prompts: list[dict]) -> Any: ...
    def collect(self, handle: Any) -> RolloutBatch: ...
    def weight_versions(self) -> dict[str, int]: ...


class LearnerHandle(Protocol):
    def train_step(self, batch: RolloutBatch) -> dict[str, float]: ...
    def save_hf(self, path: str) -> None: ...
    def save_checkpoint(self, path: str) -> None: ...
    def load_checkpoint(self, path: str) -> None: ...


class Cluster(Protocol):
    """What the loop needs from the running job: the two groups and the weight sync between them."""

    rollout: RolloutHandle
    learner: LearnerHandle

    def sync_weights(self, version: int) -> dict[str, float]: ...
    def maintain(self, version: int) -> dict[str, float]: ...
    def record_metrics(self, metrics: dict[str, float]) -> None: ...


@dataclass
class PhaseTimer:
    """Wall time per phase for one step; whatever no phase claims is ``idle``."""

    totals: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] = self.totals.get(phase, 0.0) + seconds

    def time(self, phase: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.add(phase, time.perf_counter() - t0)


def eval_rows(rows: list[dict], completions: list[str], k: int) -> dict[str, float]:
    """Mean accuracy and format reward of ``k`` completions per row (rows in order)."""
    answers = [r["answer"] for r in rows for _ in range(k)]
    prompts = [r["prompt"] for r in rows for _ in range(k)]
    acc = REWARDS["accuracy"](prompts, completions, answer=answers)
    fmt = REWARDS["format"](prompts, completions, answer=answers)

    def mean(xs: list) -> float:
        vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
        return sum(vals) / len(vals) if vals else float("nan")

    return {"accuracy": mean(acc), "format_reward": mean(fmt), "num_prompts": len(rows), "samples_per_prompt": k}


def evaluate(rollout: RolloutHandle, rows: list[dict], cfg: Config) -> dict[str, float]:
    k = cfg.trainer.eval_num_samples
    sampling = {"temperature": cfg.trainer.eval_temperature, "seed": cfg.trainer.seed}
    batch = rollout.generate(rows, n=k, sampling=sampling)
    return eval_rows(rows, batch.completions, k)


def zero_variance_groups(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool per group: all usable rewards equal (such a group carries no GRPO signal)."""
    r_UG = rewards_B.view(-1, group_size)  # shape letters: grpo_dist/losses.py
    finite_UG = torch.isfinite(r_UG)
    hi_U = torch.where(finite_UG, r_UG, torch.full_like(r_UG, -math.inf)).amax(dim=1)
    lo_U = torch.where(finite_UG, r_UG, torch.full_like(r_UG, math.inf)).amin(dim=1)
    return ~(hi_U > lo_U)


def batch_metrics(batch: RolloutBatch, group_size: int) -> dict[str, float]:
    r = batch.rewards_tensor()
    finite = torch.isfinite(r)
    lens = torch.tensor([len(c) for c in batch.completion_ids], dtype=torch.float32)
    out = {
        "reward/mean": r[finite].mean().item() if finite.any() else float("nan"),
        "reward/std": r[finite].std().item() if finite.sum() > 1 else 0.0,
        "reward/missing_frac": 1.0 - finite.float().mean().item(),
        "completion/len_mean": lens.mean().item(),
        "completion/truncated_frac": sum(batch.truncated) / len(batch),
        "groups/zero_variance_frac": zero_variance_groups(r, group_size).float().mean().item(),
    }
    for name, vals in batch.reward_components.items():
        t = torch.tensor(vals, dtype=torch.float32)
        ok = torch.isfinite(t)
        out[f"reward/{name}"] = t[ok].mean().item() if ok.any() else float("nan")
    for k, v in batch.metrics.items():
        out[f"rollout/{k}"] = float(v)
    if batch.num_turns is not None:
        out.update(episode_metrics(batch))
    return out


def episode_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Multi-turn rows: turns, the share of tokens the model did not write, why episodes stopped."""
    total = sum(len(c) for c in batch.completion_ids)
    model = sum(sum(m) for m in batch.loss_mask or batch.full_loss_mask())
    out = {
        "rollout/turns_mean": sum(batch.num_turns) / len(batch),
        "rollout/env_token_fraction": 1.0 - model / max(total, 1),
    }
    for reason in STOP_REASONS:
        out[f"rollout/stop/{reason}"] = float(sum(r == reason for r in batch.stop_reasons))
    return out


class Trainer:
    """One GRPO run on a ``Cluster``. ``train_rows``/``test_rows`` are loaded ``grpo_dist.data`` rows."""

    def __init__(self, cfg: Config, cluster: Cluster, train_rows: list[dict], test_rows: list[dict], run_dir: Path):
        self.cfg = cfg
        self.cluster = cluster
        self.train_rows = train_rows
        self.test_rows = test_rows[: cfg.trainer.eval_num_prompts]
        self.run_dir = Path(run_dir)
        self.ckpt_root = Path(cfg.checkpoint_dir)
        self.sampler = PromptSampler(len(train_rows), cfg.trainer.prompts_per_step, cfg.trainer.seed)
        self.trained_position = self.sampler.state_dict()
        self.num_workers = cfg.rollout.num_workers  # kept current by cluster.maintain()
        self.step = 0
        self.learner_weight_version = 0  # learner updates applied; rollout workers serve <= this
        self.counters = dict.fromkeys(counter_names("driver"), 0)  # count/<name> in grpo_dist.metrics
        self.totals = PhaseTimer()
        self.logger = RunLogger(self.run_dir, cfg.logging, record=cluster.record_metrics)
        self.stream = (
            GroupStream(cfg, cluster.rollout, train_rows, self.sampler.next_indices, self.counters)
            if cfg.rollout.streaming
            else None
        )

    # ---- data --------------------------------------------------------------------------
    def _draw(self) -> tuple[list[dict], dict, list[int]]:
        """Next unique prompts, the sampler position after them (what a checkpoint records once
        this draw is trained on, so prompts still in flight are regenerated on resume), and their
        data indices."""
        indices = self.sampler.next_indices()
        return [self.train_rows[i] for i in indices], self.sampler.state_dict(), indices

    def _generate(self, timer: PhaseTimer) -> tuple[RolloutBatch, list[int]]:
        rows, position, indices = self._draw()
        batch = timer.time("generate", lambda: self.cluster.rollout.generate(rows))
        check_groups(batch, rows, self.cfg.algorithm.num_generations)
        self.trained_position = position
        return batch, indices

    def _dynamic_top_up(
        self, batch: RolloutBatch, indices: list[int], timer: PhaseTimer
    ) -> tuple[RolloutBatch, list[int]]:
        """DAPO dynamic sampling: replace zero-variance groups with fresh ones (bounded rounds).

        On-policy only (the config enforces it), so every extra batch has the same weight version.
        Returns the batch and the data index of each of its groups."""
        G = self.cfg.algorithm.num_generations
        want = self.cfg.trainer.prompts_per_step

        def informative(b: RolloutBatch, idx: list[int]) -> tuple[RolloutBatch, list[int]]:
            zero = zero_variance_groups(b.rewards_tensor(), G).tolist()
            self.counters["groups_dropped_zero_variance"] += sum(zero)
            keep = [g for g, z in enumerate(zero) if not z]
            return b.select([g * G + j for g in keep for j in range(G)]), [idx[g] for g in keep]

        kept, kept_idx = informative(batch, indices)
        for _ in range(4):  # bounded: a task the policy always (or never) solves cannot stall the run
            if kept.num_groups >= want:
                break
            self.counters["extra_generate_calls"] += 1
            more, more_idx = informative(*self._generate(timer))
            kept, kept_idx = RolloutBatch.concat([kept, more]), kept_idx + more_idx
        if kept.num_groups < want:
            # Still short: pad with zero-variance groups (zero advantage: no signal, but the batch keeps
            # the shape the learner's batch arithmetic needs).
            zero = [g for g, z in enumerate(zero_variance_groups(batch.rewards_tensor(), G).tolist()) if z]
            filler = zero[: want - kept.num_groups]
            kept = RolloutBatch.concat([kept, batch.select([g * G + j for g in filler for j in range(G)])])
            kept_idx += [indices[g] for g in filler]
        return kept.select(list(range(want * G))), kept_idx[:want]

    def _start_generate(self) -> tuple[Any, dict, list[dict], list[int]]:
        rows, position, indices = self._draw()
        return self.cluster.rollout.start_generate(rows), position, rows, indices

    # ---- one step ----------------------------------------------------------------------
    def _train_on(self, batch: RolloutBatch, indices: list[int], timer: PhaseTimer) -> dict[str, float]:
        G = self.cfg.algorithm.num_generations
        if self.cfg.algorithm.dynamic_sampling:
            batch, indices = self._dynamic_top_up(batch, indices, timer)
        batch.advantages = compute_advantages(batch.rewards_tensor(), G, self.cfg.algorithm).tolist()
        metrics = batch_metrics(batch, G)
        metrics["staleness"] = float(self.learner_weight_version - batch.weight_version)
        if batch.token_versions is not None:
            metrics.update(token_age_metrics(batch, self.learner_weight_version))
        metrics["rollout/weight_version"] = float(batch.weight_version)
        t0 = time.perf_counter()
        learner_metrics = self.cluster.learner.train_step(batch)
        train_wall = time.perf_counter() - t0
        self.logger.log_prompts(self.step + 1, batch.weight_version, indices)
        # The learner reports how long its reference/old log-prob passes took; the rest is training.
        ref = float(learner_metrics.get("time/ref_logp", 0.0)) + float(learner_metrics.get("time/old_logp", 0.0))
        timer.add("ref_logp", min(ref, train_wall))
        timer.add("train", max(train_wall - ref, 0.0))
        metrics.update({f"learner/{k}": v for k, v in learner_metrics.items()})
        # Engine time and scoring happen inside the workers (in parallel across them; batch timings
        # are summed over workers): report their per-worker share next to the driver's wait.
        workers = max(1, self.num_workers)
        metrics["rollout/engine_seconds"] = float(batch.timings.get("generate", 0.0)) / workers
        metrics["rollout/score_seconds"] = float(batch.timings.get("score", 0.0)) / workers
        return metrics

    def _sync(self, timer: PhaseTimer) -> dict[str, float]:
        out = timer.time("weight_sync", lambda: self.cluster.sync_weights(self.learner_weight_version))
        return {f"sync/{k}": float(v) for k, v in out.items()}

    # ---- the loop ----------------------------------------------------------------------
    def resume(self) -> bool:
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            log.info("no checkpoint under %s: starting from scratch", self.ckpt_root)
            return False
        state = json.loads((path / "state.json").read_text())
        self.cluster.learner.load_checkpoint(str(path / "deepspeed"))
        self.sampler.load_state_dict(state["sampler"])
        self.trained_position = state["sampler"]
        self.step = state["step"]
        self.learner_weight_version = state["weight_version"]
        self.counters.update(state.get("counters", {}))
        if self.stream is not None:
            self.stream.queued = list(state.get("in_flight", []))
        elif state.get("in_flight"):
            raise ValueError(
                f"checkpoint {path} was written by a streaming run with {len(state['in_flight'])} prompts in flight; "
                "resume it with rollout.streaming: true, or they would never be trained"
            )
        random.setstate(_tuple_state(state["rng"]["python"]))
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
        # A restarted job's rollout workers serve the initial checkpoint: push the resumed weights first.
        self.cluster.sync_weights(self.learner_weight_version)
        log.info("resumed from %s at step %d (weight version %d)", path, self.step, self.learner_weight_version)
        return True

    def save(self) -> Path:
        state = {
            "step": self.step,
            "weight_version": self.learner_weight_version,
            "sampler": self.trained_position,
            "counters": self.counters,
            **({"in_flight": self.stream.pending_indices()} if self.stream is not None else {}),
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state().tolist()},
            "config": self.cfg.model_dump(mode="json"),
        }
        learner = self.cluster.learner
        return save_checkpoint(
            self.ckpt_root,
            self.step,
            state,
            writers={"policy": learner.save_hf, "deepspeed": learner.save_checkpoint},
            keep_last=self.cfg.checkpoint.keep_last,
        )

    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        if resume:
            self.resume()
        eval_before = self.totals.time("eval", lambda: evaluate(self.cluster.rollout, self.test_rows, cfg))
        log.info("eval before: %s", eval_before)
        self.logger.log_eval(self.step, eval_before)

        staleness = cfg.trainer.max_staleness
        pending: deque = deque()  # async mode: generations in flight, oldest first
        completions = 0
        loop_seconds = 0.0  # training-loop wall time, eval and checkpoints excluded
        progress = self.logger.progress(total=cfg.trainer.steps, initial=self.step)
        while self.step < cfg.trainer.steps:
            timer = PhaseTimer()
            t0 = time.perf_counter()
            # Scale requests and restarted workers are handled between steps, before any generation.
            upkeep = timer.time("weight_sync", lambda: self.cluster.maintain(self.learner_weight_version))
            self.num_workers = int(upkeep.get("rollout/num_workers", self.num_workers))
            if self.stream is not None:
                self.stream.fill(cfg.trainer.steps - self.step)
                batch, indices = self.stream.take(self.learner_weight_version, partial(timer.time, "generate"))
                self.trained_position = self.sampler.state_dict()
            elif staleness == 0:
                batch, indices = self._generate(timer)
            else:
                drops = 0
                while True:
                    if not pending:
                        pending.append(self._start_generate())
                    handle, position, rows, indices = pending.popleft()
                    batch = timer.time("generate", partial(self.cluster.rollout.collect, handle))
                    check_groups(batch, rows, cfg.algorithm.num_generations)
                    self.trained_position = position
                    # Keep the engines busy while the learner trains on this batch.
                    while len(pending) < staleness and self.step + len(pending) + 1 < cfg.trainer.steps:
                        pending.append(self._start_generate())
                    if self.learner_weight_version - batch.weight_version <= staleness:
                        break
                    self.counters["batches_dropped_stale"] += 1
                    drops += 1
                    log.warning("dropped a batch %d versions old", self.learner_weight_version - batch.weight_version)
                    if drops > staleness + 2:  # the queue has been flushed and workers are still behind
                        raise RuntimeError(
                            f"rollout workers keep serving stale weights {self.cluster.rollout.weight_versions()}"
                            f" while the learner is at version {self.learner_weight_version}"
                        )
                    timer.time("weight_sync", lambda: self.cluster.maintain(self.learner_weight_version))
            completions += len(batch)
            metrics = self._train_on(batch, indices, timer)
            metrics.update(upkeep)
            self.learner_weight_version += 1
            self.step += 1
            if self.step % cfg.trainer.sync_every == 0 or self.step == cfg.trainer.steps:
                metrics.update(self._sync(timer))
            if cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0 and self.step < cfg.trainer.steps:
                ev = timer.time("eval", lambda: evaluate(self.cluster.rollout, self.test_rows, cfg))
                self.logger.log_eval(self.step, ev)
                metrics.update({f"eval/{k}": v for k, v in ev.items()})
            if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                timer.time("checkpoint", self.save)
            step_time = time.perf_counter() - t0
            timer.add("idle", max(step_time - sum(timer.totals.values()), 0.0))
            for k, v in timer.totals.items():
                self.totals.add(k, v)
                metrics[f"time/{k}"] = v
            metrics["time/step"] = step_time
            loop_seconds += step_time - timer.totals.get("eval", 0.0) - timer.totals.get("checkpoint", 0.0)
            metrics["rollout/queue_depth"] = (
                len(self.stream.in_flight) / cfg.trainer.prompts_per_step if self.stream else float(len(pending))
            )
            metrics.update({COUNT + k: float(v) for k, v in self.counters.items()})
            metrics["rollout/completions_per_second"] = len(batch) / step_time
            self.logger.log_step(self.step, metrics, batch)
            progress.update(1)
        progress.close()
        for handle, *_ in pending:  # drain so no generation is left running on the workers
            self.cluster.rollout.collect(handle)
        if cfg.checkpoint.save_at_end and (not cfg.checkpoint.save_every or self.step % cfg.checkpoint.save_every):
            self.totals.time("checkpoint", self.save)
        eval_after = self.totals.time("eval", lambda: evaluate(self.cluster.rollout, self.test_rows, cfg))
        log.info("eval after: %s", eval_after)
        self.logger.log_eval(self.step, eval_after)
        wall = time.perf_counter() - t_start
        summary = {
            "eval_before": eval_before,
            "eval_after": eval_after,
            "steps": self.step,
            "wall_seconds": wall,
            "completions": completions,
            "completions_per_second": completions / max(loop_seconds, 1e-9),
            "phase_seconds": dict(self.totals.totals),
            "counters": dict(self.counters),
            "weight_versions": self.cluster.rollout.weight_versions(),
            "final_weight_version": self.learner_weight_version,
        }
        self.logger.finish(summary)
        return summary


def _tuple_state(obj: Any) -> Any:
    """JSON turns random.getstate()'s tuples into lists; random.setstate needs tuples back."""
    if isinstance(obj, list):
        return tuple(_tuple_state(x) for x in obj)
    return obj
