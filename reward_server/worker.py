"""RewardWorker: one Ray actor serving one reward model (``reward-<name>-<i>``).

Request threads (the actor's ``max_concurrency``) put rows into a ``ScoreQueue`` and wait on
them; one model thread takes at most ``max_concurrency`` rows at a time from every waiting request
and scores them in one call, so rows from many rollout workers share batches and the number of
rows inside the model is bounded. A model call that raises fails the rows it held (the caller
retries them); the actor itself stays up. Nothing here is trained or synced: a restarted actor
loads the same checkpoint, so it cannot serve stale state.

- ``classifier``: ``AutoModelForSequenceClassification`` in transformers; the score is the single
  logit. Rows of equal length are run together and none is padded, so a row's score does not depend
  on what else was in its batch.
- ``judge``: the rollout stack's vLLM engine (same dtype rule, CPU or GPU); the rendered template is
  the user turn of the judge's chat template and the score is ``choice_score`` of the two answer
  tokens' log-probs at the first generated position (``logprob_token_ids``, raw log-softmax).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import ray
import torch

from grpo_dist.config import RewardModelSpec, resolve_dtype
from grpo_dist.reward_models import ScoreQueue, choice_score, percentile, render

log = logging.getLogger(__name__)

# How long the model thread waits for rows before it looks at its stop flag again.
_IDLE_WAIT_S = 0.5
# Consecutive failed batches after which the model counts as broken and the actor restarts.
_BROKEN_AFTER = 3
# Seconds between a broken model and the actor's exit (its callers get their answers first).
_RESTART_DELAY_S = 2.0


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def choice_token_ids(tokenizer: Any, choices: tuple[str, str]) -> tuple[int, int]:
    """The token id of each of a judge's two answers; ValueError unless each is exactly one token."""
    ids = []
    for c in choices:
        toks = tokenizer.encode(c, add_special_tokens=False)
        if len(toks) != 1:
            raise ValueError(
                f"judge answer {c!r} is {len(toks)} tokens {toks} in this tokenizer; choices must be one token each"
            )
        ids.append(toks[0])
    return ids[0], ids[1]


def judge_prompt_ids(tokenizer: Any, text: str, max_len: int) -> list[int]:
    """``text`` as the user turn of the judge's chat template (plain text without one), ready for the
    first answer token; cut from the left to ``max_len - 1`` tokens so the answer fits."""
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer.encode(text)
    return ids[-(max_len - 1) :]


class ClassifierScorer:
    def __init__(self, spec: RewardModelSpec) -> None:
        from transformers import AutoModelForSequenceClassification

        self.spec = spec
        self.tokenizer = _tokenizer(spec.path)
        cuda = bool(spec.num_gpus) and torch.cuda.is_available()
        dtype = getattr(torch, resolve_dtype(spec.dtype, cuda))
        self.model = AutoModelForSequenceClassification.from_pretrained(spec.path, dtype=dtype)
        self.model.to("cuda" if cuda else "cpu").eval()
        # transformers' sequence classifiers refuse a batch of more than one row without a pad token
        # id (they look for the last non-pad token), even when nothing is padded.
        self._batched = self.model.config.pad_token_id is not None
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{spec.path}: a reward classifier has one label (a scalar score), got {self.model.config.num_labels}"
            )

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[float]:
        ids = [self.tokenizer.encode(t)[-self.spec.max_model_len :] for t in texts]
        out = [math.nan] * len(texts)
        by_len: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, x in enumerate(ids):
            by_len[(len(x), i if not self._batched else 0)].append(i)
        dev = next(self.model.parameters()).device
        for rows in by_len.values():
            batch = torch.tensor([ids[i] for i in rows], device=dev)
            logits = self.model(input_ids=batch).logits.float()
            for i, v in zip(rows, logits[:, 0].tolist()):
                out[i] = v
        return out


class JudgeScorer:
    def __init__(self, spec: RewardModelSpec) -> None:
        from vllm import LLM, SamplingParams

        self.spec = spec
        self.tokenizer = _tokenizer(spec.path)
        self.choice_ids = choice_token_ids(self.tokenizer, spec.choices)
        cuda = bool(spec.num_gpus) and torch.cuda.is_available()
        kw: dict[str, Any] = dict(
            model=spec.path,
            dtype=resolve_dtype(spec.dtype, cuda),
            max_model_len=spec.max_model_len,
            enforce_eager=not cuda,
            seed=0,
            distributed_executor_backend="uni",
            enable_prefix_caching=True,  # rows of one question share the template's head
        )
        if not cuda:
            kw.update(block_size=32, enable_chunked_prefill=False, max_num_batched_tokens=max(4096, spec.max_model_len))
        self.llm = LLM(**kw)
        self.params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(self.choice_ids))

    def __call__(self, texts: list[str]) -> list[float]:
        from vllm.inputs import TokensPrompt

        prompts = [
            TokensPrompt(prompt_token_ids=judge_prompt_ids(self.tokenizer, t, self.spec.max_model_len)) for t in texts
        ]
        outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        yes, no = self.choice_ids
        scores = []
        for o in outs:
            first = o.outputs[0].logprobs[0]
            scores.append(choice_score(first[yes].logprob, first[no].logprob))
        return scores


SCORERS = {"classifier": ClassifierScorer, "judge": JudgeScorer}
CONTROL = "control"  # the actor's concurrency group for health queries


class ScoreServer:
    """A scorer (texts -> scores) behind a ``ScoreQueue`` and its one model thread (module docstring)."""

    def __init__(
        self,
        name: str,
        scorer: Callable[[list[str]], list[float]],
        max_concurrency: int,
        on_broken: Callable[[], None] | None = None,
    ) -> None:
        """``on_broken`` is called once the model has failed ``_BROKEN_AFTER`` batches in a row (a dead
        engine fails every batch): the actor exits there, so Ray restarts it with a fresh model."""
        self.name = name
        self._scorer = scorer
        self._queue = ScoreQueue(max_concurrency)
        self._on_broken = on_broken
        self._errors = 0
        self._errors_in_a_row = 0
        self.broken: str | None = None  # why the model thread stopped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"{name}-model", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _serve(self) -> None:
        batch: list = []
        try:
            while not self._stop.is_set():
                batch = self._queue.take(_IDLE_WAIT_S)
                if not batch:
                    continue
                try:
                    values = self._scorer([p.item for p in batch])
                    if len(values) != len(batch):
                        raise RuntimeError(f"scorer returned {len(values)} scores for {len(batch)} rows")
                except Exception as e:  # fail these rows (the caller retries elsewhere)
                    log.warning("%s: scoring %d rows failed: %s", self.name, len(batch), e)
                    self._errors += 1
                    self._errors_in_a_row += 1
                    self._queue.finish(batch, e)
                    batch = []
                    if self._errors_in_a_row >= _BROKEN_AFTER:
                        raise RuntimeError(f"the model failed {self._errors_in_a_row} batches in a row: {e}") from e
                    continue
                self._errors_in_a_row = 0
                self._queue.finish(batch, values)
                batch = []
        except BaseException as e:
            self.broken = f"{self.name}: model thread stopped: {e}"
            log.error("%s", self.broken)
            if batch:
                self._queue.finish(batch, RuntimeError(self.broken))
            self._queue.fail_all(RuntimeError(self.broken))
            if self._on_broken is not None:
                self._on_broken()

    def score(self, texts: list[str], timeout_s: float) -> list[float]:
        """One score per text, in order, within ``timeout_s`` (the caller's, so no row waits longer than
        its caller does); raises what the scorer raised on any of them, or TimeoutError."""
        if self.broken:
            raise RuntimeError(self.broken)
        t0 = time.monotonic()
        futures = self._queue.put(texts, timeout_s)
        values = [f.result(timeout=max(0.0, t0 + timeout_s - time.monotonic())) for f in futures]
        self._queue.stats.latencies.append(time.monotonic() - t0)
        return values

    def status(self) -> dict[str, Any]:
        """Load; the latencies are seconds per request over the last 1,024. Raises once the model
        thread stopped (the group then counts this actor as down)."""
        if self.broken:
            raise RuntimeError(self.broken)
        st = self._queue.stats
        lat = list(st.latencies)
        return {
            "requests": st.requests,
            "expired": st.expired,
            "rows": st.rows,
            "model_errors": self._errors,
            "in_flight": st.in_flight,
            "peak_in_flight": st.peak_in_flight,
            "queue_depth": self._queue.queue_depth(),
            "latency_p50": percentile(lat, 0.5),
            "latency_p95": percentile(lat, 0.95),
        }


class RewardWorker:
    """Ray actor body (``reward_server.group`` wraps it with ``ray.remote``; module docstring).

    ``status`` and ``ping`` run in their own concurrency group (``CONTROL``): however many requests
    wait in ``score``, the group's health poll is answered."""

    def __init__(self, name: str, spec: RewardModelSpec) -> None:
        self.name, self.spec = name, spec
        torch.set_num_threads(spec.cpu_threads)
        t0 = time.perf_counter()
        scorer = SCORERS[spec.kind](spec)
        self.start_seconds = time.perf_counter() - t0
        self._server = ScoreServer(name, scorer, spec.max_concurrency, on_broken=self._restart_soon)
        ctx = ray.get_runtime_context()
        self.where = {
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "restarted": bool(ctx.was_current_actor_reconstructed),
        }
        log.info("%s: %s %s ready in %.1f s", name, spec.kind, spec.path, self.start_seconds)

    def _restart_soon(self) -> None:
        log.error("%s: restarting in %.0f s so Ray loads a fresh model", self.name, _RESTART_DELAY_S)
        threading.Timer(_RESTART_DELAY_S, os._exit, args=(1,)).start()

    def score(self, rows: list[dict[str, str]], timeout_s: float) -> list[float]:
        """One score per row (``question``, ``answer``, ``reference``, ``prompt``), in order."""
        texts = [render(self.spec, r["question"], r["answer"], r["reference"], r["prompt"]) for r in rows]
        return self._server.score(texts, timeout_s)

    @ray.method(concurrency_group=CONTROL)
    def ping(self) -> str:
        return self.name

    @ray.method(concurrency_group=CONTROL)
    def status(self) -> dict[str, Any]:
        """Load (``ScoreServer.status``) and where it runs."""
        return {**self.where, **self._server.status()}
