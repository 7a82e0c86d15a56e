"""Where the learner ranks go: one placement-group bundle per rank, and each rank's rendezvous env (pure)."""

from __future__ import annotations


def placement_bundles(num_ranks: int, cpus_per_rank: float, gpus_per_rank: float) -> list[dict[str, float]]:
    """One placement-group bundle per learner rank; bundle ``i`` hosts rank ``i``."""
    if num_ranks < 1:
        raise ValueError(f"learner.num_ranks must be >= 1, got {num_ranks}")
    bundle: dict[str, float] = {"CPU": cpus_per_rank}
    if gpus_per_rank > 0:
        bundle["GPU"] = gpus_per_rank
    return [dict(bundle) for _ in range(num_ranks)]


def rank_env(rank: int, world_size: int, master_addr: str, master_port: int) -> dict[str, str]:
    """torch.distributed env:// variables of one rank. Ray pins each actor's GPU as its only
    visible device, so the local rank is always 0."""
    return {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }
