"""Where the rollout workers' work goes (pure: no Ray, no vLLM).

Which worker gets which prompts, which cores each CPU worker's threads are bound to, and which
weight-sync ranks each engine worker takes.
"""

from __future__ import annotations


def split_contiguous(num_items: int, num_parts: int) -> list[tuple[int, int]]:
    """Balanced contiguous ``[start, stop)`` chunks, in order; the first ``num_items % num_parts``
    chunks hold one item more. Parts beyond ``num_items`` get empty chunks."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    base, extra = divmod(num_items, num_parts)
    out, start = [], 0
    for k in range(num_parts):
        stop = start + base + (1 if k < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def cpu_bind_ranges(num_workers: int, threads_per_worker: int, total_cores: int) -> list[list[int]]:
    """Core ids for each worker slot: consecutive, disjoint while they fit in ``total_cores``.

    Slots beyond the machine's cores wrap around (oversubscription; `oversubscribed` says so)
    rather than fail, because a cluster node may be larger than the driver's machine.
    """
    if num_workers < 1 or threads_per_worker < 1 or total_cores < 1:
        raise ValueError(
            f"need positive num_workers/threads_per_worker/total_cores, got "
            f"{num_workers}/{threads_per_worker}/{total_cores}"
        )
    if threads_per_worker > total_cores:
        raise ValueError(f"threads_per_worker={threads_per_worker} exceeds the {total_cores} cores of this machine")
    return [[(w * threads_per_worker + t) % total_cores for t in range(threads_per_worker)] for w in range(num_workers)]


def oversubscribed(num_workers: int, threads_per_worker: int, total_cores: int) -> bool:
    return num_workers * threads_per_worker > total_cores


def cpu_list_str(cores: list[int]) -> str:
    """``[2, 3, 5]`` -> ``"2,3,5"`` (the format of VLLM_CPU_OMP_THREADS_BIND and OMP_PLACES)."""
    return ",".join(str(c) for c in cores)


def cpu_worker_env(cores: list[int], kvcache_gib: int) -> dict[str, str]:
    """Environment of one CPU rollout worker process, applied before torch/vLLM start.

    The engine runs in-process (``uni`` executor, no V1 engine-core subprocess), so vLLM's own
    OMP binding (done only by its multiprocess executor) never runs: the OpenMP runtime binds
    the threads itself from OMP_PLACES/OMP_PROC_BIND. VLLM_CPU_OMP_THREADS_BIND carries the
    same cores in case a vLLM build falls back to its multiprocess executor.
    """
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": cpu_list_str(cores),
        "OMP_NUM_THREADS": str(len(cores)),
        "OMP_PLACES": ",".join(f"{{{c}}}" for c in cores),
        "OMP_PROC_BIND": "close",
    }


def sync_rank_offsets(engine_workers: list[int]) -> list[int]:
    """First weight-sync rank of each rollout worker: rank 0 is the learner, then each worker's
    engine workers (its tensor-parallel ranks) take consecutive ranks."""
    if any(k < 1 for k in engine_workers):
        raise ValueError(f"every rollout worker has at least one engine worker, got {engine_workers}")
    out, nxt = [], 1
    for k in engine_workers:
        out.append(nxt)
        nxt += k
    return out
