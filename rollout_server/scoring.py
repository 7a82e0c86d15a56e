"""Scoring and assembling a rollout batch from a worker's completion records.

``build_batch`` is the two steps in order: ``score_completions`` (the reward functions, contained,
with the served reward models' requests in flight meanwhile, and a multi-turn episode's own
rewards) and ``assemble_batch`` (the typed ``RolloutBatch`` with its counts). Records are plain
dicts (``rollout_server.worker.extract_outputs``, ``rollout_server.episodes``); rows of prompt p
are p*n..p*n+n-1.
"""

from __future__ import annotations

import math
import time
from typing import Any

from grpo_dist.batch import RolloutBatch
from grpo_dist.rewards import RewardResult, add_component, score
from rollout_server.episodes import TOOL_COUNTERS
from rollout_server.served_rewards import PendingScores, ServedRewards, served_rows

# Row keys that are not passed to reward functions as dataset columns (multi-turn rows get the
# whole conversation as ``messages`` instead of the prompt's).
_NOT_COLUMNS = ("prompt", "prompt_ids", "messages")


def reward_columns(rows: list[dict], n: int, completion_ids: list[list[int]]) -> dict[str, list]:
    """Dataset columns per completion row (every key all rows share, except the prompt itself),
    plus ``completion_ids`` and ``completion_lengths`` as TRL passes them."""
    shared = [k for k in rows[0] if k not in _NOT_COLUMNS and all(k in r for r in rows)]
    cols = {k: [r[k] for r in rows for _ in range(n)] for k in shared}
    cols["completion_ids"] = completion_ids
    cols["completion_lengths"] = [len(c) for c in completion_ids]
    return cols


def failure_metrics(failures: dict[str, int]) -> dict[str, float]:
    return {f"reward_failures/{k}": float(v) for k, v in failures.items()}


def score_completions(
    rows: list[dict],
    n: int,
    completions: list[dict[str, Any]],
    reward_specs: list,
    reward_timeout_s: float,
    served: ServedRewards | None = None,
    pending: PendingScores | None = None,
) -> tuple[RewardResult, dict[str, float], float]:
    """Every reward of every completion, the failure metrics and the seconds it took.

    The served models' requests are sent first (unless ``pending`` holds them, started as each group
    finished) and the reward functions run while they are out. A
    served model's missing score, like a multi-turn episode's, makes the row's combined reward
    missing (``add_component``); its rows left missing count as ``<model>/nan``."""
    t0 = time.perf_counter()
    prompt_texts = [str(rows[c["group"]].get("prompt", "")) for c in completions]
    texts = [c["text"] for c in completions]
    # Multi-turn records (rollout_server.episodes): reward functions score the model's own turns and
    # see the whole conversation as `messages`.
    episodes = "turns" in completions[0]
    model_ids = [c["model_ids"] for c in completions] if episodes else [c["ids"] for c in completions]
    if served is not None and pending is None:
        pending = served.start(served_rows(rows, [c["group"] for c in completions], texts))
    columns = reward_columns(rows, n, model_ids)
    if episodes:
        columns["messages"] = [c["messages"] for c in completions]
    result = score(reward_specs, reward_timeout_s, prompt_texts, texts, columns)
    if episodes:
        result = add_component(result, "env", [c["env_reward"] for c in completions])
    if served is not None:
        scores, failures = served.finish(pending)
        for spec in served.specs:
            result = add_component(result, spec.name, scores[spec.name], spec.weight)
            missing = sum(math.isnan(v) for v in scores[spec.name])
            if missing:
                failures[f"{spec.name}/nan"] = missing
        result.failures.update(failures)
    return result, failure_metrics(result.failures), time.perf_counter() - t0


def assemble_batch(
    rows: list[dict],
    completions: list[dict[str, Any]],
    version: int,
    result: RewardResult,
    metrics: dict[str, float],
    gen_seconds: float,
    score_seconds: float,
) -> RolloutBatch:
    """The typed batch of scored completions, with its per-row counts."""
    texts = [c["text"] for c in completions]
    ids = [c["ids"] for c in completions]
    prompt_ids = [list(c.get("prompt_ids") or rows[c["group"]]["prompt_ids"]) for c in completions]
    episodes = "turns" in completions[0]
    model_ids = [c["model_ids"] for c in completions] if episodes else ids
    metrics = dict(metrics)
    if episodes:
        metrics["env_messages_cut"] = float(sum(c["env_messages_cut"] for c in completions))
        for key in sorted({k for c in completions for k in c["info"]} | set(TOOL_COUNTERS)):
            name = key if key in TOOL_COUNTERS else f"env/{key}"
            metrics[name] = float(sum(c["info"].get(key, 0.0) for c in completions))
    versions = [c["versions"] for c in completions] if "versions" in completions[0] else None
    batch = RolloutBatch(
        prompt_ids=prompt_ids,
        completion_ids=ids,
        sampling_logp=[c["logp"] for c in completions],
        truncated=[c["truncated"] for c in completions],
        rewards=result.combined,
        reward_components=result.components,
        group_ids=[c["group"] for c in completions],
        weight_version=version,
        prompts=[str(rows[c["group"]].get("prompt", "")) for c in completions],
        completions=texts,
        answers=[str(rows[c["group"]].get("answer", "")) for c in completions],
        timings={"generate": gen_seconds, "score": score_seconds},
        metrics=metrics,
        loss_mask=[c["loss_mask"] for c in completions] if episodes else None,
        num_turns=[c["turns"] for c in completions] if episodes else None,
        stop_reasons=[c["stop"] for c in completions] if episodes else None,
        token_versions=versions,
    )
    batch.metrics = {**batch.row_counts(generated_tokens=sum(len(x) for x in model_ids)), **metrics}
    return batch


def build_batch(
    rows: list[dict],
    n: int,
    completions: list[dict[str, Any]],
    version: int,
    reward_specs: list,
    reward_timeout_s: float,
    gen_seconds: float,
    served: ServedRewards | None = None,
    pending: PendingScores | None = None,
) -> RolloutBatch:
    """Score the completions (contained) and assemble the batch."""
    result, metrics, seconds = score_completions(rows, n, completions, reward_specs, reward_timeout_s, served, pending)
    return assemble_batch(rows, completions, version, result, metrics, gen_seconds, seconds)
