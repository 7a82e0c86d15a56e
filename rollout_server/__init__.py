"""Rollout service: Ray actors each owning one vLLM engine (see manager.py and worker.py).

vLLM is imported only inside the worker processes, never by importing this package.
"""

from rollout_server.manager import PendingRollout, RolloutManager
from rollout_server.worker import RolloutWorker

__all__ = ["PendingRollout", "RolloutManager", "RolloutWorker"]
