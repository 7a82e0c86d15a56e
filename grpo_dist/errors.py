"""Error text helpers shared by the driver side and the actors."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """One line saying what went wrong: for a remote task's error, its cause (Ray's own first line
    only names the task)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
