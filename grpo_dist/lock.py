"""One output directory, one job: ``<output_dir>/.grpo-dist.lock`` names its owner.

The lock file is created with ``O_EXCL``, so two jobs starting at once cannot both take it. A lock
whose owner is a process of this host that no longer runs is stale: it is taken over, with a log
line. A lock held from another host cannot be checked from here and is refused, naming the owner
(remove the file once that job is known to be gone).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from grpo_dist.errors import UserError

LOCK_NAME = ".grpo-dist.lock"
log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """``with OutputLock(dir):`` holds the directory for this process (see the module docstring)."""

    def __init__(self, output_dir: str | Path, job_id: str | None = None):
        self.path = Path(output_dir) / LOCK_NAME
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": job_id,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._create():
            return
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            held = {}
        host, pid = held.get("host"), held.get("pid")
        if host == self.owner["host"] and isinstance(pid, int) and not _alive(pid):
            log.warning(
                "taking over the stale lock %s of pid %d (no longer running; job %s, since %s)",
                self.path,
                pid,
                held.get("job_id"),
                held.get("since"),
            )
            self.path.unlink(missing_ok=True)
            if self._create():
                return
            held = json.loads(self.path.read_text())
        job = f"job {held['job_id']}, " if held.get("job_id") else ""
        raise UserError(
            f"trainer.output_dir={str(self.path.parent)!r} is in use by pid {held.get('pid')} on host "
            f"{held.get('host')} ({job}since {held.get('since')}); choose another output_dir, or "
            f"remove {self.path} once that job is gone"
        )

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
