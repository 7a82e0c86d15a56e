"""Log-probs of a micro-batch's completion tokens under a causal LM (torch and transformers only).

Two layouts of the same computation, over the tensors of ``RolloutBatch.to_tensors``:

- ``row_logprobs``: every row is its prompt + completion, right-padded, in one forward.
- ``shared_prompt_logprobs``: the micro-batch's unique prompts run once, filling a key/value
  cache; each row's completion then runs on top of its own prompt's keys and values. The G rows
  of a GRPO group share one prompt, so its tokens are forwarded, and back-propagated, once per
  group instead of G times. Positions, keys, values and attention are those of the row layout,
  so the log-probs and gradients are the same up to float rounding (tested against it).

Both stop at the decoder's final hidden state and project only completion tokens through the
LM head (``grpo_dist.losses``): no ``[B, L, V]`` logits exist. Shape suffixes: the legend in
``grpo_dist/losses.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from grpo_dist.losses import completion_logprobs, shared_prompt_logprobs_from_hidden


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DeepSpeed engine (or the model itself)."""
    return getattr(module, "module", module)


def final_hidden(module: torch.nn.Module, **inputs) -> torch.Tensor:
    """The decoder's last hidden state (after its final norm), the input of the LM head.

    Captured by a hook on the decoder so the full forward (and DeepSpeed's ZeRO-3 hooks) runs
    unchanged, with ``logits_to_keep=1``: no ``[B, L, V]`` logits are made."""
    captured: list[torch.Tensor] = []

    def grab(_mod, _inputs, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = unwrap(module).get_decoder().register_forward_hook(grab)
    try:
        module(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def row_logprobs(
    module: torch.nn.Module,
    t: dict[str, torch.Tensor],
    rows: slice,
    temperature: float,
    *,
    lm_head: Callable | None,
    chunk_tokens: int | None,
    entropy: bool | Literal["grad"] = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp_BT, ent_BT)`` of ``rows``, each row forwarded whole. The forward is cut to the
    micro-batch's longest row (rows are right-padded, so later columns are all padding)."""
    attn_BL = t["attention_mask_BL"][rows]
    L = int(attn_BL.sum(1).max())
    ids_BL = t["input_ids_BL"][rows, :L]
    hidden_BLH = final_hidden(module, input_ids=ids_BL, attention_mask=attn_BL[:, :L])
    return completion_logprobs(
        hidden_BLH,
        ids_BL,
        t["prompt_len_B"][rows],
        t["loss_mask_BT"][rows],
        temperature,
        lm_head=lm_head,
        chunk_tokens=chunk_tokens,
        entropy=entropy,
    )


def prompt_layout(group_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first_row_U, prompt_of_B)``: the first row of each unique prompt (rows with equal group
    ids share their prompt) in order of first appearance, and each row's index into them."""
    B = group_B.shape[0]
    _, inverse = torch.unique(group_B, return_inverse=True)
    first_by_id = torch.full((int(inverse.max()) + 1 if B else 0,), B, dtype=torch.long, device=group_B.device)
    first_by_id = first_by_id.scatter_reduce(0, inverse, torch.arange(B, device=group_B.device), reduce="amin")
    order = torch.argsort(first_by_id)  # unique prompts in order of their first row
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return first_by_id[order], rank[inverse]


def shared_prompt_logprobs(
    module: torch.nn.Module,
    t: dict[str, torch.Tensor],
    rows: slice,
    temperature: float,
    *,
    lm_head: Callable | None,
    chunk_tokens: int | None,
    entropy: bool | Literal["grad"] = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``row_logprobs`` with each unique prompt of ``rows`` forwarded once (module docstring).

    Two forwards: the ``U`` unique prompts, right-padded to the longest, into a fresh key/value
    cache; then the cache rows picked for each row (a differentiable gather, so each prompt's
    gradient is the sum over its rows) and the ``B`` completions, right-padded, at positions
    ``P + j`` with an attention mask over ``[prompt padding | completion padding]``."""
    from transformers import DynamicCache

    plen_B = t["prompt_len_B"][rows]
    ids_BL = t["input_ids_BL"][rows]
    first_U, prompt_of_B = prompt_layout(t["group_B"][rows])
    P_U = plen_B[first_U]
    if not torch.equal(P_U[prompt_of_B], plen_B):
        raise ValueError("rows with the same group id have prompts of different lengths; a group shares one prompt")
    P = int(P_U.max())
    device = ids_BL.device
    prompt_mask_UP = (torch.arange(P, device=device) < P_U.unsqueeze(1)).long()
    # Group ids are the batch's promise that rows share a prompt; a broken one would train rows on another prompt.
    mine_BP = ids_BL[:, :P] == ids_BL[first_U, :P][prompt_of_B]
    if not bool((mine_BP | (prompt_mask_UP[prompt_of_B] == 0)).all()):
        raise ValueError("rows with the same group id have different prompts; a group shares one prompt")
    cache = DynamicCache(config=unwrap(module).config)
    prompt_hidden_UPH = final_hidden(
        module, input_ids=ids_BL[first_U, :P], attention_mask=prompt_mask_UP, past_key_values=cache, use_cache=True
    )
    # Attention covers every completion token (the loss mask may leave some out of the loss, not out of view).
    completion_len_B = t["attention_mask_BL"][rows].sum(1) - plen_B
    C = max(int(completion_len_B.max()), 1)
    completion_mask_BC = (torch.arange(C, device=device) < completion_len_B.unsqueeze(1)).long()
    cache.batch_select_indices(prompt_of_B)
    completion_hidden_BCH = final_hidden(
        module,
        input_ids=t["completion_ids_BT"][rows, :C],
        attention_mask=torch.cat([prompt_mask_UP[prompt_of_B], completion_mask_BC], dim=1),
        # A padded column repeats its row's last position: no position beyond the row layout's is made
        # (learned position tables, RoPE variants that rescale with the longest position).
        position_ids=plen_B.unsqueeze(1)
        + torch.minimum(torch.arange(C, device=device), (completion_len_B - 1).clamp(min=0).unsqueeze(1)),
        past_key_values=cache,
        use_cache=True,
    )
    return shared_prompt_logprobs_from_hidden(
        prompt_hidden_UPH,
        completion_hidden_BCH,
        prompt_of_B,
        plen_B,
        t["completion_ids_BT"][rows],
        t["loss_mask_BT"][rows],
        temperature,
        lm_head=lm_head,
        chunk_tokens=chunk_tokens,
        entropy=entropy,
    )


def _text_config(hf_config):
    # Composite models (vision-language, e.g. Gemma 3) keep their decoder's layout in a sub-config.
    return hf_config.get_text_config(decoder=True) if hasattr(hf_config, "get_text_config") else hf_config


def attention_window(hf_config) -> int | None:
    """The sliding window (tokens) some attention layer of a model with ``hf_config`` uses, or None."""
    hf_config = _text_config(hf_config)
    kinds = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    if getattr(hf_config, "use_sliding_window", True) is False and "sliding_attention" not in kinds:
        return None
    return getattr(hf_config, "sliding_window", None)


def shared_prompt_problem(hf_config, max_len: int | None) -> str | None:
    """Why the shared-prompt forward would not give the row layout's log-probs for a model with
    ``hf_config`` on rows of up to ``max_len`` tokens, or None. With ``max_len=None`` only what fails
    at any length is named (the caller checks each batch's length later).
    It needs every layer to attend to every earlier position: layers that are not attention (a
    recurrent state would run through a shorter prompt's padding) and a sliding window shorter than
    a row (its mask would be shifted by that padding, and the cache trimmed) are refused, and so is
    a RoPE that rescales with the forward's longest position once rows pass its original length
    (the prompt forward and the completion forward would rotate by different frequencies)."""
    hf_config = _text_config(hf_config)
    kinds = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    other = sorted(kinds - {"full_attention", "sliding_attention"})
    if other:
        return f"it has {', '.join(other)} layers"
    window = attention_window(hf_config)
    if max_len is not None and window is not None and window < max_len:
        return f"it attends over a sliding window of {window} tokens, shorter than its rows of up to {max_len}"
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    for params in [v for v in rope.values() if isinstance(v, dict)] or [rope]:
        kind = params.get("rope_type", params.get("type"))
        original = (
            params.get("original_max_position_embeddings")
            or getattr(hf_config, "original_max_position_embeddings", None)
            or getattr(hf_config, "max_position_embeddings", None)
        )
        if kind in ("dynamic", "longrope") and max_len is not None and original and max_len > original:
            return (
                f"its {kind} RoPE changes frequencies with the forward's length beyond {original} tokens, "
                f"and its rows reach {max_len}"
            )
    return None


def shared_prompt_refusal(hf_config, max_len: int | None, model_path: str) -> str | None:
    """The one-line refusal of ``learner.shared_prompt_forward`` for this model, or None
    (``shared_prompt_problem``): the same words before launch, at learner start and per batch."""
    why = shared_prompt_problem(hf_config, max_len)
    if why is None:
        return None
    return (
        f"model.path={model_path!r}: learner.shared_prompt_forward (on by default) needs every layer to attend to "
        f"every earlier token, but {why}; set learner.shared_prompt_forward=false"
    )
