"""The faults of `bench/chaos.py` whose timing only the job's driver process knows, and the reward
function that hangs on demand.

    python -m bench.chaos_faults PLAN.json LOG.jsonl run CONFIG [--resume]

runs `grpo-dist run` unchanged after wrapping two calls of the rollout manager:

- ``start_generate`` of a training batch: once a ``kill_generate`` fault is due, a worker that got
  prompts is SIGKILLed 0.1 s after its generate call went out, if that call is still running (else
  the fault waits for the next batch, so every one injected strikes mid-generation);
- ``start_receive_weights``: once a ``kill_sync`` fault is due, a worker is SIGKILLed right after it
  was told to join the weight-sync group, so the learner's broadcast to it is in flight.

A fault of plan step ``s`` is due once the job has logged step ``s - 1``. Each one that struck is
appended to LOG (what, which worker, at which step); a resumed job skips those already there. The
kill is a real SIGKILL of the worker's process; it is sent from the driver because every node of a
``ray.cluster_utils.Cluster`` is on this machine.

``hang_once`` is a reward function (weight 0 in the benchmark's config): it sleeps far past
``rewards.timeout_s`` on the one call that removes the flag file the orchestrator wrote, and returns
zeros otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

KILL_AFTER_S = 0.1


def hang_once(prompts, completions, flag: str, hang_s: float = 120.0, **kwargs):
    try:
        os.remove(flag)  # atomic: exactly one caller wins, so one batch hangs per flag
    except FileNotFoundError:
        return [0.0] * len(completions)
    time.sleep(hang_s)
    return [0.0] * len(completions)


class Injector:
    def __init__(self, plan_path: Path, log_path: Path):
        self.plan = json.loads(plan_path.read_text())
        self.log_path = log_path
        done = [json.loads(ln) for ln in log_path.read_text().splitlines()] if log_path.exists() else []
        self.done = {d["plan_step"] for d in done}
        self.armed: set[int] = set()  # a kill waiting to strike: not due to another call meanwhile
        self.step = 0  # the last step the job logged
        self.lock = threading.Lock()

    def due(self, kind: str) -> dict | None:
        with self.lock:
            fault = next(
                (
                    f
                    for f in self.plan
                    if f["kind"] == kind and f["step"] not in self.done | self.armed and f["step"] <= self.step + 1
                ),
                None,
            )
            if fault:
                self.armed.add(fault["step"])
            return fault

    def struck(self, fault: dict, worker: str, pid: int) -> None:
        with self.lock:
            self.done.add(fault["step"])
            self.armed.discard(fault["step"])
            rec = {"plan_step": fault["step"], "kind": fault["kind"], "worker": worker, "pid": pid}
            rec["job_step"] = self.step + 1
            with self.log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        print(f"chaos: {fault['kind']} of {worker} (pid {pid}) in step {self.step + 1}", file=sys.stderr, flush=True)

    def disarm(self, fault: dict) -> None:
        with self.lock:
            self.armed.discard(fault["step"])


def install(inj: Injector) -> None:
    import ray

    from grpo_dist.monitoring import RunLogger
    from rollout_server.manager import SERVING, RolloutManager

    def pids(manager) -> dict[str, int]:
        """Serving workers' pids as the manager last saw them (it polls every worker between steps, so
        a restarted worker serves only once its new pid is known)."""
        return {w.name: w.pid for w in manager._workers if w.state == SERVING and w.pid}

    log_step = RunLogger.log_step

    def logged(self, step, metrics, batch=None):
        log_step(self, step, metrics, batch)
        inj.step = step

    start_generate = RolloutManager.start_generate

    def generate_then_kill(self, prompts, n=None, sampling=None):
        fault = inj.due("kill_generate") if sampling is None else None  # training batches only
        alive = pids(self) if fault else {}
        handle = start_generate(self, prompts, n, sampling)
        victims = [(name, ref) for name, ref in zip(handle.names, handle.refs) if name in alive]
        if fault and not victims:
            inj.disarm(fault)
        elif fault:
            name, ref = victims[fault["step"] % len(victims)]

            def kill():
                time.sleep(KILL_AFTER_S)
                if not ray.wait([ref], timeout=0)[0]:  # still generating
                    os.kill(alive[name], signal.SIGKILL)
                    inj.struck(fault, name, alive[name])
                else:  # it finished first: the next training batch gets the fault
                    inj.disarm(fault)

            threading.Thread(target=kill, daemon=True).start()
        return handle

    receive = RolloutManager.start_receive_weights

    def receive_then_kill(self, *args, **kwargs):
        fault = inj.due("kill_sync")
        pool = sorted(pids(self).items()) if fault else []
        refs = receive(self, *args, **kwargs)
        if fault and pool:
            name, pid = pool[fault["step"] % len(pool)]
            os.kill(pid, signal.SIGKILL)
            inj.struck(fault, name, pid)
        elif fault:
            inj.disarm(fault)
        return refs

    RunLogger.log_step = logged
    RolloutManager.start_generate = generate_then_kill
    RolloutManager.start_receive_weights = receive_then_kill


def main(argv: list[str]) -> int:
    from grpo_dist import cli

    install(Injector(Path(argv[0]), Path(argv[1])))
    return cli.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
