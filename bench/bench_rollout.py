"""Rollout service benchmark on this machine: engine start, generation throughput, weight push.

For 1 and 2 workers (each bound to its own cores): the wall time of ``RolloutManager.start``,
completions/s and generated tokens/s of one step (``--prompts`` unique prompts x G samples,
``--max-tokens`` each), and the time to push a full weight update from the driver acting as
learner rank 0 (manifest check + group join + broadcast + in-place reload on every worker).
Every figure is the median of ``--runs`` runs (``--start-runs`` for engine start).

    .venv/bin/python -m bench.bench_rollout [--size tiny] [--runs 5] [--workers 1 2]   # from the repo root
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_dist.config import Config
from grpo_dist.tiny_model import build_tiny_model, chat_prompt
from grpo_dist.weight_sync import init_sync_group, open_sync_store, send_weights, spec_of
from rollout_server import RolloutManager


def _config(model_dir: str, workers: int, args: argparse.Namespace) -> Config:
    return Config.model_validate(
        {
            "model": {"path": model_dir, "dtype": "float32"},
            "algorithm": {"num_generations": args.group, "max_completion_length": args.max_tokens},
            "rewards": {"functions": [{"name": "accuracy"}, {"name": "format", "weight": 0.2}]},
            "rollout": {"num_workers": workers, "cpu_threads_per_worker": args.threads, "cpu_kvcache_space_gib": 1},
            "trainer": {"prompts_per_step": args.prompts},
            "learner": {"num_ranks": 1, "micro_batch_size": 1},
            "cluster": {"num_cpus_per_rollout": 1, "rpc_timeout_s": 600},
        }
    )


def _rows(model_dir: str, n: int) -> list[dict]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for i in range(n):
        q = f"What is {3 * i + 1} + {7 * i + 2}?"
        p = chat_prompt(tok, q)
        rows.append(
            {
                "prompt": p,
                "prompt_ids": tok(p, add_special_tokens=False)["input_ids"],
                "answer": str(10 * i + 3),
                "question": q,
            }
        )
    return rows


def _push(manager: RolloutManager, model: torch.nn.Module, version: int, bucket_bytes: int) -> float:
    t0 = time.perf_counter()
    manifest = [spec_of(n, p) for n, p in model.named_parameters()]
    store = open_sync_store(120)  # listening before the workers are told the port, as the learner does
    refs = manager.start_receive_weights(
        manifest, version, "127.0.0.1", store.port, timeout_s=120, bucket_bytes=bucket_bytes
    )
    group = init_sync_group("127.0.0.1", store.port, 0, manager.sync_group_size(), 120, "gloo", store=store)
    send_weights(group, manifest, (p.detach() for _, p in model.named_parameters()), bucket_bytes)
    ray.get(refs, timeout=300)
    return time.perf_counter() - t0


def bench_workers(model_dir: str, workers: int, args: argparse.Namespace) -> dict[str, float]:
    cfg = _config(model_dir, workers, args)
    starts = []
    for r in range(args.start_runs):
        m = RolloutManager(cfg.rollout, cfg.model, cfg.algorithm, cfg.rewards, cfg.cluster, cfg.max_model_len)
        t0 = time.perf_counter()
        m.start(timeout_s=600)
        starts.append(time.perf_counter() - t0)
        if r < args.start_runs - 1:
            m.shutdown()
    rows = _rows(model_dir, args.prompts)
    m.generate(rows)  # warm-up: first-call allocations and prefix cache
    cps, tps = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        batch = m.generate(rows)
        dt = time.perf_counter() - t0
        cps.append(len(batch) / dt)
        tps.append(batch.metrics["generated_tokens"] / dt)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pushes = [_push(m, model, v + 1, int(args.bucket_mb * 2**20)) for v in range(args.runs)]
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    m.shutdown()
    return {
        "workers": workers,
        "start_s": statistics.median(starts),
        "completions_per_s": statistics.median(cps),
        "tokens_per_s": statistics.median(tps),
        "push_s": statistics.median(pushes),
        "params_mb": param_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="cpu_threads_per_worker")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8, help="G completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--start-runs", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    args = ap.parse_args()

    ray.init(num_cpus=max(4, max(args.workers) * args.threads + 1), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        model_dir = str(build_tiny_model(d, size=args.size, seed=0))
        results = [bench_workers(model_dir, w, args) for w in args.workers]
    ray.shutdown()

    print(
        f"\nrollout benchmark: model={args.size} ({results[0]['params_mb']:.1f} MiB fp32), "
        f"{args.prompts} prompts x G={args.group}, max_tokens={args.max_tokens}, "
        f"{args.threads} thread(s)/worker, median of {args.runs} runs ({args.start_runs} for start)"
    )
    print(f"{'workers':>7} | {'engine start s':>14} | {'completions/s':>13} | {'tokens/s':>9} | {'weight push s':>13}")
    print("-" * 70)
    for r in results:
        print(
            f"{r['workers']:>7} | {r['start_s']:>14.1f} | {r['completions_per_s']:>13.1f} | "
            f"{r['tokens_per_s']:>9.0f} | {r['push_s']:>13.3f}"
        )


if __name__ == "__main__":
    main()
