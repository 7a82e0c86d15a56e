"""The one typed rollout batch: produced by rollout workers, consumed by the learner.

It is the only thing `rollout_server/` and `learner/` share. Rows are completions; rows of
one prompt are consecutive (a group of G rows with the same ``group_ids`` value). Ragged
token lists keep it cheap to pickle through Ray; ``to_tensors`` pads for the learner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

# Why a multi-turn episode stopped: its environment said done; it had max_turns model turns; the model
# spent its tokens (algorithm.max_completion_length); the next turn would not fit the context; its
# environment time ran out; its environment raised or answered malformed.
STOP_REASONS = ("done", "max_turns", "max_model_tokens", "context", "timeout", "env_error")


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]]  # per row (the group's prompt, repeated per row)
    completion_ids: list[list[int]]  # generated tokens, EOS included when generated
    sampling_logp: list[list[float]]  # vLLM log-prob of each generated token
    truncated: list[bool]  # hit max_completion_length without EOS (multi-turn: the last turn hit its limit)
    rewards: list[float]  # combined reward per row; NaN = no usable reward
    reward_components: dict[str, list[float]]  # per reward function, NaN where missing
    group_ids: list[int]  # equal for rows of the same prompt; consecutive
    weight_version: int  # learner step whose weights generated this batch (streaming: its oldest token's)
    prompts: list[str] = field(default_factory=list)  # prompt text per row (logging, rewards)
    completions: list[str] = field(default_factory=list)  # decoded completion per row
    answers: list[str] = field(default_factory=list)  # reference answer per row
    advantages: list[float] | None = None  # filled by the driver before training
    # Per completion token: 1 where the loss trains on it (the model's own tokens), 0 on tokens the
    # model did not write (environment messages, chat-template boundaries between turns). None: every
    # completion token is the model's (single-turn rows).
    loss_mask: list[list[int]] | None = None
    # Multi-turn rows: model turns, and why the episode stopped (STOP_REASONS).
    num_turns: list[int] | None = None
    stop_reasons: list[str] | None = None
    # Streaming rows (rollout.streaming): the weight version that sampled each completion token (a row
    # spans two or more when an update landed while it was generated). None: every token is
    # ``weight_version``'s.
    token_versions: list[list[int]] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds, by phase
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. reward failures by function/kind

    def __post_init__(self) -> None:
        n = len(self.completion_ids)
        for name in ("prompt_ids", "sampling_logp", "truncated", "rewards", "group_ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"RolloutBatch.{name} has {len(getattr(self, name))} rows, expected {n}")
        for name, vals in self.reward_components.items():
            if len(vals) != n:
                raise ValueError(f"RolloutBatch.reward_components[{name!r}] has {len(vals)} rows, expected {n}")
        for i, (c, lp) in enumerate(zip(self.completion_ids, self.sampling_logp)):
            if len(c) != len(lp):
                raise ValueError(f"row {i}: {len(c)} completion tokens but {len(lp)} sampling log-probs")
        for name in ("num_turns", "stop_reasons"):
            vals = getattr(self, name)
            if vals is not None and len(vals) != n:
                raise ValueError(f"RolloutBatch.{name} has {len(vals)} rows, expected {n}")
        unknown = set(self.stop_reasons or ()) - set(STOP_REASONS)
        if unknown:
            raise ValueError(f"RolloutBatch.stop_reasons has {sorted(unknown)}; known: {list(STOP_REASONS)}")
        if self.token_versions is not None:
            if len(self.token_versions) != n or any(
                len(c) != len(v) for c, v in zip(self.completion_ids, self.token_versions)
            ):
                raise ValueError("RolloutBatch.token_versions must hold one version per completion token of every row")
            if any(v < self.weight_version for vs in self.token_versions for v in vs):
                raise ValueError("RolloutBatch.weight_version must be its oldest token's version")
        if self.loss_mask is not None:
            if len(self.loss_mask) != n:
                raise ValueError(f"RolloutBatch.loss_mask has {len(self.loss_mask)} rows, expected {n}")
            for i, (c, m) in enumerate(zip(self.completion_ids, self.loss_mask)):
                if len(c) != len(m) or any(x not in (0, 1) for x in m):
                    raise ValueError(f"row {i}: the loss mask must hold one 0 or 1 per completion token ({len(c)})")

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_groups(self) -> int:
        return len(set(self.group_ids))

    def row_counts(self, generated_tokens: int | None = None) -> dict[str, float]:
        """The rollout side's per-row counts of these rows (batch ``metrics`` keys). ``generated_tokens``
        defaults to the completion tokens; multi-turn rows pass the model's own tokens."""
        return {
            "prompts": float(self.num_groups),
            "completions": float(len(self)),
            "generated_tokens": float(
                sum(len(c) for c in self.completion_ids) if generated_tokens is None else generated_tokens
            ),
            # Prompt tokens the engine had to read (every completion is a request of its own).
            "prompt_tokens": float(sum(len(p) for p in self.prompt_ids)),
            "truncated_completions": float(sum(self.truncated)),
            "nan_rewards": float(sum(math.isnan(r) for r in self.rewards)),
        }

    def select(self, rows: list[int]) -> RolloutBatch:
        """A new batch holding ``rows`` (in that order). Its ``metrics`` and ``timings`` are copies of
        this batch's (the producer's counts, not recounted); with per-token versions its
        ``weight_version`` is the selected rows' oldest token's."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "reward_components":
                out[f.name] = {k: [vals[i] for i in rows] for k, vals in v.items()}
            elif isinstance(v, list) and len(v) == len(self) and f.name not in ("timings", "metrics"):
                out[f.name] = [v[i] for i in rows]
            elif isinstance(v, list) and not v:
                out[f.name] = []
            elif isinstance(v, dict):
                out[f.name] = dict(v)
            else:
                out[f.name] = v
        if self.token_versions is not None:
            out["weight_version"] = min((v for r in out["token_versions"] for v in r), default=self.weight_version)
        return replace(self, **out)

    @staticmethod
    def concat(batches: list[RolloutBatch]) -> RolloutBatch:
        """Concatenate batches; group ids are renumbered so they stay unique and consecutive."""
        if not batches:
            raise ValueError("cannot concatenate zero batches")
        versions = {b.weight_version for b in batches}
        per_token = [b.token_versions is not None for b in batches]
        if any(per_token) and not all(per_token):
            raise ValueError("refusing to mix streaming rows (per-token versions) with batch rows")
        # Streaming rows carry each token's version, so their batches may mix; others are one version each.
        if len(versions) != 1 and not all(per_token):
            raise ValueError(f"refusing to mix weight versions {sorted(versions)} in one batch")
        out: dict[str, Any] = {}
        for f in fields(RolloutBatch):
            vals = [getattr(b, f.name) for b in batches]
            if f.name == "group_ids":
                merged, offset = [], 0
                for g in vals:
                    remap = {old: offset + k for k, old in enumerate(dict.fromkeys(g))}
                    merged += [remap[x] for x in g]
                    offset += len(remap)
                out[f.name] = merged
            elif f.name == "reward_components":
                keys = list(dict.fromkeys(k for v in vals for k in v))
                out[f.name] = {
                    k: [x for b, v in zip(batches, vals) for x in v.get(k, [math.nan] * len(b))] for k in keys
                }
            elif f.name == "advantages":
                out[f.name] = None if any(v is None for v in vals) else [x for v in vals for x in v]
            elif f.name in ("num_turns", "stop_reasons"):
                if any(v is None for v in vals) and not all(v is None for v in vals):
                    raise ValueError("refusing to mix multi-turn and single-turn batches")
                out[f.name] = None if vals[0] is None else [x for v in vals for x in v]
            elif f.name == "loss_mask":
                out[f.name] = (
                    None
                    if all(v is None for v in vals)
                    else [m for b, v in zip(batches, vals) for m in (v or b.full_loss_mask())]
                )
            elif f.name in ("timings", "metrics"):
                acc: dict[str, float] = {}
                for d in vals:
                    for k, x in d.items():
                        acc[k] = acc.get(k, 0.0) + x
                out[f.name] = acc
            elif f.name == "weight_version":
                out[f.name] = min(vals)
            elif f.name == "token_versions":
                out[f.name] = None if vals[0] is None else [x for v in vals for x in v]
            else:
                out[f.name] = [x for v in vals for x in v]
        return RolloutBatch(**out)

    def full_loss_mask(self) -> list[list[int]]:
        """The loss mask of rows whose every completion token is the model's."""
        return [[1] * len(c) for c in self.completion_ids]

    def rewards_tensor(self) -> torch.Tensor:
        return torch.tensor(self.rewards, dtype=torch.float32)

    def to_tensors(self, pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Right-padded ``prompt + completion`` sequences for a causal-LM forward.

        Returns input_ids_BL, attention_mask_BL, prompt_len_B, completion_ids_BT, loss_mask_BT
        (1 on the completion tokens the loss trains on: the model's own, EOS included; 0 on other
        tokens and padding), sampling_logp_BT, group_B (rows with equal values share their prompt)
        and adv_B (if set), where T = longest completion in the batch (shape suffixes: the legend in
        ``grpo_dist/losses.py``). What the forward attends to is attention_mask_BL: every token.
        """
        B = len(self)
        L = max(len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids))
        T = max(1, max(len(c) for c in self.completion_ids))
        input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        comp = torch.full((B, T), pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.float32)
        slogp = torch.zeros((B, T), dtype=torch.float32)
        plen = torch.zeros(B, dtype=torch.long)
        loss_mask = self.loss_mask or self.full_loss_mask()
        for i, (p, c, lp) in enumerate(zip(self.prompt_ids, self.completion_ids, self.sampling_logp)):
            seq = p + c
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attn[i, : len(seq)] = 1
            plen[i] = len(p)
            if c:
                comp[i, : len(c)] = torch.tensor(c, dtype=torch.long)
                mask[i, : len(c)] = torch.tensor(loss_mask[i], dtype=torch.float32)
                slogp[i, : len(c)] = torch.tensor(lp, dtype=torch.float32)
        out = {
            "input_ids_BL": input_ids,
            "attention_mask_BL": attn,
            "prompt_len_B": plen,
            "completion_ids_BT": comp,
            "loss_mask_BT": mask,
            "sampling_logp_BT": slogp,
            "group_B": torch.tensor(self.group_ids, dtype=torch.long),
        }
        if self.advantages is not None:
            out["adv_B"] = torch.tensor(self.advantages, dtype=torch.float32)
        return {k: v.to(device) for k, v in out.items()}


def check_groups(batch: RolloutBatch, rows: list[dict], group_size: int) -> None:
    """Refuse a batch that does not hold each of ``rows``' whole group exactly once, in that order.

    The rollout side promises it (a lost group is generated again whole, from the start); this is the
    driver's own check that no prompt is lost, duplicated or cut short before the learner sees it."""
    want = [str(r.get("prompt", "")) for r in rows for _ in range(group_size)]
    groups = [g for g in range(len(rows)) for _ in range(group_size)]
    if batch.prompts != want or batch.group_ids != groups:
        got = len(batch.prompts)
        raise RuntimeError(
            f"the rollout batch does not hold the {len(rows)} drawn prompts x {group_size} completions in order "
            f"({got} rows, {batch.num_groups} groups): refusing to train on it"
        )
