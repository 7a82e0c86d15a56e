"""Error classes and text helpers shared by the driver side and the actors."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or an operator mistake: the CLI prints the message as one line and exits 2. The
    message names the field, file or address and says what to do."""


def one_line(parts: list[str]) -> str:
    """Several problems as one line (``a; b; c``)."""
    return "; ".join(p.strip() for p in parts)


def first_line(e: BaseException) -> str:
    """One line saying what went wrong: for a remote task's error, its cause (Ray's own first line
    only names the task)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
