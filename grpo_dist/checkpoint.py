"""Crash-safe checkpoints: write everything into a temporary directory, rename it into place,
then move the ``latest`` marker last. A crash at any point leaves the previous checkpoint (and
the marker pointing at it) intact; half-written directories are never read back."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpo_dist.errors import UserError, first_line

LATEST = "latest"


class CheckpointWriteError(UserError):
    """The file system refused a checkpoint (disk full, permissions); the previous one is intact."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: Path | str,
    step: int,
    state: dict[str, Any],
    writers: dict[str, Callable[[str], None]],
    keep_last: int = 2,
) -> Path:
    """Save ``step``: each ``writers[name](dir)`` fills ``<ckpt>/<name>``; ``state`` goes to state.json.

    Layout: ``root/step-000012/{policy,deepspeed,state.json}`` and ``root/latest`` (a file holding
    the directory name, written last).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)  # leftover of a crashed save of this same step
    try:
        tmp.mkdir()
        for name, write in writers.items():
            write(str(tmp / name))
        _write_atomic(tmp / "state.json", json.dumps(state))
        _fsync_dir(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written step behind
        cause = getattr(e, "cause", None) or e  # a learner's OSError arrives wrapped by Ray
        if not isinstance(cause, OSError):
            raise
        previous = root / (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
        raise CheckpointWriteError(
            f"checkpoint step {step} could not be written under {root} ({first_line(cause)}); "
            + (
                f"the previous checkpoint {previous} is intact and --resume continues from it"
                if previous
                else "no earlier checkpoint exists"
            )
        ) from e
    if final.exists():
        # Re-saving a step (e.g. after resume): move the old one aside first so `final` is never partial.
        old = root / f".old-step-{step:06d}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, final.name)
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    current = latest_checkpoint(root)
    for p in steps[:-keep_last]:
        if p != current:
            shutil.rmtree(p)


def latest_checkpoint(root: Path | str) -> Path | None:
    """The checkpoint the ``latest`` marker names, or None. Raises if the marker is dangling."""
    root = Path(root)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"checkpoint marker {marker} names {path}, which has no state.json")
    return path
