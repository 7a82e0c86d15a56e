"""``module:attr`` paths in configs (reward functions, environment factories, tools) to objects."""

from __future__ import annotations

import importlib
from typing import Any

from grpo_dist.errors import first_line


def import_object(path: str, what: str, error: type[Exception] = ValueError) -> Any:
    """The object at ``"pkg.module:attr"`` (the attribute may be dotted: ``mod:Class.fn``); a bad path
    raises ``error`` in one line naming ``what`` and ``path``."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"{what} {path!r} is not a 'module:function' path")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # a missing module, or one that fails while importing
        raise error(f"{what} {path!r}: cannot import module {module_name!r} ({first_line(e)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
