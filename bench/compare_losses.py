"""Policy losses side by side: the same config, seed and steps, one `grpo-dist run` per loss, in one
invocation (machines drift; only runs measured together are compared).

    grpo-dist get-model smollm2-135m-instruct --out runs/smollm2
    python -m bench.compare_losses [--config deploy/configs/smollm2_arith_cpu.yaml] [--steps 20]
                                   [--block 5] [--loss NAME:KEY=VALUE[;KEY=VALUE]] [--out FILE]

Default losses: `clip` (the config's own, DAPO aggregation in the shipped config), `gspo`
(importance_sampling_level=sequence with grpo aggregation, as the GSPO paper) and `cispo` (its cap 5,
dapo aggregation). Prints the training reward (`reward/mean`) averaged by blocks of `--block` steps,
the held-out accuracy before and after (the run's own evaluation, `trainer.eval_num_prompts` prompts
x `eval_num_samples`), the learner's token fractions clipped (`clip`) and capped (`cispo`), the median
step time and the wall time of each run. Checkpoints
and intermediate evaluations are off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.bench_grpo import run_job

DEFAULT_LOSSES = [
    "clip:",
    "gspo:algorithm.importance_sampling_level=sequence;algorithm.loss_type=grpo",
    "cispo:algorithm.policy_loss=cispo;algorithm.loss_type=dapo",
]


def run(config: str, steps: int, sets: list[str], out_dir: Path) -> tuple[list[dict], dict, float]:
    t0 = time.perf_counter()
    rows = run_job(config, [f"trainer.steps={steps}", "trainer.eval_every=null", *sets], out_dir, " ".join(sets))
    wall = time.perf_counter() - t0
    return rows, json.loads((out_dir / "summary.json").read_text()), wall


def mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/configs/smollm2_arith_cpu.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--block", type=int, default=5, help="steps per reward block")
    ap.add_argument(
        "--loss", action="append", help="NAME:KEY=VALUE[;KEY=VALUE] (repeatable; default: clip, gspo, cispo)"
    )
    ap.add_argument("--out", help="write the results as JSON here too")
    args = ap.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.loss or DEFAULT_LOSSES:
            name, _, sets = spec.partition(":")
            print(f"[compare_losses] {name}: {sets or '(the config as is)'}", flush=True)
            rows, summary, wall = run(args.config, args.steps, [s for s in sets.split(";") if s], Path(tmp) / name)
            blocks = [rows[i : i + args.block] for i in range(0, len(rows), args.block)]
            results[name] = {
                "overrides": sets,
                "reward_by_block": [mean(b, "reward/mean") for b in blocks],
                "eval_before": summary["eval_before"].get("accuracy"),
                "eval_after": summary["eval_after"].get("accuracy"),
                "clip_fraction": mean(rows, "learner/clip_region"),
                "cispo_clip_fraction": mean(rows, "learner/cispo_clip_fraction"),
                "step_seconds": statistics.median(r["time/step"] for r in rows),
                "wall_seconds": wall,
            }
            print(f"[compare_losses] {name}: {json.dumps(results[name])}", flush=True)

    spans = [
        f"{i * args.block + 1}-{min((i + 1) * args.block, args.steps)}" for i in range(-(-args.steps // args.block))
    ]
    print(f"\n{args.config}, {args.steps} steps each, one invocation")
    head = [
        "loss",
        *(f"reward {s}" for s in spans),
        "held-out before",
        "after",
        "clipped",
        "capped",
        "step s",
        "wall s",
    ]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, r in results.items():
        cells = [
            name,
            *(f"{x:.3f}" for x in r["reward_by_block"]),
            f"{r['eval_before']:.3f}",
            f"{r['eval_after']:.3f}",
            f"{r['clip_fraction']:.4f}",
            f"{r['cispo_clip_fraction']:.4f}",
            f"{r['step_seconds']:.1f}",
            f"{r['wall_seconds']:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
