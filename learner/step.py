"""Torch-only pieces of the learner's train step: micro-batch slicing (by rows or under a token
budget) and its loss scale, metric packing for one all-reduce, and the reference-model refresh.
No ray/deepspeed, so they are unit-tested."""

from __future__ import annotations

import torch

from grpo_dist.losses import merge_metrics
from grpo_dist.metrics import PACKED_LEARNER_KEYS

# Token-weighted metrics of grpo_loss plus the policy entropy and the learner/engine log-prob gap
# (declared in grpo_dist.metrics, packed=True); their order fixes the packed layout.
METRIC_KEYS = PACKED_LEARNER_KEYS


def rank_rows(
    lengths: list[int], world_size: int, num_minibatches: int, prompts: list[tuple[int, int]] | None = None
) -> list[list[int]]:
    """Row indices each data-parallel rank trains on, in its training order.

    The batch is cut into ``num_minibatches`` contiguous mini-batches (one optimizer step each).
    Inside each, rows are dealt to ranks in equal counts (gradient accumulation needs the same
    number of micro-batches on every rank) and near-equal work (every all-reduce waits for the
    slowest rank): the costliest first, each to the rank with the least work that still has room.

    Row layout (``prompts`` None): the unit dealt is a row, its cost its tokens, and a rank's share
    stays longest-first, so consecutive rows -- its micro-batches -- have similar lengths and padding
    each micro-batch to its own longest row wastes little.

    Shared-prompt forward (``prompts[i]`` = row i's group id and prompt length): the unit is a group's
    rows in the mini-batch (longest first), its cost the prompt once plus every completion, so a
    group's rows stay consecutive on one rank and its prompt is forwarded once per micro-batch it
    lands in. A group larger than any rank's remaining room is split: its longest rows fill the rank
    with the most room. The loss is normalised by mini-batch totals, so any such split gives the
    same update.
    """
    n = len(lengths)
    if world_size < 1 or num_minibatches < 1 or n % (world_size * num_minibatches):
        raise ValueError(f"{n} rows cannot be split into {num_minibatches} mini-batches over {world_size} ranks")
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompt entries for {n} rows")
    per_rank = n // (world_size * num_minibatches)
    out: list[list[int]] = [[] for _ in range(world_size)]
    mini = n // num_minibatches

    def cost(unit: list[int]) -> int:
        if prompts is None:
            return sum(lengths[i] for i in unit)
        return prompts[unit[0]][1] + sum(lengths[i] - prompts[i][1] for i in unit)

    for start in range(0, n, mini):
        by_length = sorted(range(start, start + mini), key=lambda i: (-lengths[i], i))
        if prompts is None:
            units = [[i] for i in by_length]
        else:
            members: dict[int, list[int]] = {}
            for i in by_length:
                members.setdefault(prompts[i][0], []).append(i)
            units = sorted(members.values(), key=lambda u: (-cost(u), u[0]))
        share: list[list[int]] = [[] for _ in range(world_size)]
        work = [0] * world_size
        while units:
            unit = units.pop(0)
            fits = [r for r in range(world_size) if per_rank - len(share[r]) >= len(unit)]
            if fits:
                r = min(fits, key=lambda r: (work[r], r))
            else:
                r = max(range(world_size), key=lambda r: (per_rank - len(share[r]), -r))
                room = per_rank - len(share[r])
                unit, rest = unit[:room], unit[room:]
                units.insert(0, rest)
            share[r] += unit
            work[r] += cost(unit)
        for r in range(world_size):
            out[r] += share[r]
    return out


def micro_slices(start: int, micro_batch_size: int, count: int) -> list[slice]:
    """``count`` consecutive row slices of ``micro_batch_size`` rows from ``start``."""
    return [slice(start + j * micro_batch_size, start + (j + 1) * micro_batch_size) for j in range(count)]


def micro_cost(lengths: list[int], rows: slice, prompts: list[tuple[int, int]] | None = None) -> int:
    """Positions the forward of the micro-batch ``rows`` computes.

    Row layout: every row padded to the micro-batch's longest row. With ``prompts`` (per row: its
    group id and prompt length; the shared-prompt forward), each unique prompt once, padded to the
    longest prompt, plus every row's completion padded to the longest completion."""
    if rows.stop <= rows.start:
        return 0
    if prompts is None:
        return (rows.stop - rows.start) * max(lengths[rows])
    part = prompts[rows]
    unique = dict(part)
    completions = [n - p for n, (_, p) in zip(lengths[rows], part)]
    return len(unique) * max(unique.values()) + len(part) * max(completions)


def forward_positions(lengths: list[int], micro: list[slice], prompts: list[tuple[int, int]] | None = None) -> int:
    """Positions the forwards of the micro-batches ``micro`` compute (``micro_cost`` summed)."""
    return sum(micro_cost(lengths, s, prompts) for s in micro)


def unique_tokens(lengths: list[int], micro: list[slice], prompts: list[tuple[int, int]]) -> int:
    """Real (non-padding) tokens the shared-prompt forwards of ``micro`` compute: each unique
    prompt of a micro-batch once, plus every row's completion."""
    total = 0
    for s in micro:
        part = prompts[s]
        total += sum(dict(part).values()) + sum(n - p for n, (_, p) in zip(lengths[s], part))
    return total


def pack_by_tokens(
    lengths: list[int], max_tokens: int, count: int | None = None, prompts: list[tuple[int, int]] | None = None
) -> list[slice]:
    """Consecutive micro-batches of the rows ``lengths`` (tokens each) whose cost -- the positions
    their padded forward computes, ``micro_cost`` -- is at most ``max_tokens``.

    Greedy in the given order (sorted greedy, not first-fit decreasing: first-fit would drop short
    rows into the spare room of long micro-batches, padding each of them to a long row): a
    micro-batch takes rows until the next one would break the budget, which gives the fewest
    consecutive micro-batches, since the cost never falls as rows are added. On rows sorted longest
    first in the row layout (a rank's share of a mini-batch, see ``rank_rows``) it is the fewest
    of any split, contiguous or not (swapping rows turns any split into one whose first
    micro-batch is the longest rows that fit with the longest), and rows of similar length share a
    micro-batch, so little of it is padding. Contiguous micro-batches stay tensor slices.

    ``count`` (at least the greedy count, at most the rows): the costliest micro-batch (the first
    on ties) of two rows or more is halved (with ``prompts``, at the group boundary nearest its
    middle, if it holds one) until there are exactly ``count``, because every rank
    must run the same number per optimizer step (DeepSpeed's gradient accumulation and ZeRO-3's
    parameter gathers are collective). Halving never breaks the budget.
    """
    out: list[slice] = []
    start = 0
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"a row of {n} tokens does not fit learner.max_tokens_per_micro_batch={max_tokens}")
        if i > start and micro_cost(lengths, slice(start, i + 1), prompts) > max_tokens:
            out.append(slice(start, i))
            start = i
    if lengths:
        out.append(slice(start, len(lengths)))
    if count is None:
        return out
    if not len(out) <= count <= len(lengths):
        raise ValueError(f"{len(lengths)} rows packed into {len(out)} micro-batches cannot make exactly {count}")
    while len(out) < count:
        j = max(
            (j for j, s in enumerate(out) if s.stop - s.start > 1),
            key=lambda j: (micro_cost(lengths, out[j], prompts), -j),
        )
        s = out[j]
        mid = s.start + (s.stop - s.start) // 2
        if prompts is not None:  # cut at the group boundary nearest the middle: no prompt forwarded twice
            bounds = [i for i in range(s.start + 1, s.stop) if prompts[i][0] != prompts[i - 1][0]]
            mid = min(bounds, key=lambda i: (abs(i - mid), i), default=mid)
        out[j : j + 1] = [slice(s.start, mid), slice(mid, s.stop)]
    return out


def token_micro_batches(
    lengths: list[int],
    num_minibatches: int,
    max_tokens: int,
    counts: list[int] | None = None,
    prompts: list[tuple[int, int]] | None = None,
) -> list[list[slice]]:
    """A rank's micro-batches for each of its ``num_minibatches`` equal consecutive blocks of rows
    (one optimizer step each, as ``rank_rows`` lays them out): ``pack_by_tokens`` of each block,
    shifted to shard positions, with exactly ``counts[k]`` micro-batches in block ``k`` when given
    (the maximum over ranks of the greedy counts)."""
    if num_minibatches < 1 or len(lengths) % num_minibatches:
        raise ValueError(f"{len(lengths)} rows cannot be split into {num_minibatches} equal mini-batches")
    mini = len(lengths) // num_minibatches
    out = []
    for k in range(num_minibatches):
        part = slice(k * mini, (k + 1) * mini)
        block = pack_by_tokens(
            lengths[part], max_tokens, None if counts is None else counts[k], None if prompts is None else prompts[part]
        )
        out.append([slice(k * mini + s.start, k * mini + s.stop) for s in block])
    return out


def backward_scale(grad_accum_steps: int, world_size: int) -> int:
    """The factor on each micro-batch loss before ``engine.backward``: the losses are normalised by
    their mini-batch's totals over all ranks, so they sum to the mini-batch loss; DeepSpeed divides
    each backward by the engine's gradient-accumulation steps and averages gradients over ranks.
    The factor undoes both, so it must be the accumulation steps the engine has for that step."""
    return grad_accum_steps * world_size


def pack_metrics(per_micro: list[dict[str, torch.Tensor | float]], loss_sum: float) -> torch.Tensor:
    """One float64 vector ``[sum(value * tokens) per METRIC_KEYS..., tokens, loss_sum]``: summing
    it over ranks and unpacking gives token-weighted means over every rank's tokens."""
    merged = merge_metrics(per_micro)
    tokens = merged["num_tokens"]
    return torch.tensor([merged[k] * tokens for k in METRIC_KEYS] + [tokens, loss_sum], dtype=torch.float64)


def unpack_metrics(vec: torch.Tensor, num_optimizer_steps: int) -> dict[str, float]:
    """Inverse of ``pack_metrics`` after the rank sum; ``loss`` is the mean mini-batch loss
    (each micro-batch loss is already normalised by its mini-batch's totals)."""
    vals = vec.tolist()
    tokens = vals[len(METRIC_KEYS)]
    out = {k: v / max(tokens, 1.0) for k, v in zip(METRIC_KEYS, vals)}
    out["loss"] = vals[len(METRIC_KEYS) + 1] / num_optimizer_steps
    return out


@torch.no_grad()
def lerp_(dst: list[torch.Tensor], src: list[torch.Tensor], alpha: float) -> None:
    """``dst <- alpha * src + (1 - alpha) * dst`` in place (TRL's sync_ref_model).

    Works on ZeRO-3 shards too: policy and reference are partitioned identically, so each
    rank updates its own shard without communication."""
    if len(dst) != len(src):
        raise ValueError(f"reference has {len(dst)} parameters, policy {len(src)}")
    for i, (d, s) in enumerate(zip(dst, src)):
        if d.shape != s.shape:
            raise ValueError(f"parameter {i}: reference part {tuple(d.shape)} != policy part {tuple(s.shape)}")
        d.lerp_(s.to(d.dtype), alpha)
