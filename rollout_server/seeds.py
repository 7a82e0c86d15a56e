"""Per-request sampling seeds of the rollout workers (pure: no Ray, no vLLM)."""

from __future__ import annotations


def request_seeds(base_seed: int, call_index: int, num_prompts: int, n: int) -> list[int]:
    """One seed per prompt of a generate call, all distinct across prompts and calls.

    vLLM gives the k-th of a request's n samples ``seed + k``, so seeds are spaced by ``n``;
    otherwise two prompts (or two calls) would draw the same random numbers.
    """
    if n < 1 or num_prompts < 0 or call_index < 0:
        raise ValueError(f"bad seed request: call_index={call_index}, num_prompts={num_prompts}, n={n}")
    # Calls are spaced by a fixed stride (2**20 samples) so a call never overlaps the next one.
    stride = 1 << 20
    if num_prompts * n > stride:
        raise ValueError(f"{num_prompts} prompts x n={n} exceeds {stride} samples in one generate call")
    start = (base_seed * 4099 + call_index) * stride
    return [start + j * n for j in range(num_prompts)]
