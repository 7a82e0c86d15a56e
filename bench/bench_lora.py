"""Full fine-tune against LoRA on the same run, side by side in one invocation.

    python -m bench.bench_lora [--config deploy/configs/smollm2_arith_cpu.yaml] [--steps 12] [--warmup 2]
                               [--rank 16] [--lora-lr 2e-4] [--set KEY=VALUE ...]

Each side is a real `grpo-dist run` (async k=1 as the config says, 1 rollout worker, evaluation and
checkpoints off) on the same prompts, seeds and batch; only `model.lora` and the learning rate
differ (LoRA needs a larger one). Per side: what each weight sync moves (bytes, seconds), the
learner's peak memory per rank (CPU: peak resident set of the rank's process, runtime included),
the step and its phases (medians after warm-up), sampler_gap, and the training reward by block of
steps (does it rise). A second LoRA run with `model.lora.sync=merged` (merged full weights into an
engine without LoRA, as TRL does) shows what the adapter-only sync saves.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.bench_grpo import run_grpo, summarize


def reward_blocks(rows: list[dict], block: int) -> list[float]:
    vals = [r["reward/mean"] for r in rows]
    return [statistics.mean(vals[i : i + block]) for i in range(0, len(vals), block)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="deploy/configs/smollm2_arith_cpu.yaml")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument("--no-merged", action="store_true", help="skip the merged-sync LoRA run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    lora = [f"model.lora.rank={args.rank}", f"model.lora.alpha={2 * args.rank}", f"learner.lr={args.lora_lr}"]
    runs = {"full fine-tune": [], f"LoRA r={args.rank}, adapter sync": lora}
    if not args.no_merged:
        runs[f"LoRA r={args.rank}, merged sync"] = [*lora, "model.lora.sync=merged"]
    results, rewards = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, sets) in enumerate(runs.items()):
            rows = run_grpo(args.config, args.steps, 1, 1, [*args.set, *sets], Path(tmp) / f"run{i}")
            s = summarize(rows, args.warmup)
            s["peak_memory_mb"] = max(r.get("learner/peak_memory_mb") or 0.0 for r in rows)
            s["sampler_gap_max"] = max(r.get("learner/sampler_gap") or 0.0 for r in rows)
            results[name], rewards[name] = s, reward_blocks(rows, max(1, args.steps // 4))
            print(f"{name}: done ({s['loop_s']:.0f} s loop)", flush=True)

    cols = [
        ("sync MB/step", lambda r: r["sync_bytes"] / 1e6),
        ("sync s", lambda r: r["weight_sync_s"]),
        ("learner peak MB/rank", lambda r: r["peak_memory_mb"]),
        ("step s", lambda r: r["step_s"]),
        ("engine s", lambda r: r["engine_s"]),
        ("train s", lambda r: r["train_s"]),
        ("sampler_gap max", lambda r: r["sampler_gap_max"]),
    ]
    print(f"\n{args.steps} steps each, medians over steps {args.warmup + 1}..{args.steps}:\n")
    print("| run | " + " | ".join(c for c, _ in cols) + " | reward by block of steps |")
    print("|---" * (len(cols) + 2) + "|")
    for name, r in results.items():
        blocks = " → ".join(f"{x:.2f}" for x in rewards[name])
        print(f"| {name} | " + " | ".join(f"{f(r):.3g}" for _, f in cols) + f" | {blocks} |")
    full, ad = results["full fine-tune"], results[f"LoRA r={args.rank}, adapter sync"]
    print(
        f"\nLoRA adapter sync / full: bytes {ad['sync_bytes'] / full['sync_bytes']:.3f}, "
        f"sync s {ad['weight_sync_s'] / full['weight_sync_s']:.2f}, step s {ad['step_s'] / full['step_s']:.2f}, "
        f"train s {ad['train_s'] / full['train_s']:.2f}, peak memory {ad['peak_memory_mb'] / full['peak_memory_mb']:.2f}"
    )


if __name__ == "__main__":
    main()
