"""Run-directory logging: metrics.jsonl (one object per step), prompts.jsonl (the data rows each step
trained on), TensorBoard, a progress bar with ETA, sample completions, and at the end summary.json,
a before/after table and a PNG plot.

Cluster-side metrics (Ray's ``ray.util.metrics``, shown in the dashboard) are recorded through
the ``record`` callback that ``deploy/`` passes in, so this module stays free of ray. Every key is
declared in ``grpo_dist.metrics``; an undeclared one is written all the same, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import LoggingConfig
from grpo_dist.metrics import undeclared

log = logging.getLogger("grpo_dist")


_REWARD_SUMMARIES = ("reward/mean", "reward/std", "reward/missing_frac")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class _NullProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, record: Callable[[dict[str, float]], None] | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.record = record
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self._tb = None
        self._undeclared: set[str] = set()  # warned about once
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def progress(self, total: int, initial: int = 0):
        if not self.cfg.progress_bar:
            return _NullProgress()
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc="grpo steps", unit="step", dynamic_ncols=True)

    def log_prompts(self, step: int, weight_version: int, indices: list[int]) -> None:
        """The training-data indices of the groups ``step`` trained on, in batch order. A resumed run
        appends the steps it trains again; the last line of a step is the one its checkpoints hold."""
        if self.cfg.jsonl:
            with open(self.run_dir / "prompts.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "weight_version": weight_version, "indices": indices}) + "\n")

    def log_step(self, step: int, metrics: dict[str, float], batch: RolloutBatch | None = None) -> None:
        row = {"step": step, **{k: (float(v) if _finite(v) else None) for k, v in metrics.items()}}
        if new := set(undeclared(metrics)) - self._undeclared:
            self._undeclared |= new
            log.warning("metric keys not declared in grpo_dist/metrics.py: %s", ", ".join(sorted(new)))
        self.history.append(row)
        if self.cfg.jsonl:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if _finite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self.record is not None:
            self.record({k: float(v) for k, v in metrics.items() if _finite(v)})
        # Each reward component the step has (accuracy, format, env, ...) beside the combined mean.
        components = " ".join(
            f"{k.removeprefix('reward/')}={v:.3f}"
            for k, v in metrics.items()
            if k.startswith("reward/") and k not in _REWARD_SUMMARIES and _finite(v)
        )
        log.info(
            "step %d reward=%.3f (%s) kl=%.4f loss=%.4f time=%.1fs",
            step,
            metrics.get("reward/mean", float("nan")),
            components,
            metrics.get("learner/kl", metrics.get("kl", float("nan"))),
            metrics.get("learner/loss", metrics.get("loss", float("nan"))),
            metrics.get("time/step", float("nan")),
        )
        if batch is not None and batch.completions:
            G = len(batch) // batch.num_groups
            for i in range(0, min(batch.num_groups, self.cfg.log_completions) * G, G):  # first row of each group
                log.info(
                    "  sample %r -> %r (reward %.2f)",
                    batch.prompts[i][-60:],
                    batch.completions[i][:120],
                    batch.rewards[i],
                )

    def log_eval(self, step: int, result: dict[str, float]) -> None:
        self.evals.append({"step": step, **result})
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **result}) + "\n")
        if self._tb is not None:
            for k, v in result.items():
                if _finite(v):
                    self._tb.add_scalar(f"eval/{k}", v, step)
        if self.record is not None:
            self.record({f"eval/{k}": float(v) for k, v in result.items() if _finite(v)})

    def finish(self, summary: dict[str, Any]) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self._tb is not None:
            self._tb.close()
        print(results_table(summary["eval_before"], summary["eval_after"]))
        try:
            plot_run(self.history, self.evals, self.run_dir / "training.png")
        except Exception as e:  # a plotting failure must not lose a finished run's results
            log.warning("could not draw training.png: %s", e)


def results_table(before: dict[str, float], after: dict[str, float]) -> str:
    """The seed blog's before/after table, as Markdown."""
    lines = ["| metric (held-out) | before | after |", "|---|---|---|"]
    for key in ("accuracy", "format_reward"):
        lines.append(f"| {key} | {before.get(key, float('nan')):.3f} | {after.get(key, float('nan')):.3f} |")
    return "\n".join(lines)


def plot_run(history: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]

    def series(key: str) -> list[float]:
        return [h.get(key) if h.get(key) is not None else float("nan") for h in history]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(steps, series("reward/mean"), label="reward (train)")
    for key in ("reward/accuracy", "reward/format"):
        if any(h.get(key) is not None for h in history):
            axes[0].plot(steps, series(key), label=key.split("/")[1], alpha=0.7)
    axes[0].set_title("reward per step")
    axes[0].legend()
    if evals:
        axes[1].plot([e["step"] for e in evals], [e["accuracy"] for e in evals], "o-", label="held-out accuracy")
        axes[1].plot([e["step"] for e in evals], [e["format_reward"] for e in evals], "s--", label="held-out format")
        axes[1].legend()
    axes[1].set_title("evaluation")
    axes[2].plot(steps, series("learner/kl"), label="KL to reference")
    axes[2].set_title("KL per step")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
