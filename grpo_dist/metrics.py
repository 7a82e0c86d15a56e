"""Every metric key the job writes: the one place they are declared, each with its unit and meaning.

``METRICS`` holds the keys of ``metrics.jsonl`` (one object per step, ``{"step": n, key: value,
...}``, a value ``null`` when not finite). ``grpo_dist.monitoring.RunLogger`` writes them and passes
the finite ones to ``deploy/``, which sets one Ray gauge per key on the ``grpo-metrics`` actor:
``prometheus_name(key)``, shown in Prometheus with Ray's ``ray_`` prefix (``learner/kl`` ->
``ray_grpo_learner_kl``). ``WORKER_SERIES`` holds the series each rollout worker exports itself (not
in ``metrics.jsonl``). The Grafana dashboard (``deploy/grafana/``) queries only declared series.

A key with ``<name>`` parts is a pattern: ``reward/<reward>`` is one key per reward function. A key
that is not always present says when it is written. Producers build their keys from here where they
keep a list (``learner.step.METRIC_KEYS``, the ``count/`` counters); the unit tests check that every
key the loop writes and every series the dashboard queries is declared. Adding a metric means
adding it here. Names stay as they are: users' dashboards read them.

``python -m grpo_dist.metrics`` prints the table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

PRODUCERS = {
    "driver": "grpo_dist/driver.py (the training loop)",
    "learner": "learner/actor.py train_step (its keys, prefixed learner/ by the driver)",
    "rollout": "rollout_server/ (batch metrics, prefixed rollout/ by the driver; the manager's counters)",
    "cluster": "deploy/job.py RayCluster (worker upkeep between steps, weight sync)",
    "worker": "rollout_server/worker.py (each worker's own series, Prometheus only)",
}

LEARNER = "learner/"  # the driver's prefix on the keys of LearnerHandle.train_step's dict
COUNT = "count/"  # cumulative counters (over the run; a resumed run continues the driver's)
ROLLOUT_COUNT = COUNT + "rollout_"  # the rollout manager's counters, as the cluster reports them
_PART = re.compile(r"<[a-z_]+>")
MT = "rollout.multi_turn"
SERVED = "rewards.models"
STREAM = "rollout.streaming"


@dataclass(frozen=True)
class Metric:
    key: str  # as written (a pattern when it has <name> parts); for WORKER_SERIES the Ray metric name
    unit: str
    meaning: str
    producer: str  # a PRODUCERS key
    packed: bool = False  # learner: a token-weighted mean over every rank's tokens (learner.step.METRIC_KEYS)
    kind: str = "gauge"  # Prometheus: "gauge", or "counter" (shown with a _total suffix)
    exported: bool = True  # also a Prometheus series
    only_with: str | None = None  # written only when this holds: a config section set (rollout.multi_turn), or an event

    @property
    def is_pattern(self) -> bool:
        return bool(_PART.search(self.key))


def _declare(*metrics: Metric) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for m in metrics:
        if m.key in out:
            raise ValueError(f"metric {m.key!r} declared twice")
        if m.producer not in PRODUCERS or m.kind not in ("gauge", "counter") or not (m.unit and m.meaning):
            raise ValueError(f"metric {m.key!r}: bad declaration {m}")
        out[m.key] = m
    return out


# Order: the driver's keys, the learner's, the rollout side's, the cluster's. The learner's packed
# keys keep the packed layout's order (learner.step.METRIC_KEYS follows this declaration).
METRICS: dict[str, Metric] = _declare(
    Metric(
        "step",
        "step",
        "the step this row is for (1 = the first); every row has it, not exported",
        "driver",
        exported=False,
    ),
    # -- the trained batch (grpo_dist.driver.batch_metrics)
    Metric(
        "reward/mean", "reward", "mean combined reward of the trained completions (missing rewards skipped)", "driver"
    ),
    Metric("reward/std", "reward", "standard deviation of the trained completions' combined rewards", "driver"),
    Metric(
        "reward/missing_frac", "fraction", "trained completions with no usable reward (every function failed)", "driver"
    ),
    Metric(
        "reward/<reward>",
        "reward",
        "mean score of one reward function (its configured name; name#k for its k-th repeat) where it scored",
        "driver",
    ),
    Metric("completion/len_mean", "tokens", "mean completion length of the trained batch", "driver"),
    Metric(
        "completion/truncated_frac", "fraction", "trained completions cut at algorithm.max_completion_length", "driver"
    ),
    Metric(
        "groups/zero_variance_frac",
        "fraction",
        "trained groups whose usable rewards are all equal (no signal)",
        "driver",
    ),
    Metric("staleness", "versions", "learner version minus the trained batch's weight version (0 on-policy)", "driver"),
    Metric("rollout/weight_version", "version", "weight version the trained batch was generated with", "driver"),
    Metric("rollout/engine_seconds", "s", "engine generate time inside the workers, per worker", "driver"),
    Metric("rollout/score_seconds", "s", "reward scoring time inside the workers, per worker", "driver"),
    Metric(
        "rollout/queue_depth",
        "batches",
        "generations still in flight after the step (async mode; streaming: groups in flight / prompts_per_step)",
        "driver",
    ),
    Metric(
        "rollout/completions_per_second", "completions/s", "trained completions over the step's wall time", "driver"
    ),
    # -- wall time per phase of the step (grpo_dist.driver.PhaseTimer); a phase that did not run is absent
    Metric("time/generate", "s", "waiting for rollout batches (the workers' scoring included)", "driver"),
    Metric("time/ref_logp", "s", "the learner's reference and old-policy log-prob passes", "driver"),
    Metric("time/train", "s", "the rest of the learner's train_step (forward, backward, optimizer)", "driver"),
    Metric("time/weight_sync", "s", "weight syncs and worker upkeep between steps (scaling, re-pushes)", "driver"),
    Metric("time/eval", "s", "held-out evaluation (evaluation steps)", "driver"),
    Metric("time/checkpoint", "s", "saving a checkpoint (checkpoint steps)", "driver"),
    Metric("time/idle", "s", "the step's wall time no phase claims", "driver"),
    Metric("time/step", "s", "wall time of the whole step", "driver"),
    # -- the driver's cumulative counters (Trainer.counters, also in summary.json and checkpoints)
    Metric("count/batches_dropped_stale", "batches", "batches dropped for exceeding trainer.max_staleness", "driver"),
    Metric("count/groups_dropped_zero_variance", "groups", "zero-variance groups dynamic sampling dropped", "driver"),
    Metric("count/extra_generate_calls", "calls", "extra generations dynamic sampling made to fill a batch", "driver"),
    Metric(
        "count/groups_dropped_stale",
        "groups",
        "streamed groups dropped (and generated again) for a token older than trainer.max_staleness",
        "driver",
    ),
    # -- streaming (rollout.streaming): the trained rows' per-token weight versions and the engines' load
    Metric(
        "rollout/token_age_mean",
        "versions",
        "learner version minus the version that sampled each trained token, mean over tokens",
        "driver",
        only_with=STREAM,
    ),
    Metric("rollout/token_age_max", "versions", "the oldest trained token's age", "driver", only_with=STREAM),
    Metric(
        "rollout/mixed_version_rows",
        "rows",
        "trained rows whose tokens were sampled by two or more weight versions (an update landed mid-row)",
        "driver",
        only_with=STREAM,
    ),
    Metric(
        "rollout/engine_occupancy",
        "fraction",
        "unfinished sequences (running, waiting or preempted) per engine step over the engine's max_num_seqs, "
        "over the step's takes",
        "rollout",
        only_with=STREAM,
    ),
    Metric(
        "rollout/engine_idle_fraction",
        "fraction",
        "wall time an engine took no step (nothing to generate, or a weight load), over the step's takes",
        "rollout",
        only_with=STREAM,
    ),
    # -- held-out evaluation (grpo_dist.driver.eval_rows), on trainer.eval_every steps; eval.jsonl has them unprefixed
    Metric("eval/accuracy", "fraction", "held-out mean accuracy reward", "driver"),
    Metric("eval/format_reward", "reward", "held-out mean format reward", "driver"),
    Metric("eval/num_prompts", "prompts", "held-out prompts evaluated", "driver"),
    Metric("eval/samples_per_prompt", "completions", "completions sampled per held-out prompt", "driver"),
    # -- the learner (one train_step over all ranks); packed: token-weighted means (grpo_dist.losses.grpo_loss)
    Metric(
        "learner/kl",
        "nats",
        "token mean of the per-token KL estimate to the reference (0 when unused)",
        "learner",
        packed=True,
    ),
    Metric("learner/ratio", "ratio", "token mean of pi / pi_old (1 on-policy)", "learner", packed=True),
    Metric(
        "learner/clip_low", "fraction", "tokens clipped at 1 - epsilon_low (negative advantage)", "learner", packed=True
    ),
    Metric(
        "learner/clip_high",
        "fraction",
        "tokens clipped at 1 + epsilon_high (positive advantage)",
        "learner",
        packed=True,
    ),
    Metric("learner/clip_region", "fraction", "tokens clipped on either side", "learner", packed=True),
    Metric(
        "learner/cispo_clip_fraction",
        "fraction",
        "policy_loss=cispo: tokens whose IS weight hit cispo_max_ratio (positive advantage; 0 otherwise)",
        "learner",
        packed=True,
    ),
    Metric(
        "learner/correction_weight_mean",
        "weight",
        "token mean of the rollout-correction weight pi_learner / pi_engine after truncation or masking (1 when off)",
        "learner",
        packed=True,
    ),
    Metric(
        "learner/correction_masked_fraction",
        "fraction",
        "rollout_correction.mode=mask: tokens whose weight was outside [min, max] and set to 0 (0 otherwise)",
        "learner",
        packed=True,
    ),
    Metric(
        "learner/entropy", "nats", "token mean entropy of the policy's sampling distribution", "learner", packed=True
    ),
    Metric(
        "learner/sampler_gap",
        "nats",
        "token mean |learner log-prob - engine log-prob| of the generated tokens (large: other weights)",
        "learner",
        packed=True,
    ),
    Metric("learner/loss", "loss", "mean mini-batch loss over the step's optimizer steps", "learner"),
    Metric("learner/grad_norm", "norm", "mean global gradient norm over the step's optimizer steps", "learner"),
    Metric("learner/lr", "lr", "learning rate of the step's last optimizer step", "learner"),
    Metric(
        "learner/tokens",
        "tokens",
        "completion tokens trained on: the model's own (all ranks, each counted once)",
        "learner",
    ),
    Metric(
        "learner/padding_fraction", "fraction", "positions the training forwards compute that are padding", "learner"
    ),
    Metric(
        "learner/shared_prompt_saving", "fraction", "row tokens not forwarded: prompts shared by their rows", "learner"
    ),
    Metric(
        "learner/tokens_per_s", "tokens/s", "trained tokens (every pass counts) per second of the update", "learner"
    ),
    Metric("learner/optimizer_steps", "steps", "optimizer steps taken so far (cumulative)", "learner"),
    Metric("learner/time/ref_logp", "s", "reference-model log-prob pass (rank 0)", "learner"),
    Metric("learner/time/old_logp", "s", "old-policy log-prob pass, num_iterations > 1 (rank 0)", "learner"),
    Metric("learner/time/train", "s", "forwards, backwards and optimizer steps (rank 0)", "learner"),
    Metric(
        "learner/peak_memory_mb", "MiB", "peak memory of the most loaded rank so far (CUDA peak; RSS on CPU)", "learner"
    ),
    # -- rollout batch metrics (rollout_server: RolloutBatch.metrics, summed over the batch's worker calls)
    Metric(
        "rollout/prompts",
        "prompts",
        "prompts generated for the step (dynamic sampling's extra rounds included)",
        "rollout",
    ),
    Metric("rollout/completions", "completions", "completions generated for the step", "rollout"),
    Metric("rollout/generated_tokens", "tokens", "completion tokens generated for the step", "rollout"),
    Metric("rollout/prompt_tokens", "tokens", "prompt tokens the engines read (each completion a request)", "rollout"),
    Metric("rollout/truncated_completions", "completions", "generated completions cut at the length limit", "rollout"),
    Metric("rollout/nan_rewards", "completions", "generated completions with no usable combined reward", "rollout"),
    # -- multi-turn episodes (rollout.multi_turn; written only then)
    Metric("rollout/turns_mean", "turns", "model turns per trained episode, mean", "driver", only_with=MT),
    Metric(
        "rollout/env_token_fraction",
        "fraction",
        "completion tokens the model did not write (environment messages, template boundaries): not trained on",
        "driver",
        only_with=MT,
    ),
    Metric(
        "rollout/stop/<reason>",
        "episodes",
        "trained episodes that stopped for reason done, max_turns, max_model_tokens, context, timeout or env_error",
        "driver",
        only_with=MT,
    ),
    Metric("rollout/tool_calls", "calls", "tool calls the model made (parsed call blocks)", "rollout", only_with=MT),
    Metric(
        "rollout/tool_errors",
        "calls",
        "tool calls that became an error observation: unknown tool, bad JSON or arguments, exception, timeout",
        "rollout",
        only_with=MT,
    ),
    Metric("rollout/tool_seconds", "s", "time spent running tools (summed over episodes)", "rollout", only_with=MT),
    Metric(
        "rollout/env/<counter>",
        "count",
        "a counter the environment reports in Step.info, summed over the step's episodes (RetryEnv: solved, "
        "solved_first_try)",
        "rollout",
        only_with=MT,
    ),
    Metric(
        "rollout/env_messages_cut",
        "turns",
        "environment turns (and resets) whose messages were cut to rollout.multi_turn.max_env_tokens_per_turn",
        "rollout",
        only_with=MT,
    ),
    Metric(
        "rollout/reward_failures/<reward>/<kind>",
        "calls or rows",
        "reward failures: a function's calls by kind exception, timeout, wrong_length; a served model's attempts by "
        "kind exception, timeout, died (its actor died or was restarting), wrong_length; nan: rows left with no score",
        "rollout",
        only_with="a reward failed in that batch",
    ),
    Metric("rollout/worker_failures", "calls", "generate calls lost to a failed worker for this batch", "rollout"),
    Metric(
        "rollout/prompts_reissued", "prompts", "prompts generated again for this batch after a worker failed", "rollout"
    ),
    # -- the rollout manager's cumulative counters (RolloutManager.counters, reported by the cluster)
    Metric("count/rollout_worker_failures", "calls", "generate calls lost to failed workers", "rollout"),
    Metric("count/rollout_prompts_reissued", "prompts", "prompts generated again after worker failures", "rollout"),
    Metric("count/rollout_workers_lost", "workers", "workers dropped for good (restarts exhausted)", "rollout"),
    Metric("count/rollout_worker_restarts", "restarts", "worker restarts by Ray", "rollout"),
    Metric("count/rollout_nodes_lost", "nodes", "dead nodes that hosted a rollout worker", "rollout"),
    # -- the cluster (deploy/job.py RayCluster.maintain, before each step; sync_weights, on sync steps)
    Metric(
        "count/worker_restarts_repushed",
        "pushes",
        "workers given the job's weights again (restarted or new)",
        "cluster",
    ),
    Metric("count/workers_added", "workers", "rollout workers started by grpo-dist scale", "cluster"),
    Metric("count/workers_removed", "workers", "rollout workers removed by grpo-dist scale", "cluster"),
    Metric("count/sync_retries", "syncs", "weight syncs retried after a failed attempt", "cluster"),
    Metric(
        "count/reward_workers_added",
        "workers",
        "reward model actors started by grpo-dist scale",
        "cluster",
    ),
    Metric(
        "count/reward_workers_removed",
        "workers",
        "reward model actors removed by grpo-dist scale",
        "cluster",
    ),
    # -- each served reward model's actors (reward_server.group.RewardGroup.metrics, polled before each step)
    Metric("served/<model>/workers", "workers", "actors serving the model", "cluster", only_with=SERVED),
    Metric(
        "served/<model>/requests",
        "requests",
        "requests its live actors answered since they started",
        "cluster",
        only_with=SERVED,
    ),
    Metric(
        "served/<model>/in_flight",
        "rows",
        "rows inside the model at the poll, summed over actors",
        "cluster",
        only_with=SERVED,
    ),
    Metric(
        "served/<model>/queue_depth",
        "rows",
        "rows waiting for the model at the poll, summed over actors",
        "cluster",
        only_with=SERVED,
    ),
    Metric(
        "served/<model>/latency_p50",
        "s",
        "median seconds per request (the last 1,024 of each actor; the slowest actor's)",
        "cluster",
        only_with=SERVED,
    ),
    Metric(
        "served/<model>/latency_p95",
        "s",
        "95th percentile seconds per request (as latency_p50)",
        "cluster",
        only_with=SERVED,
    ),
    Metric(
        "served/<model>/restarts",
        "restarts",
        "its actors' restarts by Ray over the run",
        "cluster",
        only_with=SERVED,
    ),
    Metric("rollout/num_workers", "workers", "rollout workers serving", "cluster"),
    Metric(
        "rollout/workers_down", "workers", "rollout workers down (failed, restarting or waiting for a node)", "cluster"
    ),
    Metric("rollout/workers_starting", "workers", "rollout workers starting (added, not serving yet)", "cluster"),
    Metric(
        "sync/seconds", "s", "the step's weight sync, waiting for restarting workers and a retry included", "cluster"
    ),
    Metric("sync/bytes", "bytes", "bytes the weight sync broadcast", "cluster"),
    Metric("sync/version", "version", "weight version the sync pushed", "cluster"),
    Metric(
        "sync/wait_seconds",
        "s",
        "longest wait of a worker's weight load for its engine thread: batch mode, the generate call in flight; "
        "streaming, one engine step (in_flight_updates=false: the running groups)",
        "cluster",
    ),
)

# Ray metric names (tags worker, node); the description each is created with is its meaning.
WORKER_SERIES: dict[str, Metric] = _declare(
    Metric("grpo_worker_weight_version", "version", "weight version a rollout worker serves", "worker"),
    Metric("grpo_worker_awaiting_weights", "flag", "1 while a restarted worker waits for the job's weights", "worker"),
    Metric(
        "grpo_worker_completions", "completions", "completions a rollout worker generated", "worker", kind="counter"
    ),
    Metric("grpo_worker_generate_seconds", "s", "seconds a rollout worker spent generating", "worker", kind="counter"),
)


def _split(key: str) -> list[str]:
    """Literal parts and ``<name>`` parts, alternating (a literal first and last)."""
    out, pos = [], 0
    for m in _PART.finditer(key):
        out += [key[pos : m.start()], m.group()]
        pos = m.end()
    return [*out, key[pos:]]


def _sanitize(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _regex(key: str, part: str, literal) -> re.Pattern:
    return re.compile("".join(literal(s) if i % 2 == 0 else part for i, s in enumerate(_split(key))))


_KEY_PATTERNS = [(_regex(m.key, "[^/]+", re.escape), m) for m in METRICS.values() if m.is_pattern]


def lookup(key: str) -> Metric | None:
    """The declaration of a written key (an exact key first, then a pattern), or None."""
    m = METRICS.get(key)
    if m is not None:
        return m
    return next((m for rx, m in _KEY_PATTERNS if rx.fullmatch(key)), None)


def undeclared(keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` that nothing here declares."""
    return [k for k in keys if lookup(k) is None]


def prometheus_name(key: str) -> str:
    """The Ray metric name of a ``metrics.jsonl`` key (every character but letters and digits -> ``_``);
    Prometheus shows it with Ray's ``ray_`` prefix."""
    return "grpo_" + _sanitize(key)


def series_name(m: Metric) -> str:
    """The Prometheus series of a declaration: ``ray_`` + its Ray metric name (+ ``_total`` for a
    counter); for a pattern, a regex matching its series."""
    if m.producer == "worker":
        name = m.key
    elif m.is_pattern:
        name = "grpo_" + _regex(m.key, "[A-Za-z0-9_]+", _sanitize).pattern
    else:
        name = prometheus_name(m.key)
    return "ray_" + name + ("_total" if m.kind == "counter" else "")


def metric_for_series(series: str) -> Metric | None:
    """The declaration a Prometheus series (as the dashboard queries it) comes from (an exact key
    first, then a pattern), or None."""
    exported = [m for m in (*METRICS.values(), *WORKER_SERIES.values()) if m.exported]
    exact = next((m for m in exported if not m.is_pattern and series_name(m) == series), None)
    return exact or next((m for m in exported if m.is_pattern and re.fullmatch(series_name(m), series)), None)


def counter_names(producer: str, prefix: str = COUNT) -> list[str]:
    """Names of ``producer``'s cumulative counters: its declared keys ``<prefix><name>``, in order."""
    return [k.removeprefix(prefix) for k, m in METRICS.items() if m.producer == producer and k.startswith(prefix)]


# The learner's token-weighted means, in the order learner.step packs them for one all-reduce.
PACKED_LEARNER_KEYS: tuple[str, ...] = tuple(k.removeprefix(LEARNER) for k, m in METRICS.items() if m.packed)


if __name__ == "__main__":
    for m in (*METRICS.values(), *WORKER_SERIES.values()):
        print(f"{m.key:42} {m.unit:14} {m.producer:8} {m.meaning}")
