"""Whole-pipeline benchmark: per-phase time breakdown of grpo-dist runs, on-policy and async,
1 and 2 rollout workers, optionally side by side with TRL's GRPOTrainer on the same settings.

    .venv/bin/pip install --no-deps trl==1.16.0     # only for --trl (the `bench` extra)
    python -m bench.bench_grpo [--config deploy/configs/tiny_cpu.yaml] [--steps 6] [--warmup 2]
                               [--workers 1 2] [--modes on-policy async] [--set k=v ...] [--trl] [--out FILE]

The real model, as the first table of docs/performance.md (SmolLM2-135M-Instruct on GSM8K):

    grpo-dist get-model smollm2-135m-instruct --out runs/smollm2
    python -m bench.bench_grpo --config deploy/configs/smollm2_gsm8k_cpu.yaml \
        --set trainer.prompts_per_step=8 --set algorithm.num_generations=4 \
        --set algorithm.max_completion_length=128 --set learner.micro_batch_size=8 \
        --steps 6 --warmup 1 --trl \
        --variant "before (row layout, 128-token KV blocks):learner.shared_prompt_forward=false;rollout.block_size=128" \
        --variant "queue depth k=2:trainer.max_staleness=2"

Each configuration is a real `grpo-dist run` (local Ray head, vLLM rollout workers, DeepSpeed
learner) with evaluation and checkpoints off; figures are medians over the steps after warm-up,
read from the run's metrics.jsonl. An async run with queue depth k generates nothing in its last k
steps (the drain): those steps are left out of its medians and rates, but not of its wall time.
``--variant NAME:KEY=VALUE[;KEY=VALUE]`` adds a 1-worker run (async k=1 unless its overrides say
otherwise) with those overrides: a lever's other setting in the same invocation. The model is whatever `model.path` names, so the same harness
runs the tiny model, the real one and, unchanged, a GPU cluster. TRL gets the same config
(`bench/trl_baseline.py` reads it: model, prompts, rewards, G, batch, micro-batch, loss, beta, lr).

Definitions (per step):
- engine = vLLM generation time inside the workers (per worker), train = learner forward/backward/
  optimizer incl. reference/old log-probs; both are the time the pipeline cannot avoid.
- overhead = step - engine - train in on-policy mode (scoring, weight sync, data movement, driver);
  reported as a fraction of step time.
- async: how close the step time comes to max(engine, train) rather than their sum.
- weight sync: seconds per update and MB/s over the bytes moved (group set-up included).
- vs TRL: completions/s, and the loop wall time (warm-up included, engine start and model
  loading excluded) to train on the same number of samples.
- CPU only: the FLOP floor, the matmul FLOPs a step cannot avoid, 6NT to train on its T = prompt + completion
  tokens of every row (a second floor counts each prompt once per group, what the shared-prompt forward
  computes), 2NT more for the reference (beta > 0, full fine-tune) and for old log-probs
  (num_iterations > 1), 2N per generated token and per unique prompt token (the engine prefills a
  prompt once for its G children), over this machine's fp32 matmul rate with every core busy
  (measured here on a model-shaped matmul). Attention and the optimizer are left out, so it is
  a floor that no implementation reaches; each run and TRL report their share of it.
- CPU only: the work floor of a step on this machine. The on-policy 1-worker run's engine and
  learner times are taken as busy core-seconds (engine_s x engine threads + train_s x threads x
  ranks); no scheduling can make a step shorter than those core-seconds spread over every core,
  so TRL's step over that floor estimates the best ratio any pipeline design could reach here.
  It is an estimate, slightly low: a rank waiting in an all-reduce counts as busy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def matmul_gflops(threads: int, d: int = 576, f: int = 1536, t: int = 2048, reps: int = 20) -> float:
    """fp32 matmul rate (GFLOP/s) with ``threads`` threads on a [t, d] x [d, f] product: a decoder MLP
    projection of a micro-batch's tokens at SmolLM2-135M's widths."""
    import time

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(t, d), torch.randn(d, f)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        return 2 * t * d * f * reps / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(before)


def model_params(path: str) -> int:
    """Parameters of the model at ``path`` (tied weights once), built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def step_flops(
    n_params: int, train_tokens: float, generated: float, unique_prompt_tokens: float, forward_passes: int
) -> float:
    """Matmul FLOPs of one step (see the module docstring): 6NT train, 2NT per extra no-grad
    forward (reference, old log-probs), 2N per token the engine computes."""
    return n_params * (6 * train_tokens + 2 * forward_passes * train_tokens + 2 * (generated + unique_prompt_tokens))


# Overrides every benchmark run takes: nothing written or shown that is not measured.
QUIET = [
    "checkpoint.save_every=null",
    "checkpoint.save_at_end=false",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.log_completions=0",
]


def run_job(config: str, overrides: list[str], out_dir: Path, what: str) -> list[dict]:
    """One `grpo-dist run` of ``config`` with ``QUIET``, ``overrides`` and ``out_dir`` as its output
    directory; its metrics.jsonl rows. Exits naming ``what`` if the run fails."""
    cmd = [sys.executable, "-m", "grpo_dist.cli", "run", config]
    for o in [*QUIET, *overrides, f"trainer.output_dir={out_dir}"]:
        cmd += ["--set", o]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-5000:])
        raise SystemExit(f"grpo-dist run failed for {what}")
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def run_grpo(config: str, steps: int, workers: int, staleness: int, sets: list[str], out_dir: Path) -> list[dict]:
    overrides = [
        f"trainer.steps={steps}",
        f"rollout.num_workers={workers}",
        f"trainer.max_staleness={staleness}",
        "trainer.eval_every=null",
        "trainer.eval_num_prompts=1",
        *sets,
    ]
    return run_job(config, overrides, out_dir, f"workers={workers} staleness={staleness}")


def med(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


def phases(r: dict) -> tuple[float, float, float]:
    """``(step, engine, train)`` seconds of one metrics row. Train is the learner's own compute
    (the driver's time/train also holds the RPC and data transfer)."""
    train = sum(r.get(f"learner/time/{k}") or 0.0 for k in ("train", "ref_logp", "old_logp"))
    return r["time/step"], r.get("rollout/engine_seconds") or 0.0, train


def summarize(all_rows: list[dict], warmup: int, drain: int = 0) -> dict[str, float]:
    """Medians and rates over the steps after ``warmup`` and before the last ``drain`` (an async run's
    last k steps generate nothing: the learner has the cores to itself, which is not the steady state)."""
    rows = all_rows[warmup : len(all_rows) - drain]
    # Ratios per step, then their median: a difference of medians mixes different steps.
    per_step = [phases(r) for r in rows]
    steps, engine_by_step, train_by_step = (list(x) for x in zip(*per_step))
    wall = sum(steps)  # rates over the measured steps, as the TRL baseline reports them
    sync_s = med(rows, "sync/seconds")
    return {
        "steps_measured": len(rows),
        "loop_s": sum(r["time/step"] for r in all_rows),
        "samples": sum((r.get("rollout/completions") or 0.0) for r in all_rows),
        "step_s": statistics.median(steps),
        "completions_per_s": sum(r.get("rollout/completions") or 0.0 for r in rows) / wall,
        "generated_tokens_per_s": sum(r.get("rollout/generated_tokens") or 0.0 for r in rows) / wall,
        "trained_tokens_per_s": sum(r.get("learner/tokens") or 0.0 for r in rows) / wall,
        "engine_s": statistics.median(engine_by_step),
        "train_s": statistics.median(train_by_step),
        "generate_wait_s": med(rows, "time/generate"),
        "score_s": med(rows, "rollout/score_seconds"),
        "ref_logp_s": med(rows, "time/ref_logp"),
        "weight_sync_s": med(rows, "time/weight_sync"),
        "sync_bytes": med(rows, "sync/bytes"),
        "sync_MB_per_s": med(rows, "sync/bytes") / 1e6 / sync_s if sync_s > 0 else float("nan"),
        "idle_s": med(rows, "time/idle"),
        # Streaming runs (rollout.streaming) report the engines' occupancy and idle time themselves;
        # engine_busy_frac is every run's engine seconds over its step (the engine's share of the wall).
        "engine_occupancy": med(rows, "rollout/engine_occupancy"),
        "engine_idle_frac": med(rows, "rollout/engine_idle_fraction"),
        "engine_busy_frac": statistics.median(e / st for st, e, _ in per_step),
        "sync_wait_s": med(rows, "sync/wait_seconds"),
        "prompt_tokens_per_step": statistics.mean(r.get("rollout/prompt_tokens") or 0.0 for r in rows),
        "generated_tokens_per_step": statistics.mean(r.get("rollout/generated_tokens") or 0.0 for r in rows),
        "overhead_frac": statistics.median(max(st - e - t, 0.0) / st for st, e, t in per_step),
        "step_over_max": statistics.median(st / max(e, t) for st, e, t in per_step),
        "sum_over_max": statistics.median((e + t) / max(e, t) for st, e, t in per_step),
    }


def per_step_table(rows: list[dict], warmup: int, drain: int = 0) -> str:
    """One line per step (warm-up and drain steps marked), the same phases as the summary."""
    lines = ["  step  step_s  compl/s  engine_s  train_s  ref_s  sync_s  overhead"]
    for i, r in enumerate(rows):
        st, engine, train = phases(r)
        mark = "*" if i < warmup else "+" if i >= len(rows) - drain else " "
        lines.append(
            f"  {r['step']:>4}{mark} {st:6.3f}  {(r.get('rollout/completions') or 0) / st:7.1f}"
            f"  {engine:8.3f}  {train:7.3f}  {r.get('time/ref_logp') or 0.0:5.3f}  {r.get('time/weight_sync') or 0.0:6.3f}"
            f"  {max(st - engine - train, 0.0) / st:8.1%}"
        )
    return "\n".join(lines + ["  (* warm-up, + drain: nothing left to generate; neither is in the medians)"])


def table(results: dict[str, dict[str, float]]) -> str:
    cols = [
        "step_s",
        "completions_per_s",
        "generated_tokens_per_s",
        "trained_tokens_per_s",
        "engine_s",
        "train_s",
        "generate_wait_s",
        "score_s",
        "ref_logp_s",
        "weight_sync_s",
        "sync_wait_s",
        "sync_MB_per_s",
        "idle_s",
        "engine_busy_frac",
        "engine_occupancy",
        "engine_idle_frac",
        "overhead_frac",
        "step_over_max",
    ]
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/configs/tiny_cpu.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["on-policy", "async"], choices=["on-policy", "async"])
    ap.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[;KEY=VALUE]",
        help="one more 1-worker run, async (k=1) unless its overrides say otherwise, with these overrides on "
        "top (repeatable): a lever's other setting, measured in the same invocation",
    )
    ap.add_argument("--trl", action="store_true", help="also run TRL GRPOTrainer on the same settings")
    ap.add_argument("--out", default=None, help="write all figures as JSON")
    args = ap.parse_args()

    from grpo_dist.config import ConfigError, load_config

    cfg = load_config(args.config, args.set)
    variants = []
    for variant in args.variant:  # every variant's config is validated before anything runs
        label, _, sets = variant.partition(":")
        extra = [x.strip() for x in sets.split(";") if x.strip()]
        if not label or not extra:
            ap.error(f"--variant {variant!r}: expected NAME:KEY=VALUE[;KEY=VALUE] (NAME without ':')")
        try:
            k = load_config(args.config, ["trainer.max_staleness=1", *args.set, *extra]).trainer.max_staleness
        except ConfigError as e:
            ap.error(f"--variant {variant!r}: {e}")
        variants.append((label, extra, k))
    if args.steps <= args.warmup + max([1, *(k for _, _, k in variants)]):
        ap.error(f"--steps {args.steps} leaves no measured step after --warmup {args.warmup} and an async run's drain")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for w in args.workers:
                name = f"{mode}, {w} worker{'s' if w > 1 else ''}"
                print(f"running grpo-dist: {name} ...", flush=True)
                k = 0 if mode == "on-policy" else 1
                rows = run_grpo(
                    args.config, args.steps, w, k, args.set, Path(tmp) / name.replace(", ", "_").replace(" ", "-")
                )
                print(per_step_table(rows, args.warmup, k), flush=True)
                results[name] = summarize(rows, args.warmup, k)
        for label, extra, k in variants:
            name = label
            print(f"running grpo-dist: {name} ({'; '.join(extra)}) ...", flush=True)
            rows = run_grpo(args.config, args.steps, 1, 1, args.set + extra, Path(tmp) / f"variant-{len(results)}")
            print(per_step_table(rows, args.warmup, k), flush=True)
            results[name] = summarize(rows, args.warmup, k)
    print(
        "\ngrpo-dist, medians over steps after warm-up "
        f"({cfg.trainer.prompts_per_step} prompts x G={cfg.algorithm.num_generations}, "
        f"max_completion_length={cfg.algorithm.max_completion_length}, model={cfg.model.path}):"
    )
    print(table(results))
    report: dict = {"grpo_dist": results}

    # The FLOP floor, from this machine's matmul rate measured now (between runs, all cores). CPU
    # only: on a GPU cluster this process's cores say nothing about the devices.
    cores = os.cpu_count() or 1
    G = cfg.algorithm.num_generations
    on_cpu = not cfg.cluster.num_gpus_per_learner
    if on_cpu:
        gflops = matmul_gflops(cores)
        n_params = model_params(cfg.model.path)
        extra_passes = int(cfg.algorithm.beta > 0 and cfg.model.lora is None) + int(cfg.algorithm.num_iterations > 1)

        def floor_s(prompt_tokens: float, generated: float, unique: bool = False) -> float:
            # unique: the learner's tokens counted with each prompt once per group (what a forward that
            # shares a group's prompt must compute), instead of once per row.
            trained = (prompt_tokens / G if unique else prompt_tokens) + generated
            return step_flops(n_params, trained, generated, prompt_tokens / G, extra_passes) / (gflops * 1e9)

        print(
            f"\nFLOP floor: N = {n_params / 1e6:.1f}M parameters, fp32 matmul {gflops:.1f} GFLOP/s on {cores} "
            f"cores, {extra_passes} no-grad forward(s) per step besides training"
        )
        for name, r in results.items():
            r["flop_floor_s"] = floor_s(r["prompt_tokens_per_step"], r["generated_tokens_per_step"])
            r["flop_floor_share"] = r["flop_floor_s"] / r["step_s"]
            r["flop_floor_unique_s"] = floor_s(r["prompt_tokens_per_step"], r["generated_tokens_per_step"], unique=True)
            print(
                f"  {name}: floor {r['flop_floor_s']:.2f} s per step, step {r['step_s']:.2f} s: "
                f"{r['flop_floor_share']:.0%} of the floor's rate ({r['flop_floor_unique_s'] / r['step_s']:.0%} of "
                f"the {r['flop_floor_unique_s']:.2f} s floor with each prompt trained once per group)"
            )
        report["flop_floor"] = {
            "params": n_params,
            "matmul_gflops": gflops,
            "cores": cores,
            "extra_forwards": extra_passes,
        }

    if args.trl:
        trl_out = Path(tempfile.mkdtemp()) / "trl.json"
        cmd = [
            sys.executable,
            "-m",
            "bench.trl_baseline",
            "--config",
            args.config,
            "--steps",
            str(args.steps),
            "--warmup-steps",
            str(args.warmup),
            "--out",
            str(trl_out),
        ]
        for o in args.set:
            cmd += ["--set", o]
        print("\nrunning TRL GRPOTrainer on the same settings ...", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        trl = json.loads(trl_out.read_text())
        report["trl"] = trl
        base = results.get("on-policy, 1 worker") or next(iter(results.values()))
        best_name, best = max(results.items(), key=lambda kv: kv[1]["completions_per_s"])
        if base["samples"] != trl["trained_samples"]:
            raise SystemExit(f"sample counts differ: grpo-dist {base['samples']}, TRL {trl['trained_samples']}")
        ratios = {
            f"completions/s ({name}) / TRL": r["completions_per_s"] / trl["completions_per_s"]
            for name, r in results.items()
        }
        ratios.update(
            {
                f"TRL wall / grpo-dist wall to train on {trl['trained_samples']} samples ({name})": trl[
                    "time_to_target_samples_s"
                ]
                / r["loop_s"]
                for name, r in results.items()
            }
        )
        if on_cpu:
            # TRL trains on the same prompts; its completions are its own lengths.
            per_completion_prompt = base["prompt_tokens_per_step"] / (cfg.trainer.prompts_per_step * G)
            trl_gen = trl["measured_tokens"] / trl["measured_steps"]
            trl_floor = floor_s(per_completion_prompt * trl["settings"]["completions_per_step"], trl_gen)
            trl["flop_floor_share"] = trl_floor / trl["step_s_median"]
            # Busy core-seconds of one on-policy step: the engine threads while generating, every
            # learner rank's threads while training.
            core_s = base["engine_s"] * cfg.rollout.cpu_threads_per_worker + base[
                "train_s"
            ] * cfg.learner.num_ranks * max(1, int(cfg.cluster.num_cpus_per_learner))
            floor = core_s / cores
            ratios[
                f"work floor: busy core-s of the on-policy step over the cores ({core_s:.2f} core-s over "
                f"{cores} cores = {floor:.3f} s); best step ({best_name}) / floor"
            ] = best["step_s"] / floor
            ratios["estimated best on this machine: TRL step / work floor"] = trl["step_s_median"] / floor
        report["ratios"] = ratios
        print(
            f"\nTRL GRPOTrainer: {trl['completions_per_s']:.3g} completions/s, {trl['tokens_per_s']:.3g} tokens/s, "
            f"step {trl['step_s_median']:.3g} s"
            + (f", {trl['flop_floor_share']:.0%} of its FLOP floor's rate" if on_cpu else "")
        )
        for k, v in ratios.items():
            print(f"  {k}: {v:.2f}x")

    on = results.get("on-policy, 1 worker")
    if on:
        print(f"\non-policy overhead (not engine, not train): {on['overhead_frac']:.1%} of step time")
    for name, r in results.items():
        if name.startswith("async"):
            print(
                f"{name}: step / max(engine, train) = {r['step_over_max']:.2f} "
                f"(serial would be {r['sum_over_max']:.2f})"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
