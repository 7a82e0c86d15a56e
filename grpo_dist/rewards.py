"""Reward functions and their containment.

A reward function has TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``
and, as in TRL, is called with keywords only (so ``fn(completions, **kwargs)`` works): one value
per completion, ``None`` meaning "no opinion" (e.g. the reference is unparseable).
Completions are plain strings or TRL's conversational form ``[{"role": "assistant", "content": ...}]``.
Dataset columns arrive as keyword lists (the reference answer is ``answer``); a spec's
``kwargs`` are passed as keywords too and win over a column of the same name.

Built in (``REWARDS``): ``accuracy``, ``format``, ``length``. Any other function is named by
import path ``pkg.module:function`` (``resolve_reward``).

``score`` runs every function so that none can crash or stall the caller: an exception, a
call running past ``timeout_s``, a wrong-length result, and per-row None / NaN / inf all become
missing values (NaN), counted in ``RewardResult.failures``.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grpo_dist.config import RewardSpec
from grpo_dist.imports import import_object
from grpo_dist.timeouts import call_with_timeout

log = logging.getLogger(__name__)

RewardFn = Callable[..., list]


def completion_text(completion: Any) -> str:
    """Plain text of a completion: the string itself, or the joined ``content`` of TRL messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return "".join(completion_text(m) for m in completion)
    raise TypeError(f"completion must be a string or a list of messages, got {type(completion).__name__}")


# ---------------------------------------------------------------- answer extraction

_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?<![\d.])\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TAGGED = [re.compile(r"<answer>(.*?)</answer>", re.S | re.I), re.compile(r"<SOLUTION>(.*?)</SOLUTION>", re.S | re.I)]
_PHRASES = re.compile(r"(?:answer\s*(?:is|:|=)|^\s*A\s*:)\s*(.*)", re.I | re.M)


def _numbers(text: str) -> list[str]:
    clean = _THOUSANDS.sub("", text.replace("\u2212", "-").replace("$", ""))
    return _NUMBER.findall(clean)


def _boxed_contents(text: str) -> list[str]:
    # Balanced braces, so \boxed{\frac{1}{2}} or \boxed{1{,}234} keep their inner braces.
    out, start = [], 0
    while (k := text.find("\\boxed{", start)) >= 0:
        depth, j = 1, k + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            break
        out.append(text[k + len("\\boxed{") : j - 1])
        start = j
    return out


def extract_final_number(text: str) -> float | None:
    """The final numeric answer of a solution text, or None.

    First match wins, in order: ``#### N`` (GSM8K), ``<answer>N</answer>``,
    ``<SOLUTION>N</SOLUTION>``, ``\\boxed{N}``, ``the answer is N`` / ``answer: N`` / a line
    starting ``A: N``, else the last number in the text. In each case the last such marker
    counts, and within it the first number (the last one for tags and boxes, whose content is
    the answer itself). ``$``, thousands separators (``1,234``) and a unicode minus are accepted.
    """
    if "####" in text:
        nums = _numbers(text.rsplit("####", 1)[1])
        if nums:
            return float(nums[0])
    candidates = [m for pat in _TAGGED for m in pat.findall(text)[-1:]] + _boxed_contents(text)[-1:]
    for inner in candidates:
        nums = _numbers(inner.replace("{,}", ","))
        if nums:
            return float(nums[-1])
    phrases = _PHRASES.findall(text)
    if phrases:
        nums = _numbers(phrases[-1])
        if nums:
            return float(nums[0])
    nums = _numbers(text)
    return float(nums[-1]) if nums else None


def _same_number(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def accuracy_reward(prompts: list, completions: list, answer: list, **_: Any) -> list[float | None]:
    """1.0 if the completion's final number equals the reference's, else 0.0; None if the
    reference has no number. The reference may be a bare number or a full GSM8K solution."""
    out: list[float | None] = []
    for completion, ref in zip(completions, answer, strict=True):
        want = extract_final_number(str(ref))
        got = extract_final_number(completion_text(completion))
        out.append(None if want is None else float(got is not None and _same_number(got, want)))
    return out


# ---------------------------------------------------------------- format

_FORMATS = [
    ("<think>", "</think>", "<answer>", "</answer>"),
    ("<start_working_out>", "<end_working_out>", "<SOLUTION>", "</SOLUTION>"),
]


def _format_score(text: str, tags: tuple[str, str, str, str]) -> float:
    once = [text.count(t) == 1 for t in tags]
    if all(once):
        o1, c1, o2, c2 = (text.index(t) for t in tags)
        exact = (
            text[:o1].strip() == ""
            and o1 < c1 < o2 < c2
            and text[o1 + len(tags[0]) : c1].strip() != ""
            and text[c1 + len(tags[1]) : o2].strip() == ""
            and text[o2 + len(tags[2]) : c2].strip() != ""
            and text[c2 + len(tags[3]) :].strip() == ""
        )
        if exact:
            return 1.0
    return 0.2 * sum(once)


def format_reward(prompts: list, completions: list, **_: Any) -> list[float]:
    """1.0 for exactly ``<think>W</think><answer>A</answer>`` or
    ``<start_working_out>W<end_working_out><SOLUTION>A</SOLUTION>`` (W, A non-empty; only
    whitespace outside and between the blocks). Otherwise partial credit: 0.2 per tag of the
    format that appears exactly once (at most 0.8), the better of the two formats."""
    return [max(_format_score(completion_text(c), tags) for tags in _FORMATS) for c in completions]


# ---------------------------------------------------------------- length


def length_reward(
    prompts: list,
    completions: list,
    completion_lengths: list[int] | None = None,
    completion_ids: list[list[int]] | None = None,
    *,
    max_completion_length: int,
    overlong_buffer: int,
    **_: Any,
) -> list[float]:
    """DAPO soft overlong punishment: 0 up to ``max_completion_length - overlong_buffer``, then
    linear down to -1 at ``max_completion_length`` (and -1 beyond). Lengths are token counts
    from the ``completion_lengths`` column, else from ``completion_ids`` (TRL passes it), else
    characters of the text (then give the limits in characters)."""
    if not 0 < overlong_buffer <= max_completion_length:
        raise ValueError(f"need 0 < overlong_buffer={overlong_buffer} <= max_completion_length={max_completion_length}")
    if completion_lengths is not None:
        lengths = list(completion_lengths)
    elif completion_ids is not None:
        lengths = [len(ids) for ids in completion_ids]
    else:
        lengths = [len(completion_text(c)) for c in completions]
    start = max_completion_length - overlong_buffer
    return [max(-1.0, min(0.0, (start - n) / overlong_buffer)) for n in lengths]


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "length": length_reward,
}


# ---------------------------------------------------------------- resolution


def resolve_reward(name: str) -> RewardFn:
    """A registry name, or ``pkg.module:function`` (the attribute may be dotted: ``mod:Class.fn``)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(
            f"unknown reward function {name!r}: not one of {sorted(REWARDS)} and not a 'module:function' path"
        )
    obj = import_object(name, "reward function")
    if not callable(obj):
        raise ValueError(f"reward function {name!r} is not callable ({type(obj).__name__})")
    return obj


@dataclass(frozen=True)
class BuiltReward:
    key: str  # name in components/failures; "name#k" for the k-th repeat of a name
    fn: RewardFn
    weight: float
    kwargs: dict[str, Any]


def _check_kwargs(spec: RewardSpec, fn: RewardFn) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # no introspectable signature: checked at call time
    try:
        sig.bind_partial(prompts=[], completions=[], **spec.kwargs)
    except TypeError as e:
        raise ValueError(f"reward function {spec.name!r}: bad kwargs {sorted(spec.kwargs)} ({e})") from None
    if fn is length_reward:
        try:
            length_reward([], [], completion_lengths=[], **spec.kwargs)
        except TypeError as e:
            raise ValueError(
                f"reward function 'length' needs kwargs max_completion_length and overlong_buffer ({e})"
            ) from None


def build_reward_fns(specs: list[RewardSpec]) -> list[BuiltReward]:
    """Resolve and check every spec once (at config time); raises ValueError naming the bad spec."""
    built, seen = [], {}
    for spec in specs:
        fn = resolve_reward(spec.name)
        _check_kwargs(spec, fn)
        seen[spec.name] = seen.get(spec.name, 0) + 1
        key = spec.name if seen[spec.name] == 1 else f"{spec.name}#{seen[spec.name]}"
        built.append(BuiltReward(key=key, fn=fn, weight=spec.weight, kwargs=dict(spec.kwargs)))
    return built


# ---------------------------------------------------------------- containment


@dataclass
class RewardResult:
    combined: list[float]  # sum_k w_k r_k over non-missing components; NaN if all are missing
    components: dict[str, list[float]]  # per function key, NaN where missing
    failures: dict[str, int]  # "key/exception", "key/timeout", "key/wrong_length": calls; "key/nan": rows


def finite_or_nan(v: Any) -> float:
    """``float(v)`` if that is a finite number, else NaN (a missing score)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def score(
    specs: list[RewardSpec] | list[BuiltReward],
    timeout_s: float,
    prompts: list,
    completions: list,
    columns: dict[str, list],
) -> RewardResult:
    """Score every completion with every function, contained (see the module docstring).

    Pass ``build_reward_fns(specs)`` (built once) on the hot path; raw ``RewardSpec``s are
    resolved on every call. Functions run one after the other, each bounded by ``timeout_s``.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    n = len(completions)
    for name, col in columns.items():
        if len(col) != n:
            raise ValueError(f"column {name!r} has {len(col)} rows, expected {n}")
    clash = {"prompts", "completions"} & set(columns)
    if clash:
        raise ValueError(f"columns must not be named {sorted(clash)}: they are passed separately")
    built = specs if all(isinstance(s, BuiltReward) for s in specs) else build_reward_fns(specs)
    components: dict[str, list[float]] = {}
    failures: dict[str, int] = {}
    for r in built:
        kwargs = {**columns, **r.kwargs, "prompts": prompts, "completions": completions}
        status, out = call_with_timeout(r.fn, kwargs, timeout_s, name=f"reward-{r.key}")
        values = [math.nan] * n
        if status == "ok":
            try:
                seq = None if isinstance(out, (str, bytes)) else list(out)
            except TypeError:
                seq = None
            if seq is None or len(seq) != n:
                status = "wrong_length"
                got = "no sequence" if seq is None else f"{len(seq)} values"
                log.warning("reward %s returned %s for %d completions", r.key, got, n)
            else:
                values = [finite_or_nan(v) for v in seq]
                bad = sum(math.isnan(v) for v in values)
                if bad:
                    failures[f"{r.key}/nan"] = bad
        elif status == "exception":
            log.warning("reward %s raised %r", r.key, out)
        else:
            log.warning("reward %s timed out after %.1f s (thread abandoned)", r.key, timeout_s)
        if status != "ok":
            failures[f"{r.key}/{status}"] = failures.get(f"{r.key}/{status}", 0) + 1
        components[r.key] = values
    combined = []
    for i in range(n):
        present = [(r.weight, components[r.key][i]) for r in built if not math.isnan(components[r.key][i])]
        combined.append(sum(w * v for w, v in present) if present else math.nan)
    return RewardResult(combined=combined, components=components, failures=failures)


def add_component(result: RewardResult, key: str, values: list[float], weight: float = 1.0) -> RewardResult:
    """``result`` with one more component (e.g. ``env``, the sum of a multi-turn episode's step
    rewards) added to the combined reward. Unlike a reward function's, a missing (NaN) value makes
    the row's combined reward missing: scoring it on the functions alone would put it on another
    scale than the rest of its group."""
    if key in result.components:
        raise ValueError(f"reward component {key!r} exists already")
    if len(values) != len(result.combined):
        raise ValueError(f"{len(values)} {key} rewards for {len(result.combined)} completions")
    values = [finite_or_nan(v) for v in values]
    combined = [
        math.nan if math.isnan(v) else (weight * v if math.isnan(c) else c + weight * v)
        for c, v in zip(result.combined, values)
    ]
    return RewardResult(combined, {**result.components, key: values}, dict(result.failures))
