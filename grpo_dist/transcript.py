"""Token-exact transcripts of multi-turn (agentic) episodes, and the chat-template logic they need.

Token in, token out (as verl's agent loop and slime do): an episode is one append-only token list.
After the prompt come model turns, the engine's own ids with its log-probs (loss weight 1), and
environment turns, the ids the chat template adds for the environment's messages (weight 0). Model
output is never decoded and re-encoded: a re-encoding can split the same text into other tokens,
and the learner would then score tokens the policy never sampled.

Environment turns are the text the template writes between the model's last content and the next
assistant turn's generation prompt, found with a sentinel (:func:`env_suffix_ids`). That is only
right for templates that render earlier turns verbatim, which :func:`check_append_only` tests once
before a run; templates that rewrite history (Qwen3's drops ``<think>`` from past assistant turns)
are refused there.

Assistant messages are rendered from their ``content`` only: the model's text *is* its whole turn,
so structured ``tool_calls`` parsed from it must not be rendered a second time.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, Any]

# Stands in for the model's content: plain ASCII letters, so no template escapes, trims or splits it.
SENTINEL = "GRPODISTSENTINELf3a9c1"

# What check_append_only renders when not given a conversation: every role an environment sends,
# and reasoning in every assistant turn (templates that drop past reasoning must show it).
CHECK_CONVERSATION: tuple[Message, ...] = (
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "<think>2 plus 3</think>Let me check: 5?"},
    {"role": "user", "content": "Are you sure?"},
    {"role": "assistant", "content": "<think>call the calculator</think>calc(2 + 3)"},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "<think>it said 5</think>The answer is 5."},
)

_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "grpo_dist_probe_tool",
        "description": "Probe: does the chat template render tools?",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]},
    },
}


# ---------------------------------------------------------------- the transcript


class Transcript:
    """One episode's tokens: ``prompt_ids``, then model and environment turns, strictly alternating
    and starting with a model turn (the prompt ends in the generation prompt).

    Aligned per completion token: ``completion_ids``, ``loss_mask`` (1 model, 0 env/template) and
    ``logprobs`` (the engine's log-prob for model tokens, 0.0 for others). ``turns`` holds one
    ``(start, length)`` per model turn, indices into ``completion_ids``. ``messages`` is the chat
    conversation (prompt messages, then each turn's messages) for reward functions and for rendering
    the next environment suffix.

    A model turn has at least one token: vLLM always samples one, so an empty turn is a loop bug
    (a request with no token budget left), not an episode. An environment turn may add no tokens
    (a template that renders a message as nothing) but must follow a model turn.
    """

    def __init__(self, prompt_ids: Sequence[int], messages: Sequence[Message] = ()) -> None:
        self.prompt_ids = _token_ids(prompt_ids, "prompt_ids")
        if not self.prompt_ids:
            raise ValueError("prompt_ids is empty: an episode starts from a rendered prompt")
        self.completion_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.turns: list[tuple[int, int]] = []
        self.messages: list[Message] = list(messages)
        self._last = "env"  # the prompt plays the part of an env turn: it ends in the generation prompt

    def append_model(self, ids: Sequence[int], logprobs: Sequence[float], text: str) -> None:
        """The engine's ``ids`` for one model turn (its stop token included when it stopped), one
        finite log-prob each, and the engine's detokenized ``text`` (recorded as the assistant message)."""
        if self._last == "model":
            raise ValueError("two model turns in a row: append the environment's turn in between")
        ids = _token_ids(ids, "model ids")
        if not ids:
            raise ValueError("empty model turn: the engine samples at least one token per request")
        if len(logprobs) != len(ids):
            raise ValueError(f"model turn has {len(ids)} ids but {len(logprobs)} log-probs")
        lps = [float(x) for x in logprobs]
        bad = [x for x in lps if not (math.isfinite(x) and x <= 0.0)]
        if bad:
            raise ValueError(f"model log-probs must be finite and <= 0 (one per token), got {bad[0]}")
        if not isinstance(text, str):
            raise ValueError(f"model text must be a str, got {type(text).__name__}")
        self.turns.append((len(self.completion_ids), len(ids)))
        self._extend(ids, 1, lps)
        self.messages.append({"role": "assistant", "content": text})
        self._last = "model"

    def append_env(self, ids: Sequence[int], messages: Sequence[Message] = ()) -> None:
        """Template/environment ``ids`` (from :func:`env_suffix_ids`; no log-probs, never trained
        on) and the environment ``messages`` they render."""
        if self._last != "model":
            raise ValueError("an environment turn must follow a model turn: merge its messages into one turn")
        ids = _token_ids(ids, "env ids")
        if isinstance(messages, dict) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("env messages must be a sequence of message dicts")
        self._extend(ids, 0, [0.0] * len(ids))
        self.messages.extend(messages)
        self._last = "env"

    def _extend(self, ids: list[int], weight: int, logprobs: list[float]) -> None:
        self.completion_ids += ids
        self.loss_mask += [weight] * len(ids)
        self.logprobs += logprobs
        n = len(self.completion_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:  # cannot happen through the API
            raise ValueError(f"transcript misaligned: {n} ids, {len(self.loss_mask)} mask, {len(self.logprobs)} lps")

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def num_turns(self) -> int:
        """Model turns."""
        return len(self.turns)

    @property
    def model_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def env_tokens(self) -> int:
        return len(self.loss_mask) - self.model_tokens


def _token_ids(ids: Sequence[int], what: str) -> list[int]:
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{what} must be a sequence of token ids, not {type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0:
            raise ValueError(f"{what} must be non-negative ints, got {i!r}")
        out.append(int(i))
    return out


# ---------------------------------------------------------------- chat-template rendering


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool,
    tools: list[dict] | None = None,
    chat_template: str | None = None,
) -> str:
    """The chat template's text for ``messages`` (``chat_template`` overrides the tokenizer's)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; multi-turn episodes need one (pass chat_template=)")
    return tokenizer.apply_chat_template(
        list(messages),
        tools=tools,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # A chat template writes its own special tokens (BOS); adding them again would double them.
    # Same rule as grpo_dist.data for templated prompts.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids_with(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    tools: list[dict] | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """Ids of the prompt ``messages`` (system, user, an environment's reset messages) up to and
    including the first assistant turn's generation prompt, tokenized as grpo_dist.data does."""
    if not messages:
        raise ValueError("no prompt messages")
    ids = encode(
        tokenizer, render(tokenizer, messages, add_generation_prompt=True, tools=tools, chat_template=chat_template)
    )
    if not ids:
        raise ValueError("the chat template rendered the prompt messages as no tokens")
    return ids


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    # added_tokens_decoder lists role markers too (all_special_tokens omits them in transformers 5).
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def _after_sentinel(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    new_messages: Sequence[Message],
    tools: list[dict] | None,
    chat_template: str | None,
) -> str:
    """Template text after the model's content (messages[-1]) up to the next generation prompt."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("messages must end with the model's assistant message")
    if not new_messages:
        raise ValueError("new_messages is empty: an environment turn adds at least one message")
    convo = [*messages[:-1], {"role": "assistant", "content": SENTINEL}, *new_messages]
    text = render(tokenizer, convo, add_generation_prompt=True, tools=tools, chat_template=chat_template)
    if text.count(SENTINEL) != 1:
        raise ValueError(f"the chat template rendered the assistant content {text.count(SENTINEL)} times, not once")
    return text.split(SENTINEL, 1)[1]


def _marker_at_start(tokenizer: PreTrainedTokenizerBase, text: str) -> str | None:
    """The longest special token ``text`` starts with: the end-of-turn marker after content."""
    found = [t for t in _special_tokens(tokenizer) if t and text.startswith(t)]
    return max(found, key=len) if found else None


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase, *, chat_template: str | None = None) -> str:
    """The special token the chat template writes right after an assistant message's content.

    A model turn that ended (not truncated) must end with exactly this token: make it the engine's
    stop token (it is the eos for ChatML, Llama 3 and the tiny model, but ``<end_of_turn>`` for Gemma).
    """
    after = _after_sentinel(
        tokenizer,
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "u"}],
        None,
        chat_template,
    )
    marker = _marker_at_start(tokenizer, after)
    if marker is None:
        raise ValueError(f"the chat template writes no special token right after assistant content ({after[:30]!r})")
    return marker


def _suffix_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    new_messages: Sequence[Message],
    model_turn_ended: bool,
    tools: list[dict] | None,
    chat_template: str | None,
) -> str:
    after = _after_sentinel(tokenizer, messages, new_messages, tools, chat_template)
    if not model_turn_ended:
        return after  # truncated: the template's end-of-turn marker is template text, weight 0
    marker = _marker_at_start(tokenizer, after)
    if marker is None:
        raise ValueError(
            f"the chat template writes no special token right after assistant content ({after[:30]!r}), "
            "so a model turn that ended on its stop token cannot be joined to the next message"
        )
    return after[len(marker) :]  # the model's stop token already is that marker


def env_suffix_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    new_messages: Sequence[Message],
    *,
    model_turn_ended: bool,
    tools: list[dict] | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """Ids the chat template adds after the model's last turn (``messages[-1]``, the assistant
    message) for the environment's ``new_messages``, through the next assistant generation prompt.

    Renders ``messages[:-1] + [assistant: SENTINEL] + new_messages`` with the generation prompt and
    keeps the text after the sentinel. With ``model_turn_ended`` (the model's ids end with its stop
    token, which is trained on) the end-of-turn marker that text starts with is dropped: it is the
    longest special token of the tokenizer at that position (see :func:`end_of_turn_token`); a
    truncated turn keeps it as template tokens.
    """
    return encode(tokenizer, _suffix_text(tokenizer, messages, new_messages, model_turn_ended, tools, chat_template))


# ---------------------------------------------------------------- template checks


def check_append_only(
    tokenizer: PreTrainedTokenizerBase,
    *,
    tools: list[dict] | None = None,
    chat_template: str | None = None,
    conversation: Sequence[Message] = CHECK_CONVERSATION,
) -> str | None:
    """None if a transcript built turn by turn (prompt, model content + end-of-turn token,
    :func:`env_suffix_ids`, ...) equals the chat template's render of the conversation so far at
    every model turn, in text and in token ids, and is a prefix of the full render; else a one-line
    refusal naming the turn that broke it.
    """
    roles = [m.get("role") for m in conversation]
    if "assistant" not in roles or roles[0] == "assistant" or roles[-1] != "assistant":
        raise ValueError("the check conversation must start with a non-assistant message and end with an assistant one")
    if any(a == b == "assistant" for a, b in itertools.pairwise(roles)):
        raise ValueError("the check conversation has two assistant messages in a row")
    try:
        return _check_append_only(tokenizer, list(conversation), tools, chat_template)
    except TemplateError as e:
        return f"the chat template cannot render the check conversation ({e}); pass one it can (conversation=)"


def _check_append_only(
    tokenizer: PreTrainedTokenizerBase, conv: list[Message], tools: list[dict] | None, chat_template: str | None
) -> str | None:
    kw = dict(tools=tools, chat_template=chat_template)
    marker = end_of_turn_token(tokenizer, chat_template=chat_template)
    marker_ids = encode(tokenizer, marker)
    asst = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    text = render(tokenizer, conv[: asst[0]], add_generation_prompt=True, **kw)
    ids = encode(tokenizer, text)
    for turn, (i, nxt) in enumerate(zip(asst, [*asst[1:], len(conv)]), 1):
        content = conv[i]["content"]
        text, ids = text + content + marker, ids + encode(tokenizer, content) + marker_ids
        if nxt == len(conv):
            break
        suffix = _suffix_text(tokenizer, conv[: i + 1], conv[i + 1 : nxt], True, tools, chat_template)
        text, ids = text + suffix, ids + encode(tokenizer, suffix)
        expected = render(tokenizer, conv[:nxt], add_generation_prompt=True, **kw)
        if text != expected:
            return _refusal(turn + 1, "the render of the conversation so far", text, expected)
        if ids != encode(tokenizer, expected):
            return (
                f"model turn {turn + 1}: the turn-by-turn ids differ from the ids of the render so far (the tokenizer "
                "merges text across a turn boundary); use a chat template whose turns end in special tokens"
            )
    full = render(tokenizer, conv, add_generation_prompt=False, **kw)
    if not full.startswith(text):
        return _refusal(len(asst), "the full render", text, full[: len(text)])
    if encode(tokenizer, full)[: len(ids)] != ids:
        return "the last model turn: the turn-by-turn ids are not a prefix of the full render's ids"
    return None


def _refusal(turn: int, what: str, built: str, expected: str) -> str:
    at = next((k for k, (a, b) in enumerate(zip(built, expected)) if a != b), min(len(built), len(expected)))
    return (
        f"model turn {turn}: {what} differs from the turn-by-turn transcript at {expected[at : at + 30]!r} "
        f"(transcript: {built[at : at + 30]!r}); the chat template rewrites earlier turns (e.g. drops <think> "
        "from past assistant messages): use a chat template that keeps earlier turns verbatim (the tokenizer's chat_template.jinja or tokenizer_config.json)"
    )


def template_takes_tools(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> bool:
    """Whether the chat template renders a ``tools`` list (a probe tool's name appears in the prompt)."""
    name = _PROBE_TOOL["function"]["name"]
    try:
        text = render(
            tokenizer,
            [{"role": "user", "content": "hi"}],
            add_generation_prompt=True,
            tools=[_PROBE_TOOL],
            chat_template=chat_template,
        )
    except TemplateError:
        return False  # a template that raises on tools does not take them
    return name in text
