"""Verdict on a finished grpo-dist run directory (scripts/gpu_smoke.sh calls it after each run;
usable on any run's outputs): one line, PASS or FAIL with every reason, exit code 0 or 1.

Checks, from the run's own outputs (``metrics.jsonl``, ``summary.json``, ``checkpoints/``):
- the steps logged are exactly 1..N;
- ``learner/sampler_gap`` (token mean of |learner log-prob - engine log-prob|) stayed at most
  ``--gap-tol`` at every step: the engine serves the weights the learner holds;
- every rollout worker's weight version is N, the last step (every sync arrived);
- with ``--checkpoint-step K``: the checkpoint of step K is complete (policy and DeepSpeed state).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def problems(run: Path, steps: int, gap_tol: float, checkpoint_step: int | None) -> list[str]:
    out: list[str] = []
    metrics, summary = run / "metrics.jsonl", run / "summary.json"
    if not metrics.is_file() or not summary.is_file():
        return [f"{run} has no metrics.jsonl/summary.json (the run did not finish)"]
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    logged = [r["step"] for r in rows]
    if logged != list(range(1, steps + 1)):
        out.append(f"steps logged {logged}, expected 1..{steps}")
    gaps = {r["step"]: r.get("learner/sampler_gap") for r in rows}
    bad = {s: g for s, g in gaps.items() if g is None or not g <= gap_tol}
    if bad:
        out.append(f"learner/sampler_gap above {gap_tol:g} at steps {bad}")
    versions = json.loads(summary.read_text()).get("weight_versions", {})
    if not versions or set(versions.values()) != {steps}:
        out.append(f"rollout weight versions {versions}, expected every worker at {steps}")
    if checkpoint_step is not None:
        ckpt = run / "checkpoints" / f"step-{checkpoint_step:06d}"
        for part in ("policy/model.safetensors", "deepspeed/state"):
            if not (ckpt / part).exists():
                out.append(f"checkpoint {ckpt} lacks {part}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, required=True, help="the last step the run should have logged")
    ap.add_argument("--gap-tol", type=float, required=True)
    ap.add_argument("--checkpoint-step", type=int)
    ap.add_argument("--what", default="run", help="what the verdict is about (printed)")
    args = ap.parse_args(argv)
    found = problems(args.run_dir, args.steps, args.gap_tol, args.checkpoint_step)
    if found:
        print(f"FAIL {args.what}: " + "; ".join(found))
        return 1
    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    worst = max(r["learner/sampler_gap"] for r in rows)
    print(
        f"PASS {args.what}: steps 1..{args.steps}, max learner/sampler_gap {worst:.2e} <= {args.gap_tol:g}, "
        f"every worker at weight version {args.steps}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
