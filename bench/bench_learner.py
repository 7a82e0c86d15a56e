"""Learner group benchmark on this machine: GRPO step time and weight broadcast.

For ZeRO-2 and ZeRO-3 on ``--ranks`` CPU ranks: group start-up, the median wall time of
``train_step`` (driver side) over ``--steps`` steps after one warm-up step, with the learner's
own phase times (reference log-probs, update) and trained tokens/s; then the median time and
the bytes of ``broadcast_weights`` into one receiver (a thread of this process running the
receiving side of ``grpo_dist.weight_sync``) over ``--pushes`` pushes.

``--max-tokens N`` runs each stage a second time with ``learner.max_tokens_per_micro_batch=N``
and prints the two side by side: trained tokens/s and the padding fraction (padded positions /
positions the training forwards compute). ``--model DIR --prompts gsm8k`` trains a real model on
GSM8K prompts (the shipped copy, tokenized by ``grpo_dist.data``) with completion lengths drawn
uniformly from ``--min-completion``..``--completion`` (fixed seeds: both runs see the same rows).
``--variant NAME:KEY=VALUE[;KEY=VALUE]`` adds a run with those config overrides (a lever's other
setting) to the same table, e.g. the row layout against the shared-prompt forward:

    .venv/bin/python -m bench.bench_learner --model runs/smollm2 --prompts gsm8k --rows 32 --group 4 \
        --micro 8 --completion 128 --min-completion 100 --stages 2 --pushes 0 --steps 2 \
        --variant "row layout:learner.shared_prompt_forward=false"

    .venv/bin/python -m bench.bench_learner [--size tiny] [--steps 5] [--rows 16]   # from the repo root
    .venv/bin/python -m bench.bench_learner --model runs/smollm2 --prompts gsm8k --completion 256 \
        --min-completion 20 --max-tokens 2048 --stages 2 --pushes 0 --steps 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import ray

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import Config, apply_overrides, load_config
from grpo_dist.data import load_split
from grpo_dist.tiny_model import build_tiny_model
from grpo_dist.weight_sync import init_sync_group, recv_weights
from learner import LearnerGroup

REPO = str(Path(__file__).resolve().parents[1])


def _config(
    model_dir: str, stage: int, args: argparse.Namespace, max_tokens: int | None = None, overrides: list[str] = ()
) -> Config:
    raw = {
        "model": {"path": model_dir, "dtype": "float32"},
        "algorithm": {"num_generations": args.group, "beta": 0.04, "max_completion_length": args.completion},
        "trainer": {"prompts_per_step": args.rows // args.group},
        "learner": {
            "num_ranks": args.ranks,
            "zero_stage": stage,
            "micro_batch_size": args.micro,
            "max_tokens_per_micro_batch": max_tokens,
        },
        "cluster": {"num_cpus_per_learner": 1, "rpc_timeout_s": 1800},
    }
    return Config.model_validate(apply_overrides(raw, [*args.set, *overrides]))


def _batch(args: argparse.Namespace, vocab: int, seed: int, prompts: list[list[int]] | None) -> RolloutBatch:
    """A rollout of random completion tokens with lengths uniform in ``--min-completion``
    (default half of ``--completion``) to ``--completion`` and random advantages; the prompts are
    drawn from ``prompts``, or are 24 random tokens."""
    rows, group, completion = args.rows, args.group, args.completion
    rng = random.Random(seed)
    if prompts is None:
        prompts = [[rng.randrange(5, vocab) for _ in range(24)] for _ in range(rows // group)]
    else:
        prompts = rng.sample(prompts, rows // group)
    shortest = completion // 2 if args.min_completion is None else args.min_completion
    lengths = [rng.randrange(shortest, completion + 1) for _ in range(rows)]
    comps = [[rng.randrange(5, vocab) for _ in range(n)] for n in lengths]
    return RolloutBatch(
        prompt_ids=[prompts[i // group] for i in range(rows)],
        completion_ids=comps,
        sampling_logp=[[-5.0] * len(c) for c in comps],
        truncated=[False] * rows,
        rewards=[0.0] * rows,
        reward_components={},
        group_ids=[i // group for i in range(rows)],
        weight_version=0,
        advantages=[rng.uniform(-1, 1) for _ in range(rows)],
    )


def _push(group: LearnerGroup, bucket_bytes: int, version: int) -> dict:
    manifest = group.weight_manifest()
    host, port = group.sync_address()
    errors: list[Exception] = []

    def receive() -> None:
        try:
            pg = init_sync_group(host, port, 1, 2, timeout_s=120)
            for _ in recv_weights(pg, manifest, bucket_bytes):
                pass
        except Exception as e:  # reported below
            errors.append(e)

    th = threading.Thread(target=receive)
    th.start()
    info = group.broadcast_weights(host, port, 2, version, timeout_s=120)
    th.join(timeout=120)
    if errors or th.is_alive():
        raise RuntimeError(f"receiver failed: {errors or 'still running'}")
    return info


def bench_stage(
    model_dir: str,
    stage: int,
    vocab: int,
    args: argparse.Namespace,
    max_tokens: int | None = None,
    prompts: list[list[int]] | None = None,
    variant: tuple[str, list[str]] = ("", []),
) -> dict:
    cfg = _config(model_dir, stage, args, max_tokens, variant[1])
    group = LearnerGroup(
        cfg.learner,
        cfg.model,
        cfg.algorithm,
        cfg.cluster,
        total_steps=args.steps + 1,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        name_prefix=f"bench-z{stage}",
    )
    t0 = time.perf_counter()
    group.start(timeout_s=600)
    start_s = time.perf_counter() - t0
    try:
        group.train_step(_batch(args, vocab, 0, prompts))  # warm-up
        walls, metrics = [], []
        for i in range(args.steps):
            batch = _batch(args, vocab, i + 1, prompts)
            t0 = time.perf_counter()
            metrics.append(group.train_step(batch))
            walls.append(time.perf_counter() - t0)
        bucket_bytes = int(cfg.learner.weight_sync_bucket_mb * 2**20)
        pushes = [_push(group, bucket_bytes, v) for v in range(1, args.pushes + 1)]
    finally:
        group.shutdown()
    med = statistics.median
    out = {
        "zero_stage": stage,
        "ranks": args.ranks,
        "rows": args.rows,
        "variant": variant[0] or "base",
        "micro_batches": (
            f"{cfg.learner.max_tokens_per_micro_batch} tokens"
            if cfg.learner.max_tokens_per_micro_batch
            else f"{cfg.learner.micro_batch_size} rows"
        ),
        "start_s": round(start_s, 2),
        "step_s": round(med(walls), 3),
        "ref_logp_s": round(med(m["time/ref_logp"] for m in metrics), 3),
        "train_s": round(med(m["time/train"] for m in metrics), 3),
        "tokens_per_step": med(m["tokens"] for m in metrics),
        "train_tokens_per_s": round(med(m["tokens_per_s"] for m in metrics), 1),
        "padding_fraction": round(med(m["padding_fraction"] for m in metrics), 4),
        "shared_prompt_saving": round(med(m["shared_prompt_saving"] for m in metrics), 4),
        "peak_memory_mb": round(max(m["peak_memory_mb"] for m in metrics)),
    }
    if pushes:
        out.update(broadcast_s=round(med(p["seconds"] for p in pushes), 3), broadcast_bytes=pushes[0]["bytes"])
    return out


def _side_by_side(results: list[dict]) -> str:
    keys = [
        "variant",
        "micro_batches",
        "step_s",
        "ref_logp_s",
        "train_s",
        "train_tokens_per_s",
        "padding_fraction",
        "shared_prompt_saving",
        "peak_memory_mb",
    ]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in results]
    return "\n".join(lines)


def _gsm8k_prompts(model_dir: str) -> list[list[int]]:
    """Token ids of the shipped GSM8K train prompts, as deploy/configs/smollm2_gsm8k_cpu.yaml's run
    formats them (system prompt, chat template, at most 256 tokens)."""
    from transformers import AutoTokenizer

    data_cfg = load_config(Path(REPO) / "deploy/configs/smollm2_gsm8k_cpu.yaml").data
    return [row["prompt_ids"] for row in load_split(data_cfg, AutoTokenizer.from_pretrained(model_dir), "train").rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rows", type=int, default=16, help="rows (completions) per GRPO step")
    ap.add_argument("--group", type=int, default=4, help="G, completions per prompt")
    ap.add_argument("--micro", type=int, default=4, help="micro-batch rows per rank")
    ap.add_argument("--completion", type=int, default=64, help="max completion tokens")
    ap.add_argument("--min-completion", type=int, default=None, help="min completion tokens (default: half the max)")
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="also run learner.max_tokens_per_micro_batch=N and print both side by side",
    )
    ap.add_argument("--model", default=None, help="HF model directory to train instead of a built --size model")
    ap.add_argument("--prompts", default="random", choices=["random", "gsm8k"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pushes", type=int, default=3)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument(
        "--set", action="append", default=[], help="config override for every run, e.g. learner.micro_batch_size=8"
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[;KEY=VALUE]",
        help="one more run per stage with these overrides (repeatable), printed side by side",
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_tiny_model(Path(tmp) / "model", size=args.size, seed=0)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompts = _gsm8k_prompts(str(model_dir)) if args.prompts == "gsm8k" else None
        name = model_dir.name if args.model else args.size
        ray.init(num_cpus=max(4, args.ranks), include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": REPO}})
        try:
            for stage in args.stages:
                results = []
                runs = [(None, ("", []))] + ([(args.max_tokens, ("", []))] if args.max_tokens else [])
                for v in args.variant:
                    label, _, sets = v.partition(":")
                    if not label or not sets:
                        ap.error(f"--variant {v!r}: expected NAME:KEY=VALUE[;KEY=VALUE]")
                    runs.append((None, (label, [x for x in sets.split(";") if x])))
                for max_tokens, variant in runs:
                    results.append(bench_stage(str(model_dir), stage, vocab, args, max_tokens, prompts, variant))
                    print(json.dumps({"model": name, "prompts": args.prompts, **results[-1]}), flush=True)
                if len(results) > 1:
                    title = f"ZeRO-{stage}, {args.ranks} ranks, {name}, {args.prompts} prompts"
                    print(f"{title}:\n{_side_by_side(results)}", flush=True)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
