"""The driver's side of streaming rollouts (``rollout.streaming``): groups in flight, batches in
completion order, staleness bounded per token.

The driver keeps up to ``(trainer.max_staleness + 1) * trainer.prompts_per_step`` groups queued on
the workers (never more than the remaining steps train on). A step trains on the first
``prompts_per_step`` groups to finish, whatever order they were drawn in, so a long group lands in a
later step instead of holding this one back. A group holding a token sampled more than
``trainer.max_staleness`` versions before the learner's is dropped and its prompt generated again.

Checkpoints record the data indices in flight (drawn, not yet trained); a resumed run submits them
first, so no prompt is lost or trained twice across a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Protocol

from grpo_dist.batch import RolloutBatch, check_groups
from grpo_dist.config import Config

log = logging.getLogger(__name__)

# Times one prompt may be dropped as stale before the run stops (a group that can never finish
# within max_staleness syncs would otherwise be regenerated forever).
_MAX_DROPS = 3
ENGINE_LOAD = ("engine_occupancy", "engine_idle_fraction")  # rollout_server.stream.engine_load's keys


class StreamingRollout(Protocol):
    def stream_submit(self, groups: list[tuple[int, dict]]) -> None: ...
    def stream_take(self, want: int) -> tuple[RolloutBatch, list[int]]: ...


def group_oldest(batch: RolloutBatch, group_size: int) -> list[int]:
    """The oldest token's weight version of each group (rows ``g*G .. g*G+G-1``)."""
    versions = batch.token_versions or [[batch.weight_version]] * len(batch)
    return [
        min((v for r in range(g * group_size, (g + 1) * group_size) for v in versions[r]), default=batch.weight_version)
        for g in range(len(batch) // group_size)
    ]


def token_age_metrics(batch: RolloutBatch, learner_version: int) -> dict[str, float]:
    """Ages (learner version minus sampling version) of the trained tokens, and rows mixing versions."""
    versions = batch.token_versions or []
    ages = [learner_version - v for row in versions for v in row]
    return {
        "rollout/token_age_mean": sum(ages) / len(ages) if ages else 0.0,
        "rollout/token_age_max": float(max(ages, default=0)),
        "rollout/mixed_version_rows": float(sum(len(set(row)) > 1 for row in versions)),
    }


def check_stream_groups(batch: RolloutBatch, uids: list[int], rows: dict[int, dict], group_size: int) -> None:
    """Refuse a streamed batch unless it holds each of ``uids``' whole group once, in that order, each
    the prompt that uid was submitted with (``rows``)."""
    if len(set(uids)) != len(uids):
        raise RuntimeError(f"the streamed batch holds a group twice (uids {uids}): refusing to train on it")
    check_groups(batch, [rows[u] for u in uids], group_size)


class GroupStream:
    """Groups in flight on the rollout workers (module docstring)."""

    def __init__(
        self,
        cfg: Config,
        rollout: StreamingRollout,
        train_rows: list[dict],
        draw: Callable[[], list[int]],
        counters: dict[str, int],
    ) -> None:
        self.cfg = cfg
        self.rollout = rollout
        self.train_rows = train_rows
        self.draw = draw  # the next prompts_per_step data indices (the driver's sampler)
        self.counters = counters
        self.in_flight: dict[int, int] = {}  # uid -> data index, submitted and not yet trained
        self.queued: list[int] = []  # data indices drawn (or restored from a checkpoint) and not yet submitted
        self.next_uid = 0
        self.drops: dict[int, int] = {}  # uid -> times its prompt was dropped as stale before it

    def pending_indices(self) -> list[int]:
        """Data indices drawn and not trained yet, in submission order (what a checkpoint records)."""
        return [self.in_flight[u] for u in sorted(self.in_flight)] + self.queued

    def fill(self, steps_left: int) -> None:
        """Top the groups in flight up to the budget (module docstring)."""
        want = self.cfg.trainer.prompts_per_step
        budget = min((self.cfg.trainer.max_staleness + 1) * want, steps_left * want)
        groups = []
        while len(self.in_flight) + len(groups) < budget:
            if not self.queued:
                self.queued = list(self.draw())
            index = self.queued.pop(0)
            groups.append((self.next_uid, index))
            self.next_uid += 1
        self._submit(groups)

    def _submit(self, groups: list[tuple[int, int]]) -> None:
        if not groups:
            return
        for uid, index in groups:
            self.in_flight[uid] = index
        self.rollout.stream_submit([(uid, self.train_rows[index]) for uid, index in groups])

    def take(self, learner_version: int, timed: Callable) -> tuple[RolloutBatch, list[int]]:
        """The step's batch: the first prompts_per_step groups to finish within the staleness bound,
        and their data indices. ``timed(fn)`` runs ``fn`` timed as generation."""
        G = self.cfg.algorithm.num_generations
        want = self.cfg.trainer.prompts_per_step
        limit = self.cfg.trainer.max_staleness
        parts: list[RolloutBatch] = []
        load: list[dict[str, float]] = []
        kept: list[int] = []
        while len(kept) < want:
            batch, uids = timed(partial(self.rollout.stream_take, want - len(kept)))
            check_stream_groups(batch, uids, {u: self.train_rows[self.in_flight[u]] for u in uids}, G)
            load.append({k: batch.metrics[k] for k in ENGINE_LOAD if k in batch.metrics})
            fresh = [g for g, oldest in enumerate(group_oldest(batch, G)) if learner_version - oldest <= limit]
            stale = [uids[g] for g in range(len(uids)) if g not in fresh]
            if stale:
                self.counters["groups_dropped_stale"] += len(stale)
                log.warning("dropped %d streamed group(s) holding tokens over %d versions old", len(stale), limit)
                again = []
                for uid in stale:
                    drops = self.drops.pop(uid, 0) + 1
                    if drops > _MAX_DROPS:
                        raise RuntimeError(
                            f"prompt {self.in_flight[uid]} was dropped {drops} times for a token more than "
                            f"trainer.max_staleness={limit} versions old: its group takes longer than {limit} "
                            "weight syncs to generate; raise trainer.max_staleness or lower "
                            "algorithm.max_completion_length"
                        )
                    self.drops[self.next_uid] = drops
                    again.append((self.next_uid, self.in_flight.pop(uid)))
                    self.next_uid += 1
                self._submit(again)
            if fresh:
                parts.append(batch.select([g * G + j for g in fresh for j in range(G)]))
                kept += [uids[g] for g in fresh]
        batch = RolloutBatch.concat(parts)
        # Counts over the trained rows only (a step trains a selection of what the workers returned);
        # the engines' load as the mean over this step's takes.
        batch.metrics.update(batch.row_counts())
        for key in ENGINE_LOAD:
            vals = [x[key] for x in load if key in x]
            batch.metrics.pop(key, None)
            if vals:
                batch.metrics[key] = sum(vals) / len(vals)
        for u in kept:
            self.drops.pop(u, None)
        return batch, [self.in_flight.pop(u) for u in kept]
