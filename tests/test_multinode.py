"""Several Ray nodes on one machine (`ray.cluster_utils.Cluster`: a raylet and an object store per
node; `remove_node` kills every process on it), each job a `grpo-dist run` subprocess joined to the
cluster as a user runs it:

- placement by node labels, control and metrics actors on the head, a worker added on a node added
  mid-run (`grpo-dist scale`), scaling down, and every query of the shipped Grafana dashboard
  answered by a real Prometheus scraping the cluster through Ray's service-discovery file;
- losing a rollout worker's node mid-run: the job finishes every step on the surviving worker, counts
  and logs the loss, and the worker Ray restarts on a node added later gets the current weights
  before it generates;
- served reward models placed on their own node by label, scaled live with `grpo-dist scale
  --reward-workers`, and a reward actor SIGKILLed mid-run: its requests are re-sent, none is lost;
- losing the learner's node: the job fails at once with one line naming the node and its actors, and
  `--resume` continues on a cluster that has a learner node again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from test_e2e import ROOT, assert_no_ray_left, cli_env, ray_daemon_pids
from test_metrics import queried_series

from grpo_dist.metrics import metric_for_series

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.e2e, pytest.mark.multinode, pytest.mark.timeout(1200)]
DASHBOARD_JSON = ROOT / "deploy" / "grafana" / "grpo-dist.json"
SD_FILE = Path("/tmp/ray/prom_metrics_service_discovery.json")  # written by the head's dashboard
LEARNER = {"grpo-role": "learner"}
ROLLOUT = {"grpo-role": "rollout"}
REWARD = {"grpo-role": "reward"}


@contextmanager
def cluster_of(*nodes: tuple[int, dict]):
    """A head with no CPUs (it hosts only the job's control and metrics actors) and one node per
    (cpus, labels); yields the Cluster and its added nodes."""
    from ray.cluster_utils import Cluster

    before = ray_daemon_pids()
    # Export metrics every second (Ray's default is 10 s) so a short job shows in Prometheus.
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # noqa: SIM112 (Ray's own spelling)
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1"},
    )
    try:
        added = [cluster.add_node(num_cpus=cpus, labels=labels) for cpus, labels in nodes]
        cluster.wait_for_nodes()
        yield cluster, added
    finally:
        cluster.shutdown()
        os.environ.pop("RAY_metrics_report_interval_ms", None)
        assert_no_ray_left(before)


def job_config(tmp_path: Path, model: Path, address: str, **sections) -> Path:
    cfg = {
        "model": {"path": str(model)},
        "data": {"source": "synthetic", "max_prompt_length": 32, "synthetic": {"num_train": 400, "num_test": 8}},
        "algorithm": {"num_generations": 4, "max_completion_length": 16, "beta": 0.04},
        "rollout": {"num_workers": 1, "cpu_kvcache_space_gib": 1},
        "learner": {"num_ranks": 2, "zero_stage": 2, "micro_batch_size": 4, "lr": 1e-3},
        "trainer": {"steps": 30, "prompts_per_step": 4, "eval_num_prompts": 4, "output_dir": str(tmp_path / "run")},
        "checkpoint": {"save_every": None, "save_at_end": False},
        "logging": {"progress_bar": False},
        "cluster": {
            "address": address,
            "collective_timeout_s": 60,
            "rpc_timeout_s": 240,
            "learner_label_selector": LEARNER,
            "rollout_label_selector": ROLLOUT,
        },
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_job(cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "grpo_dist.cli", "run", str(cfg), *extra],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(job: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        _, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        _, err = job.communicate()
        raise AssertionError(f"job still running after {timeout:.0f}s: {err[-5000:]}") from None
    return job.returncode, err


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def log_text(run: Path) -> str:
    path = run / "grpo-dist.log"
    return path.read_text() if path.exists() else ""


def wait_for(what: str, check, job: subprocess.Popen, timeout: float = 300, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if job.poll() is not None:
            raise AssertionError(f"job exited ({job.returncode}) while waiting for {what}: {job.stderr.read()[-5000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f}s")
        time.sleep(every)


def placement(run: Path) -> dict[str, str]:
    """Actor -> node id prefix, from the job's "placement:" log line."""
    line = re.search(r"placement: (.*)", log_text(run)).group(1)
    out = {}
    for part in line.split("; "):
        actors, node = re.fullmatch(r"(.*) on node (\w+) .*", part).groups()
        out.update(dict.fromkeys(actors.split(", "), node))
    return out


def grpo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grpo_dist.cli", *args],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------- Prometheus


@contextmanager
def prometheus(tmp_path: Path):
    """Debian's Prometheus scraping every node's metrics agent listed in Ray's service-discovery file."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            raise AssertionError("prometheus is not installed (scripts/setup.sh installs Debian's package)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    port = _free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "ray", "file_sd_configs": [{"files": [str(SD_FILE)], "refresh_interval": "1s"}]}
                ],
            }
        )
    )
    log = tmp_path / "prometheus.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={conf}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(log.read_text()[-3000:]) from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def promql(url: str, expr: str) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD_JSON.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def always_written(expr: str) -> bool:
    """Whether a dashboard query names a series every job writes (not one of, e.g., multi-turn runs only)."""
    return any((m := metric_for_series(series)) is None or m.only_with is None for series in queried_series(expr))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- tests


def test_placement_scaling_onto_a_new_node_and_the_prometheus_view(tmp_path, tiny_model_dir):
    import ray

    with cluster_of((2, LEARNER), (1, ROLLOUT)) as (cluster, (learner_node, rollout_a)), prometheus(tmp_path) as prom:
        run = tmp_path / "run"
        job = start_job(job_config(tmp_path, tiny_model_dir, cluster.address, trainer={"steps": 40, "eval_every": 10}))
        try:
            wait_for("step 2", lambda: len(rows(run)) >= 2, job)
            where = placement(run)
            head = cluster.head_node.node_id[:8]
            assert where == {
                "learner-0": learner_node.node_id[:8],
                "learner-1": learner_node.node_id[:8],
                "rollout-0": rollout_a.node_id[:8],
                "grpo-control": head,
                "grpo-metrics": head,
            }, where

            # A new rollout node, then one more worker: it lands there (the only node with room) and
            # gets the current weights before it generates.
            rollout_b = cluster.add_node(num_cpus=1, labels=ROLLOUT)
            t_scale = time.monotonic()
            out = grpo("scale", "--workers", "2", "--address", cluster.address)
            assert out.returncode == 0, out.stderr
            joined = wait_for(
                "the new worker serving",
                lambda: next((r for r in rows(run) if r.get("rollout/num_workers") == 2), None),
                job,
                timeout=240,
            )
            t_joined = time.monotonic() - t_scale
            log = log_text(run)
            assert re.search(rf"rollout-1 is up on node {rollout_b.node_id[:8]}", log), log[-3000:]
            # The first push to reach it may be the next step's sync or the upkeep's re-push, whichever
            # saw it up first; either way it serves the job's weights before it generates.
            assert re.search(r"rollout-1 serves the job's weights \(v\d+\) from now on", log), log[-3000:]
            assert joined["staleness"] == 0.0 and joined["count/workers_added"] == 1.0
            print(f"scale to 2 workers: the new worker served the current weights after {t_joined:.1f}s")

            # Every panel's query of the shipped dashboard returns data for this running job, the
            # per-worker ones from each worker's own node.
            deadline = time.monotonic() + 60
            while True:
                empty = [
                    (t, expr) for t, expr in dashboard_queries() if always_written(expr) and not promql(prom, expr)
                ]
                if not empty or time.monotonic() > deadline:
                    break
                time.sleep(2)
            assert not empty, empty
            series = promql(prom, "ray_grpo_worker_weight_version")
            nodes = {s["metric"]["worker"]: s["metric"]["node"] for s in series}
            assert nodes == {"rollout-0": rollout_a.node_id, "rollout-1": rollout_b.node_id}, nodes
            assert len({s["metric"]["instance"] for s in series}) == 2  # scraped from two metrics agents

            # Scaling down releases the node: a 1-CPU actor fits on it again.
            out = grpo("scale", "--workers", "1", "--address", cluster.address)
            assert out.returncode == 0, out.stderr
            wait_for("the scale-down", lambda: "scaling down: removed rollout-1" in log_text(run), job)
            ray.init(address=cluster.address, namespace="multinode-test", logging_level="ERROR")
            try:

                @ray.remote(num_cpus=1, label_selector=ROLLOUT)
                def where_am_i():
                    return ray.get_runtime_context().get_node_id()

                assert ray.get(where_am_i.remote(), timeout=60) == rollout_b.node_id
            finally:
                ray.shutdown()
            code, err = finish(job)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        assert code == 0, err[-5000:]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 40 and set(summary["weight_versions"].values()) == {40}
        assert all(r["staleness"] == 0.0 for r in rows(run))


def test_served_reward_models_are_placed_by_label_scaled_live_and_survive_a_sigkill(
    tmp_path, tiny_model_dir, tiny_classifier_dir
):
    """A streaming job scoring with a served classifier and an LLM judge (both on the reward node, by
    label; each group sent to them as it finishes): `grpo-dist scale --reward-workers rm=2` then `rm=1`
    while it trains, and a SIGKILL of the judge's actor mid-run. Every step completes; the kill's lost
    requests are counted as `died` and re-sent."""
    import ray

    models = [
        {"name": "rm", "kind": "classifier", "path": str(tiny_classifier_dir), "label_selector": REWARD, "weight": 0.5},
        {
            "name": "judge",
            "kind": "judge",
            "path": str(tiny_model_dir),
            "prompt_template": "Q: {question}\nA: {answer}\nRight? Y or N",
            "choices": ["Y", "N"],
            "max_model_len": 256,
            "label_selector": REWARD,
            "retries": 6,  # the judge's engine takes ~20 s to come back: backoff 1+2+...+32 s covers it
        },
    ]
    with cluster_of((2, LEARNER), (1, ROLLOUT), (3, REWARD)) as (cluster, (_, _, reward_node)):
        run = tmp_path / "run"
        job = start_job(
            job_config(
                tmp_path,
                tiny_model_dir,
                cluster.address,
                rewards={"models": models},
                rollout={"streaming": True},  # each group is sent to the models as it finishes
                trainer={"steps": 24, "max_staleness": 1},
            )
        )
        try:
            wait_for("step 2", lambda: len(rows(run)) >= 2, job, timeout=400)
            where = placement(run)
            assert where["reward-rm-0"] == where["reward-judge-0"] == reward_node.node_id[:8], where
            out = grpo("scale", "--reward-workers", "rm=2", "--address", cluster.address)
            assert out.returncode == 0, out.stderr
            wait_for("two rm workers", lambda: any(r.get("served/rm/workers") == 2 for r in rows(run)), job)
            out = grpo("scale", "--reward-workers", "nope=2", "--address", cluster.address)
            assert out.returncode != 0 and "serves no reward model 'nope'" in out.stderr, out.stderr
            ray.init(address=cluster.address, namespace="grpo-dist", logging_level="ERROR")
            try:
                pid = ray.get(ray.get_actor("reward-judge-0").status.remote(), timeout=60)["pid"]
            finally:
                ray.shutdown()
            killed_at = len(rows(run))
            os.kill(pid, signal.SIGKILL)
            out = grpo("scale", "--reward-workers", "rm=1", "--address", cluster.address)
            assert out.returncode == 0, out.stderr
            wait_for("the scale-down", lambda: "scaling down: removed reward-rm-1" in log_text(run), job)
            code, err = finish(job)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        assert code == 0, err[-5000:]
        all_rows = rows(run)
        assert [r["step"] for r in all_rows] == list(range(1, 25))
        last = all_rows[-1]
        assert last["count/reward_workers_added"] == 1.0 and last["count/reward_workers_removed"] == 1.0
        assert last["served/judge/restarts"] == 1.0 and last["served/rm/workers"] == 1.0
        died = sum(r.get("rollout/reward_failures/judge/died", 0.0) for r in all_rows[killed_at:])
        assert died >= 1, "the kill cost no request"
        # Re-sent, not lost: no row of the run is left without a judge score.
        assert not any(k.endswith("/nan") for r in all_rows for k in r if k.startswith("rollout/reward_failures/"))
        assert all("reward/judge" in r and "reward/rm" in r for r in all_rows)


def test_losing_a_rollout_node_mid_run_finishes_every_step_and_a_new_node_takes_the_worker(tmp_path, tiny_model_dir):
    with cluster_of((2, LEARNER), (1, ROLLOUT), (1, ROLLOUT)) as (cluster, (_, node_a, node_b)):
        run = tmp_path / "run"
        job = start_job(
            job_config(tmp_path, tiny_model_dir, cluster.address, rollout={"num_workers": 2}, trainer={"steps": 30})
        )
        try:
            wait_for("step 4", lambda: len(rows(run)) >= 4, job)
            by_id = {n.node_id[:8]: n for n in (node_a, node_b)}
            victim = by_id[placement(run)["rollout-0"]]
            survivor = next(n for n in (node_a, node_b) if n is not victim)
            lost_at = len(rows(run))
            t_lost = time.monotonic()
            cluster.remove_node(victim)
            # No node has room for rollout-0 now: the job goes on with rollout-1 alone.
            wait_for(
                "steps on the surviving worker",
                lambda: len([r for r in rows(run)[lost_at:] if r.get("rollout/num_workers") == 1]) >= 3,
                job,
            )
            log = log_text(run)
            assert re.search(rf"rollout-0 on node {victim.node_id[:8]} \(.*\) is down", log), log[-3000:]
            # Then a node with room: Ray restarts rollout-0 there; it serves only after the push.
            t_added = time.monotonic()
            fresh = cluster.add_node(num_cpus=1, labels=ROLLOUT)
            alone = next(i for i, r in enumerate(rows(run)) if i >= lost_at and r["rollout/num_workers"] == 1)
            back = wait_for(
                "rollout-0 serving again",
                lambda: next((r for r in rows(run)[alone:] if r.get("rollout/num_workers") == 2), None),
                job,
                timeout=300,
            )
            t_back = time.monotonic() - t_added
            code, err = finish(job)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        assert code == 0, err[-5000:]
        log = log_text(run)
        assert re.search(
            rf"rollout-0 was restarted by Ray on node {fresh.node_id[:8]} .* its node "
            rf"{victim.node_id[:8]} \(.*\) is dead; it waits for the job's current weights",
            log,
        ), log[-4000:]
        assert survivor.node_id[:8] not in re.search(r"rollout-0 was restarted by Ray on node (\w+)", log).group(1)
        all_rows = rows(run)
        assert [r["step"] for r in all_rows] == list(range(1, 31))
        assert all(r["staleness"] == 0.0 for r in all_rows)
        last = all_rows[-1]
        assert last["count/rollout_worker_restarts"] == 1.0 and last["count/rollout_nodes_lost"] == 1.0
        # It served the learner's weights from its first batch on (the engine's log-probs are the learner's).
        assert back["learner/sampler_gap"] < 1e-4, back
        summary = json.loads((run / "summary.json").read_text())
        assert summary["weight_versions"] == {"rollout-0": 30, "rollout-1": 30}
        before = sorted(r["time/step"] for r in all_rows[1:lost_at])
        during = max(r["time/step"] for r in all_rows[lost_at:])
        print(
            f"rollout-node loss: median step {before[len(before) // 2]:.2f}s before, slowest step after "
            f"{during:.2f}s; {time.monotonic() - t_lost:.0f}s from the loss to the end; the replacement "
            f"served current weights {t_back:.1f}s after its node was added"
        )


def test_losing_the_learner_node_fails_at_once_naming_it_and_resume_continues(tmp_path, tiny_model_dir):
    with cluster_of((2, LEARNER), (1, ROLLOUT)) as (cluster, (learner_node, _)):
        run = tmp_path / "run"
        cfg = job_config(
            tmp_path,
            tiny_model_dir,
            cluster.address,
            trainer={"steps": 12},
            checkpoint={"save_every": 2, "save_at_end": True},
        )
        # A selector no node matches is refused before any actor starts, naming the labels there are.
        bad = grpo("run", str(cfg), "--set", "cluster.learner_label_selector={grpo-role: trainer}")
        said = [ln for ln in bad.stderr.splitlines() if ln.startswith("grpo-dist:")]
        assert bad.returncode == 2 and len(said) == 1, bad.stderr[-3000:]
        assert (
            "cluster.learner_label_selector={'grpo-role': 'trainer'}: no alive node of the cluster matches; "
            "node labels there: grpo-role=learner, grpo-role=rollout"
        ) in said[0], said
        job = start_job(cfg)
        try:
            wait_for("the step-2 checkpoint", lambda: (run / "checkpoints" / "latest").exists(), job)
            t0 = time.monotonic()
            cluster.remove_node(learner_node)
            code, err = finish(job, timeout=240)
            failed_after = time.monotonic() - t0
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        said = [ln for ln in err.splitlines() if ln.startswith("grpo-dist:")]
        assert code == 1 and len(said) == 1, err[-5000:]
        assert f"node {learner_node.node_id[:8]} (" in said[0] and "learner-0, learner-1" in said[0], said
        assert "--resume" in said[0] and "Traceback" not in err
        done = len(rows(run))
        print(
            f"learner-node loss: the job failed {failed_after:.1f}s after the node went, at step {done + 1}: {said[0]}"
        )

        cluster.add_node(num_cpus=2, labels=LEARNER)
        cluster.wait_for_nodes()
        job = start_job(cfg, "--resume")
        code, err = finish(job)
        assert code == 0, err[-5000:]
        assert re.search(r"resumed from .*step-0000\d\d at step \d+", log_text(run))
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 12 and set(summary["weight_versions"].values()) == {12}
