"""The multi-turn turn loop on one vLLM engine: G episodes per prompt row, token in, token out.

Turn 1 is one engine call with ``n = G`` per prompt, as a single-turn rollout; every later turn
continues each live episode from its own token list (``TokensPrompt``: prefix caching reuses its
KV blocks), all live episodes of the batch in one call. Every turn stops at the chat template's
end-of-turn token. Between turns every live episode's environment answers its model turn, each on
its own thread and all at once, each bounded by ``tool_timeout_s`` (a tool environment bounds each
tool call itself) and by what is left of ``episode_timeout_s``. The whole loop runs on the worker's
engine thread, so no weight update can land between two turns of an episode: a batch is generated
by one weight version.

An episode ends when its environment says ``done``, after ``max_turns`` model turns, when the
model's budget (``algorithm.max_completion_length`` tokens over all turns) is spent, when the next
turn would not fit the context, when its environment time runs out (a step cut short leaves the
episode's environment reward missing), or when its environment raises or answers malformed
(``env_error``, reward missing too). Every environment built is closed at the end, also when the
batch fails, all at once and each bounded like a step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from grpo_dist.config import MultiTurnConfig
from grpo_dist.envs import EnvError, Step, as_messages, as_step
from grpo_dist.errors import first_line
from grpo_dist.timeouts import TimedCall
from grpo_dist.transcript import Transcript, encode, end_of_turn_token, env_suffix_ids, prompt_ids_with

log = logging.getLogger(__name__)

# The counters of a tool environment's Step.info (rollout/tool_*); other keys an environment reports
# become rollout/env/<key>. All are summed over the batch's episodes.
TOOL_COUNTERS = ("tool_calls", "tool_errors", "tool_seconds")

# engine(prompts, params) -> one record per sampled completion ({"group": request index, "ids",
# "logp", "text", "truncated"}), params[i]["n"] consecutive records per request.
Engine = Callable[[list[list[int]], list[dict[str, Any]]], list[dict[str, Any]]]


@dataclass
class Episode:
    group: int
    seed: int  # of its first turn's request; later turns derive theirs from it
    env: Any
    transcript: Transcript
    reward: float = 0.0
    env_seconds: float = 0.0
    stop: str | None = None
    truncated: bool = False  # the last model turn was cut at its token limit
    info: dict[str, float] = field(default_factory=dict)
    env_messages_cut: int = 0  # environment turns (or the reset) whose messages were cut to fit


class EpisodeRunner:
    """Runs a batch of episodes on an ``Engine``; pure apart from the engine and the environments."""

    def __init__(
        self,
        cfg: MultiTurnConfig,
        tokenizer: Any,
        make_env: Callable[[dict], Any],
        *,
        max_model_tokens: int,
        max_model_len: int,
        tools: list[dict] | None = None,
    ) -> None:
        self.cfg, self.tok, self.make_env = cfg, tokenizer, make_env
        self.max_model_tokens, self.max_model_len = max_model_tokens, max_model_len
        # Passed to the chat template only when the tools reach the model through it.
        self.tools = tools if cfg.tools and cfg.tools_prompt == "template" else None
        self.end_of_turn = encode(tokenizer, end_of_turn_token(tokenizer))
        # A tool environment bounds each tool call itself (a turn may hold several calls).
        self.step_timeout_s = math.inf if cfg.tools else cfg.tool_timeout_s

    # ------------------------------------------------------------ one batch

    def run(self, rows: list[dict], n: int, sampling: dict[str, Any], seeds: list[int], engine: Engine):
        """``n`` episodes per row (rows of prompt p are p*n .. p*n+n-1); returns their records."""
        envs: list[Any] = []  # every environment built, closed at the end whatever happens
        sampling = {**sampling, "stop_token_ids": self.end_of_turn}
        try:
            episodes = self._start(rows, n, seeds, envs)
            prompts = [e.transcript.prompt_ids for e in episodes[::n]]
            first = [dict(sampling, n=n, max_tokens=self._first_budget(p), seed=s) for p, s in zip(prompts, seeds)]
            live = self._after_model_turn(episodes, engine(prompts, first))
            turn = 1
            while live:
                turn += 1
                params = [
                    dict(sampling, n=1, max_tokens=self._turn_budget(e), seed=_turn_seed(e.seed, turn)) for e in live
                ]
                live = self._after_model_turn(live, engine([e.transcript.ids for e in live], params))
            return [self._record(e) for e in episodes]
        finally:
            self._close(envs)

    def _start(self, rows: list[dict], n: int, seeds: list[int], envs: list[Any]) -> list[Episode]:
        """One environment per episode, reset; each row's prompt with its reset() messages."""
        episodes = []
        for p, row in enumerate(rows):
            group = []
            for _ in range(n):
                group.append(self._call(self.make_env, (row,), "environment factory"))
                envs.append(group[-1])
            resets = [
                as_messages(self._call(env.reset, (), f"{type(env).__name__}.reset()"), env, "reset()") for env in group
            ]
            if any(m != resets[0] for m in resets):
                raise EnvError(
                    f"reset() returned different messages for the {n} rollouts of prompt {p}: GRPO compares the "
                    "rollouts of one prompt, so reset() must depend only on the row"
                )
            messages, ids, cut = self._prompt(row, resets[0])
            for k, env in enumerate(group):
                e = Episode(group=p, seed=seeds[p] + k, env=env, transcript=Transcript(ids, messages))
                e.env_messages_cut = cut
                episodes.append(e)
        return episodes

    def _call(self, fn: Callable, args: tuple, what: str) -> Any:
        """A factory or reset() call, bounded by tool_timeout_s; a failure fails the batch (preflight
        ran both on a real row, so this is the environment's bug, not one episode's bad luck)."""
        status, out = TimedCall(fn, args, name="env-setup").wait(self.cfg.tool_timeout_s)
        if status != "ok":
            why = f"timed out after {self.cfg.tool_timeout_s:g} s" if status == "timeout" else first_line(out)
            raise EnvError(f"rollout.multi_turn: {what} failed: {why}")
        return out

    def _prompt(self, row: dict, reset: list[dict]) -> tuple[list[dict], list[int], int]:
        """(messages, ids, 1 if the reset messages were cut) of a row's prompt with ``reset`` after it:
        the reset adds at most max_env_tokens_per_turn tokens, like an environment turn."""
        messages = list(row.get("messages") or [])
        if not reset:
            return messages, list(row["prompt_ids"]), 0
        if not messages:
            raise EnvError("reset() returned messages but the prompt rows carry no chat messages")
        base = len(row["prompt_ids"])
        fitted, cut = self._fit(
            reset, lambda ms: len(prompt_ids_with(self.tok, messages + ms, tools=self.tools)) - base
        )
        if fitted is None:
            raise EnvError(
                f"the chat template's tokens for reset() messages alone exceed "
                f"rollout.multi_turn.max_env_tokens_per_turn={self.cfg.max_env_tokens_per_turn}"
            )
        return messages + fitted, prompt_ids_with(self.tok, messages + fitted, tools=self.tools), int(cut)

    # ------------------------------------------------------------ between turns

    def _after_model_turn(self, live: list[Episode], records: list[dict]) -> list[Episode]:
        """Append each episode's model turn, let its environment answer, and return those that go on."""
        if len(records) != len(live):
            raise RuntimeError(f"the engine returned {len(records)} completions for {len(live)} episodes")
        for e, r in zip(live, records):
            e.transcript.append_model(r["ids"], r["logp"], r["text"])
            e.truncated = r["truncated"]
        # All steps run at once; each waits until its own deadline, so the bounds overlap.
        calls = []
        for e in live:
            bound = min(self.step_timeout_s, self.cfg.episode_timeout_s - e.env_seconds)
            call = TimedCall(e.env.step, (e.transcript.messages[-1]["content"],), name="env-step")
            calls.append((call, call.started + bound))
        going = []
        for e, (call, deadline) in zip(live, calls):
            status, out = call.wait_until(deadline)
            e.env_seconds += call.seconds
            step = self._step_of(e, status, out)
            if step is not None and self._continues(e, step):
                going.append(e)
        return going

    def _step_of(self, e: Episode, status: str, out: Any) -> Step | None:
        """The environment's answer, or None with the episode stopped (its reward missing)."""
        if status == "ok":
            try:
                step = as_step(out, e.env)
            except EnvError as exc:
                status, out = "exception", exc
        if status != "ok":
            # A step cut short or failed gives no verdict on the turn: the episode's reward is missing.
            e.stop, e.reward = ("timeout" if status == "timeout" else "env_error"), math.nan
            if status == "exception":
                log.warning("episode of prompt %d: environment failed: %s", e.group, first_line(out))
            return None
        e.reward += step.reward
        for k, v in step.info.items():
            e.info[k] = e.info.get(k, 0.0) + float(v)
        return step

    def _continues(self, e: Episode, step: Step) -> bool:
        """Whether ``e`` gets another model turn; if so its environment turn is appended."""
        t = e.transcript
        if step.done:
            e.stop = "done"
        elif t.num_turns >= self.cfg.max_turns:
            e.stop = "max_turns"
        elif t.model_tokens >= self.max_model_tokens:
            e.stop = "max_model_tokens"
        elif e.env_seconds >= self.cfg.episode_timeout_s:
            e.stop = "timeout"  # the step finished in time: its reward counts
        elif not step.messages:
            e.stop, e.reward = "env_error", math.nan  # not done, yet nothing to answer
        if e.stop is not None:
            return False
        # The model's stop token is the template's end-of-turn marker (it stops every turn); a turn
        # cut at its token limit has none, and the template's marker is then environment text.
        ended = t.completion_ids[-len(self.end_of_turn) :] == self.end_of_turn

        def suffix(ms: list[dict]) -> list[int]:
            return env_suffix_ids(self.tok, t.messages, ms, model_turn_ended=ended, tools=self.tools)

        try:
            messages, cut = self._fit(step.messages, lambda ms: len(suffix(ms)))
            ids = suffix(messages) if messages is not None else None
        except (TemplateError, ValueError) as exc:  # e.g. a role the chat template does not know
            log.warning("episode of prompt %d: cannot render the environment's turn: %s", e.group, first_line(exc))
            e.stop, e.reward = "env_error", math.nan
            return False
        if ids is None:
            e.stop = "context"  # preflight checks an empty turn fits; a template that disagrees ends here
            return False
        if len(t.ids) + len(ids) >= self.max_model_len:  # no room left for one model token
            e.stop = "context"
            return False
        e.env_messages_cut += cut
        t.append_env(ids, messages)
        return True

    def _fit(self, messages: list[dict], size: Callable[[list[dict]], int]) -> tuple[list[dict] | None, bool]:
        """(``messages`` with each content cut to the largest token count for which ``size`` is at most
        max_env_tokens_per_turn, whether anything was cut); (None, True) if even empty contents do not fit."""
        budget = self.cfg.max_env_tokens_per_turn
        if size(messages) <= budget:
            return messages, False

        def capped(cap: int) -> list[dict]:
            return [_cut(self.tok, m, cap) for m in messages]

        if size(capped(0)) > budget:
            return None, True
        lo, hi = 0, max(len(encode(self.tok, str(m.get("content", "")))) for m in messages)
        while lo < hi:  # more content never gives fewer tokens
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size(capped(mid)) <= budget else (lo, mid - 1)
        return capped(lo), True

    # ------------------------------------------------------------ budgets, records, closing

    def _first_budget(self, prompt: list[int]) -> int:
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise EnvError(
                f"a prompt with its reset() messages has {len(prompt)} tokens, no room left in "
                f"rollout.max_model_len={self.max_model_len}"
            )
        return min(self.cfg.max_tokens_per_turn, self.max_model_tokens, room)

    def _turn_budget(self, e: Episode) -> int:
        t = e.transcript
        return min(
            self.cfg.max_tokens_per_turn, self.max_model_tokens - t.model_tokens, self.max_model_len - len(t.ids)
        )

    def _record(self, e: Episode) -> dict[str, Any]:
        t = e.transcript
        return {
            "group": e.group,
            "prompt_ids": t.prompt_ids,
            "ids": t.completion_ids,
            "logp": t.logprobs,
            "loss_mask": t.loss_mask,
            "truncated": e.truncated,
            # What reward functions score as the completion: the model's own turns (its text and
            # tokens); the whole conversation goes to them as `messages`.
            # (Prompts and environments never hold assistant messages: as_messages refuses them.)
            "text": "\n".join(m["content"] for m in t.messages if m["role"] == "assistant"),
            "model_ids": [i for i, m in zip(t.completion_ids, t.loss_mask) if m],
            "messages": t.messages,
            "turns": t.num_turns,
            "stop": e.stop,
            "env_reward": e.reward,
            "env_messages_cut": e.env_messages_cut,
            "info": e.info,
        }

    def _close(self, envs: list[Any]) -> None:
        """close() every environment that has one, all at once, each bounded like a step."""
        calls = [(env, TimedCall(env.close, name="env-close")) for env in envs if callable(getattr(env, "close", None))]
        deadline = time.perf_counter() + self.cfg.tool_timeout_s
        for env, call in calls:
            status, out = call.wait_until(deadline)
            if status != "ok":  # a failing close must not lose the batch
                why = "timed out" if status == "timeout" else first_line(out)
                log.warning("closing %s failed: %s", type(env).__name__, why)


def _turn_seed(first_seed: int, turn: int) -> int:
    # Request seeds of one call are spaced by n >= 1 (rollout_server.seeds); turn t of an episode
    # adds t * 2**40, beyond any call's seeds (calls are 2**20 apart), and stays below 2**63.
    return (first_seed + turn * (1 << 40)) % (1 << 63)


def _cut(tokenizer: Any, message: dict, cap: int) -> dict:
    ids = encode(tokenizer, str(message.get("content", "")))
    return message if len(ids) <= cap else {**message, "content": tokenizer.decode(ids[:cap])}
