"""RolloutWorker: one Ray actor owning one vLLM engine; generates, scores, receives weights.

Threading. The actor is threaded (``max_concurrency`` > 1) so ``ping``/``get_weight_version`` answer
during a long generate. Every engine call (start-up, generate, weight load) runs on one
dedicated engine thread (a single-thread executor): that serialises generate against
``receive_weights`` (no request ever runs on half-loaded weights) and keeps all torch/OpenMP
work on one OS thread, which inherits the core binding. Reward scoring runs after the engine
returns, outside the engine thread, so a weight load can proceed while a batch is scored. With
``rollout.streaming`` the engine thread is ``rollout_server.stream.EngineLoop``: the same one thread,
which steps the engine for the queued groups itself and runs weight loads between two steps
(``stream_submit`` / ``stream_take``; a blocking ``generate`` joins the running groups).

Engine process model. ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set by the manager through the
actor's ``runtime_env``) keeps vLLM's engine core inside the actor process; with the default
(1) vLLM-CPU would also replace the ``uni`` executor by its multiprocess one. One process per
worker means Ray's kill/restart covers the whole engine and ``collective_rpc`` is a plain call.
Tensor parallelism (GPU) uses vLLM's ``mp`` executor inside the actor.

Versioning. ``weight_version`` is 0 for the initial checkpoint (also after a Ray restart, which
re-runs this constructor) and the learner's version after each successful update. An update
refused up front (manifest mismatch) or failing before the first tensor (group join) leaves the
old weights serving. An update failing mid-transfer leaves the engine half-updated and unable
to reload: the worker reports -1, refuses generation, and exits so Ray restarts it (version 0).

Restarts. A restarted actor (Ray re-created it: its process or its node died) comes back on the
initial checkpoint, which is not the job's weights any more: it refuses to generate
(``WorkerRestarted``) until the job has pushed weights to it, so a restart can never serve stale
weights silently, whatever the driver was doing when it happened. ``status`` says where the worker
runs (node, pid) and whether it waits for weights.

Metrics. Each worker exports its own series from its own process, so Ray's metrics agent of the
node it runs on serves them (tags ``worker`` and ``node``); they are declared, with the keys of the
batches' ``metrics``, in ``grpo_dist.metrics`` (``WORKER_SERIES``).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

import torch

from grpo_dist import lora as lora_lib
from grpo_dist.batch import RolloutBatch
from grpo_dist.config import AlgoConfig, LearnerConfig, ModelConfig, RewardsConfig, RolloutConfig, resolve_dtype
from grpo_dist.errors import first_line
from grpo_dist.metrics import WORKER_SERIES
from grpo_dist.rewards import build_reward_fns
from grpo_dist.weight_sync import ParamSpec, check_manifest, spec_of
from rollout_server.episodes import EpisodeRunner
from rollout_server.scoring import build_batch
from rollout_server.seeds import request_seeds
from rollout_server.served_rewards import PendingScores, ServedRewards, served_rows
from rollout_server.stream import EngineLoop, StreamGroup, token_versions

log = logging.getLogger(__name__)

EXTENSION_CLS = "rollout_server.vllm_extension.WeightSyncExtension"
# Must equal the sender's bucket size; the driver passes int(learner.weight_sync_bucket_mb * 2**20).
DEFAULT_BUCKET_BYTES = int(LearnerConfig.model_fields["weight_sync_bucket_mb"].default * 2**20)
# Seconds between refusing a broken update and exiting for a restart: lets Ray deliver the error.
_RESTART_DELAY_S = 2.0
# vLLM's id of the one LoRA adapter an engine serves. Every version replaces it under this id, so a
# streaming request that runs across an update continues on the new adapter, as with full weights.
_ADAPTER_ID = 1
# vLLM-CPU's own default for offline engines (LLM class).
CPU_MAX_NUM_BATCHED_TOKENS = 4096
# KV-cache block on CPU: prefix caching shares whole blocks, so vLLM-CPU's default of 128 shares
# nothing of prompts shorter than that between the G completions of a group (measured on SmolLM2,
# 8 GSM8K prompts of 62-142 tokens x n=4: prefill 6.5 s with 128, 2.4 s with 32); 32 is the
# smallest block its attention takes.
CPU_BLOCK_SIZE = 32
SAMPLING_OVERRIDES = ("temperature", "top_p", "top_k", "max_tokens", "seed")


class EngineFailure(RuntimeError):
    """The vLLM engine of a rollout worker raised; the message is one line naming the worker."""


class WorkerRestarted(RuntimeError):
    """A restarted rollout worker was asked to generate before the job pushed weights to it."""


def engine_kwargs(rollout: RolloutConfig, model: ModelConfig, max_model_len: int, cuda: bool) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for one rollout worker."""
    if rollout.tensor_parallel_size > 1 and not cuda:
        raise ValueError(f"rollout.tensor_parallel_size={rollout.tensor_parallel_size} needs CUDA; use 1 on CPU")
    kw: dict[str, Any] = dict(
        model=model.path,
        tokenizer=model.tokenizer_path or model.path,
        dtype=resolve_dtype(model.dtype, cuda),
        trust_remote_code=model.trust_remote_code,
        max_model_len=max_model_len,
        enforce_eager=rollout.enforce_eager,
        seed=rollout.seed,
        tensor_parallel_size=rollout.tensor_parallel_size,
        distributed_executor_backend="uni" if rollout.tensor_parallel_size == 1 else "mp",
        worker_extension_cls=EXTENSION_CLS,
        # Log-prob of each sampled token after temperature (and top-k/top-p): the behaviour
        # policy's own probability. With top_p=1, top_k=-1 it equals log_softmax(logits / T),
        # what the learner computes.
        logprobs_mode="processed_logprobs",
        enable_prefix_caching=True,
    )
    if serves_adapter(model):
        # One adapter at a time, the current version: a new one replaces the old between engine steps.
        kw.update(enable_lora=True, max_lora_rank=rollout.max_lora_rank, max_loras=1)
    if cuda:
        kw["gpu_memory_utilization"] = rollout.gpu_memory_utilization
    else:
        # Every request carries a seed (reproducible sampling), so it has its own torch.Generator.
        # When a step's prompts exceed the token budget, chunked prefill splits one prompt across
        # steps and vLLM rewinds that request's generator by its CUDA offset, which a CPU generator
        # does not have: vLLM-CPU 0.32 raises "CPU Generator does not use offset" (measured: 16
        # prompts x n=8 x 35 tokens = 4,480 > 4,096). Without chunked prefill a prompt is always
        # prefilled whole, in one step, so nothing is rewound; the budget must then hold the
        # longest sequence.
        kw["enable_chunked_prefill"] = False
        kw["max_num_batched_tokens"] = max(CPU_MAX_NUM_BATCHED_TOKENS, max_model_len)
    block_size = rollout.block_size or (None if cuda else CPU_BLOCK_SIZE)
    if block_size is not None:
        kw["block_size"] = block_size
    return kw


def serves_adapter(model: ModelConfig) -> bool:
    """The engine serves the policy's LoRA adapter (vLLM LoRA) rather than full weights."""
    return model.lora is not None and model.lora.sync == "adapter"


def sampling_kwargs(algo: AlgoConfig, n: int, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``SamplingParams`` keywords from the algorithm config plus overrides (eval: temperature 0,
    n=k). Key ``seed`` holds the override or None; the worker turns it into per-prompt seeds."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(SAMPLING_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown sampling overrides {unknown}; allowed: {list(SAMPLING_OVERRIDES)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    kw = dict(
        n=n,
        temperature=algo.temperature,
        top_p=algo.top_p,
        top_k=algo.top_k,
        max_tokens=algo.max_completion_length,
        logprobs=0,  # only the sampled token's log-prob
        seed=None,
    )
    kw.update(overrides)
    return kw


def expected_manifest(model_path: str, dtype: str, trust_remote_code: bool = False) -> dict[str, ParamSpec]:
    """HF parameter names and shapes of the checkpoint (as the learner's ``named_parameters()``
    lists them: tied weights once), with the engine's dtype. Built on the meta device: no memory.

    The manifest is validated against HF names, not vLLM's internal ones (fused ``qkv_proj``,
    ``gate_up_proj``, padded vocab): the learner sends HF tensors and vLLM's loader fuses them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    torch_dtype = getattr(torch, dtype)
    return {name: spec_of(name, p.to(torch_dtype)) for name, p in model.named_parameters()}


def check_rows(rows: list[dict]) -> None:
    if not rows:
        raise ValueError("generate() needs at least one prompt row")
    for i, row in enumerate(rows):
        ids = row.get("prompt_ids") if isinstance(row, dict) else None
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(
                f"prompt row {i} has no non-empty 'prompt_ids' list (keys: {sorted(row) if isinstance(row, dict) else type(row).__name__})"
            )


def extract_outputs(request_outputs: list[Any], n: int, default_version: int | None = None) -> list[dict[str, Any]]:
    """Plain per-completion records from vLLM ``RequestOutput``s, G consecutive per prompt. With
    ``default_version`` (streaming) each record also holds its tokens' weight versions."""
    out = []
    for p, req in enumerate(request_outputs):
        comps = sorted(req.outputs, key=lambda c: c.index)
        if len(comps) != n:
            raise RuntimeError(f"vLLM returned {len(comps)} completions for prompt {p}, expected n={n}")
        for c in comps:
            ids = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(ids):
                raise RuntimeError(f"vLLM returned no per-token log-probs for prompt {p} (logprobs=0 requested)")
            logp = [float(step[t].logprob) for step, t in zip(c.logprobs, ids)]
            rec = {"group": p, "ids": ids, "logp": logp, "truncated": c.finish_reason == "length", "text": c.text}
            if default_version is not None:
                rec["versions"] = token_versions(c.weight_versions, len(ids), default_version)
            out.append(rec)
    return out


def engine_requests(prompt_ids: list[list[int]], params: list[dict[str, Any]]) -> tuple[list, list, int]:
    """vLLM inputs of one call: request i is ``prompt_ids[i]`` with ``SamplingParams(**params[i])``;
    returns (prompts, sampling params, the n each request samples)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    n = params[0]["n"]
    if any(p["n"] != n for p in params):
        raise ValueError("one engine call samples the same n for every request")
    # vLLM refuses n > 1 with greedy sampling; the n greedy completions are identical anyway.
    engine_n = 1 if params[0]["temperature"] == 0 else n
    prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]
    return prompts, [SamplingParams(**{**p, "n": engine_n}) for p in params], engine_n


def generate_records(
    llm: Any, prompt_ids: list[list[int]], params: list[dict[str, Any]], lora_request: Any = None
) -> list[dict[str, Any]]:
    """One ``llm.generate`` call (``engine_requests``); ``params[0]["n"]`` completion records per
    request, in order (``extract_outputs``)."""
    prompts, sampling, engine_n = engine_requests(prompt_ids, params)
    outs = llm.generate(prompts, sampling, use_tqdm=False, lora_request=lora_request)
    return repeat_records(extract_outputs(outs, engine_n), params[0]["n"] // engine_n)


def repeat_records(records: list[dict[str, Any]], times: int) -> list[dict[str, Any]]:
    """Each record ``times`` times in a row (independent copies), keeping groups consecutive."""
    return [
        {
            **r,
            "ids": list(r["ids"]),
            "logp": list(r["logp"]),
            **({"versions": list(r["versions"])} if "versions" in r else {}),
        }
        for r in records
        for _ in range(times)
    ]


class RolloutWorker:
    """Ray actor body (the manager wraps it with ``ray.remote``; see the module docstring)."""

    def __init__(
        self,
        name: str,
        rollout_cfg: RolloutConfig,
        model_cfg: ModelConfig,
        algo_cfg: AlgoConfig,
        rewards_cfg: RewardsConfig,
        max_model_len: int,
    ) -> None:
        self.name = name
        self.rollout_cfg, self.model_cfg, self.algo_cfg, self.rewards_cfg = (
            rollout_cfg,
            model_cfg,
            algo_cfg,
            rewards_cfg,
        )
        self._cuda = torch.cuda.is_available()
        self._engine_kwargs = engine_kwargs(rollout_cfg, model_cfg, max_model_len, self._cuda)
        self._calls = itertools.count()
        self.weight_version = 0
        self.where = _where()
        # A re-created actor serves the initial checkpoint, no longer the job's weights (module docstring).
        self.awaiting_weights = self.where["restarted"]
        self._gauges = _WorkerGauges(name, self.where["node_id"])
        self._gauges.set_weight_version(self.weight_version, self.awaiting_weights)
        self._engine_failure: str | None = None  # set once the engine raised inside generate
        self._rewards = build_reward_fns(rewards_cfg.functions)
        self._served = ServedRewards(rewards_cfg.models) if rewards_cfg.models else None
        self._streaming = rollout_cfg.streaming
        self._channels = itertools.count()  # one per blocking generate call in streaming mode
        self._engine: Any = (
            EngineLoop(
                name,
                rollout_cfg.in_flight_updates,
                on_failure=self._restart_soon,
                on_finished=self._score_on_finish if rewards_cfg.models and rewards_cfg.score_on_finish else None,
            )
            if self._streaming
            else ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-engine")
        )
        t0 = time.perf_counter()
        # Bounded here by generate_timeout_s and from outside by RolloutManager.start's timeout.
        self._llm = self._on_engine(self._start_engine, rollout_cfg.generate_timeout_s)
        self.start_seconds = time.perf_counter() - t0
        self._adapter = serves_adapter(model_cfg)
        self._lora_request = None  # the vLLM LoRARequest of the adapter being served (None: base weights)
        if self._adapter:
            self._expected = lora_lib.adapter_manifest(
                model_cfg.path, model_cfg.lora, self._engine_kwargs["dtype"], model_cfg.trust_remote_code
            )
            self._peft_config = lora_lib.peft_config_dict(model_cfg.lora, model_cfg.path)
            if self._streaming:
                # A request keeps the adapter id it was admitted with: one admitted on the base model
                # (no adapter) would go on sampling from it after an update labelled the new version.
                self._on_engine(self._serve_zero_adapter, rollout_cfg.generate_timeout_s)
        else:
            self._expected = expected_manifest(
                model_cfg.path, self._engine_kwargs["dtype"], model_cfg.trust_remote_code
            )
        self._episodes = self._episode_runner(max_model_len) if rollout_cfg.multi_turn is not None else None
        self._thread_info = self._on_engine(_thread_info, 60.0)
        log.info("%s: engine ready in %.1f s (%s)", name, self.start_seconds, self._thread_info)

    def _on_engine(self, fn, timeout_s: float, *args, park: bool = False):
        """Run ``fn`` on the engine thread and wait at most ``timeout_s`` (queueing included);
        ``park`` (streaming): a weight load (``rollout_server.stream``)."""
        fut = self._engine.submit(fn, *args, park=park) if self._streaming else self._engine.submit(fn, *args)
        try:
            return fut.result(timeout=timeout_s)
        except FutureTimeoutError:
            fut.cancel()  # not started yet: it never runs (a weight load must not join a group long gone)
            raise TimeoutError(
                f"{self.name}: {fn.__name__} did not finish within {timeout_s:.0f}s (the engine thread may be "
                "busy with an earlier call)"
            ) from None

    def _episode_runner(self, max_model_len: int) -> EpisodeRunner:
        from transformers import AutoTokenizer

        from grpo_dist.envs.from_config import env_factory, tool_schemas

        mt = self.rollout_cfg.multi_turn
        tok = AutoTokenizer.from_pretrained(
            self.model_cfg.tokenizer_path or self.model_cfg.path, trust_remote_code=self.model_cfg.trust_remote_code
        )
        return EpisodeRunner(
            mt,
            tok,
            env_factory(mt),
            max_model_tokens=self.algo_cfg.max_completion_length,
            max_model_len=max_model_len,
            tools=tool_schemas(mt),
        )

    def _start_engine(self):
        from vllm import LLM

        llm = LLM(**self._engine_kwargs)
        # vLLM labels every sampled token with the label current at that step (streaming rows carry them).
        llm.llm_engine.set_weight_version(str(self.weight_version))
        if self._streaming:
            self._engine.attach(llm)
        return llm

    # ------------------------------------------------------------ cheap queries (never blocked)

    def ping(self) -> str:
        return self.name

    def get_weight_version(self) -> int:
        return self.weight_version

    def status(self) -> dict[str, Any]:
        """Version, whether a restart left it waiting for weights, and where it runs (node, pid)."""
        return {"weight_version": self.weight_version, "awaiting_weights": self.awaiting_weights, **self.where}

    def num_engine_workers(self) -> int:
        return self.rollout_cfg.tensor_parallel_size

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "weight_version": self.weight_version,
            "start_seconds": self.start_seconds,
            "dtype": self._engine_kwargs["dtype"],
            "num_engine_workers": self.num_engine_workers(),
            "awaiting_weights": self.awaiting_weights,
            **self.where,
            **self._thread_info,
        }

    def check_manifest(self, manifest: list[ParamSpec]) -> None:
        """Raise ValueError (naming every bad parameter) unless ``manifest`` matches this model."""
        try:
            check_manifest(manifest, self._expected)
        except ValueError as e:
            raise ValueError(
                f"{self.name} (model {self.model_cfg.path}, dtype {self._engine_kwargs['dtype']}): {e}"
            ) from None

    # ------------------------------------------------------------ generation

    def generate(self, prompts: list[dict], n: int | None = None, sampling: dict | None = None) -> RolloutBatch:
        """G = ``n`` (default num_generations) completions per prompt row, scored; one vLLM call."""
        check_rows(prompts)
        n = n or self.algo_cfg.num_generations
        kw = sampling_kwargs(self.algo_cfg, n, sampling)
        # An explicit seed (eval) makes the call reproducible; otherwise every call draws fresh seeds.
        seed_override = kw.pop("seed")
        call = 0 if seed_override is not None else next(self._calls)
        base = self.rollout_cfg.seed if seed_override is None else int(seed_override)
        seeds = request_seeds(base, call, len(prompts), n)
        t0 = time.perf_counter()
        if self._streaming:
            completions, version = self._stream_generate(prompts, kw, seeds)
        elif self._episodes is not None:
            completions, version = self._on_engine(
                self._run_episodes, self.rollout_cfg.generate_timeout_s, prompts, kw, seeds
            )
        else:
            completions, version = self._on_engine(
                self._run_engine,
                self.rollout_cfg.generate_timeout_s,
                [list(r["prompt_ids"]) for r in prompts],
                kw,
                seeds,
            )
        gen_seconds = time.perf_counter() - t0
        self._gauges.generated(len(prompts) * n, gen_seconds)
        return build_batch(
            prompts, n, completions, version, self._rewards, self.rewards_cfg.timeout_s, gen_seconds, self._served
        )

    def _stream_generate(self, rows: list[dict], kw: dict[str, Any], seeds: list[int]):
        """``generate`` on a streaming engine: the rows join the running groups on a channel of
        their own and this call waits for all of them; records in row order, and the oldest
        token's version."""
        self._check_serving()
        n = kw["n"]
        engine_n = 1 if kw["temperature"] == 0 else n  # as engine_requests: greedy samples are identical
        channel = f"call{next(self._channels)}"
        # Ahead of the queued training groups: an evaluation waits for the engine's room, not for the queue.
        self._engine.add(
            [
                StreamGroup(uid=i, row=r, params={**kw, "n": engine_n, "seed": s}, channel=channel)
                for i, (r, s) in enumerate(zip(rows, seeds))
            ],
            first=True,
        )
        got: list = []
        deadline = time.monotonic() + self.rollout_cfg.generate_timeout_s
        try:
            while len(got) < len(rows):
                self._check_stream()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self.name}: {len(rows) - len(got)} of {len(rows)} prompts did not finish within "
                        f"{self.rollout_cfg.generate_timeout_s:.0f}s"
                    )
                got += self._engine.take(channel, len(rows), min(left, 5.0))
        except BaseException:
            self._engine.drop(channel)
            raise
        got.sort(key=lambda go: go[0].uid)
        records = self._stream_records(got, engine_n, n)
        return records, self._oldest(records)

    def _oldest(self, records: list[dict[str, Any]]) -> int:
        """The oldest token's version (this worker's version when no record has a token)."""
        return min((v for r in records for v in r["versions"]), default=self.weight_version)

    def _restart_soon(self) -> None:
        """The streaming engine failed: exit so Ray restarts this worker (it comes back at version 0,
        awaiting the job's weights); the manager re-issues the groups it held meanwhile."""
        log.error(
            "%s: streaming engine failed (%s); restarting in %.0f s", self.name, self._engine.failure, _RESTART_DELAY_S
        )
        threading.Timer(_RESTART_DELAY_S, os._exit, args=(1,)).start()

    def _stream_records(self, done: list, engine_n: int, n: int) -> list[dict[str, Any]]:
        """Completion records of finished groups (group index = position in ``done``)."""
        records = []
        for p, (_, out) in enumerate(done):
            for rec in repeat_records(extract_outputs([out], engine_n, self.weight_version), n // engine_n):
                records.append({**rec, "group": p})
        return records

    def _score_on_finish(self, group: StreamGroup, out: Any) -> PendingScores:
        """Send a finished group's completions to the served reward models at once (engine thread)."""
        n = self.algo_cfg.num_generations
        return self._start_scoring(group.row, self._stream_records([(group, out)], n, n))

    def _start_scoring(self, row: dict, records: list[dict[str, Any]]) -> PendingScores:
        """The served models' requests for one group's completion records."""
        return self._served.start(served_rows([row], [0] * len(records), [r["text"] for r in records]))

    def _check_stream(self) -> None:
        if self._engine.failure is not None:
            raise EngineFailure(self._engine.failure)
        self._check_serving()

    def stream_submit(self, rows: list[dict], uids: list[int]) -> None:
        """Queue one group of G = num_generations completions per row (``rollout.streaming``);
        ``uids`` name them in ``stream_take``'s answers. Returns at once."""
        if not self._streaming:
            raise RuntimeError(f"{self.name}: stream_submit needs rollout.streaming")
        check_rows(rows)
        self._check_stream()
        kw = sampling_kwargs(self.algo_cfg, self.algo_cfg.num_generations, None)
        kw.pop("seed")
        seeds = request_seeds(self.rollout_cfg.seed, next(self._calls), len(rows), kw["n"])
        self._engine.add([StreamGroup(uid=u, row=r, params={**kw, "seed": s}) for r, u, s in zip(rows, uids, seeds)])

    def stream_take(self, max_groups: int, wait_s: float) -> dict[str, Any]:
        """Up to ``max_groups`` finished groups in completion order, scored, as one batch (None if
        none finished within ``wait_s``), with their uids, the uids this worker still holds, and the
        engine's occupancy since the last call. A restarted worker (or one whose engine failed)
        raises: the groups it held are gone and the manager re-issues them."""
        self._check_stream()
        done = self._engine.take("train", max_groups, wait_s)
        self._check_stream()
        stats = self._engine.stats()
        batch = None
        if done:
            n = self.algo_cfg.num_generations
            records = self._stream_records(done, n, n)
            oldest = self._oldest(records)
            busy = stats["busy_seconds"]
            pending = None
            if self._served is not None:  # groups whose scoring did not start as they finished start now
                parts = [
                    g.scoring or self._start_scoring(g.row, records[p * n : (p + 1) * n])
                    for p, (g, _) in enumerate(done)
                ]
                pending = ServedRewards.join(parts)
            batch = build_batch(
                [g.row for g, _ in done],
                n,
                records,
                oldest,
                self._rewards,
                self.rewards_cfg.timeout_s,
                busy,
                self._served,
                pending,
            )
        # Every window counts: a call that found no group finished still read the engine's busy time.
        self._gauges.generated(len(batch) if batch is not None else 0, stats["busy_seconds"])
        return {"batch": batch, "uids": [g.uid for g, _ in done], "held": self._engine.held(), "stats": stats}

    def _run_engine(self, prompt_ids: list[list[int]], kw: dict[str, Any], seeds: list[int]):
        self._check_serving()
        records = self._engine_generate(prompt_ids, [dict(kw, seed=s) for s in seeds])
        # The version is read on the engine thread, so it is the one these weights carry.
        return records, self.weight_version

    def _run_episodes(self, rows: list[dict], kw: dict[str, Any], seeds: list[int]):
        """Multi-turn episodes, every turn on this (the engine) thread: no weight update lands
        between two turns, so one version generated the whole batch."""
        self._check_serving()
        sampling = {k: v for k, v in kw.items() if k != "n"}
        records = self._episodes.run(rows, kw["n"], sampling, seeds, self._engine_generate)
        return records, self.weight_version

    def _check_serving(self) -> None:
        """Refuse to generate on weights that are not the job's (see the module docstring)."""
        if self.weight_version < 0:
            raise RuntimeError(
                f"{self.name}: a weight update failed mid-transfer and the engine holds a mix of old and new "
                "weights; generation is refused while this worker restarts"
            )
        if self._engine_failure is not None:
            raise EngineFailure(self._engine_failure)
        if self.awaiting_weights:
            raise WorkerRestarted(
                f"{self.name}: restarted on node {self.where['node_id'][:8]} ({self.where['node_ip']}) and serves the "
                "initial checkpoint; it generates nothing until the job pushes its current weights"
            )

    def _engine_generate(self, prompt_ids: list[list[int]], params: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``generate_records`` on this worker's engine; an exception inside vLLM is final for it."""
        prompts, sampling, engine_n = engine_requests(prompt_ids, params)
        try:
            outs = self._llm.generate(prompts, sampling, use_tqdm=False, lora_request=self._lora_request)
        except Exception as e:
            # The engine's scheduler state is undefined after an exception inside a step: this
            # engine generates nothing more. The traceback goes to this actor's log; the caller
            # gets one line naming the worker and the cause.
            log.exception("%s: vLLM engine failed", self.name)
            self._engine_failure = (
                f"{self.name}: vLLM engine failed while generating {len(prompt_ids)} prompts x n={params[0]['n']} "
                f"(longest prompt {max(len(p) for p in prompt_ids)} tokens): {first_line(e)}"
            )
            raise EngineFailure(self._engine_failure) from None
        return repeat_records(extract_outputs(outs, engine_n), params[0]["n"] // engine_n)

    # ------------------------------------------------------------ weights

    def receive_weights(
        self,
        manifest: list[ParamSpec],
        version: int,
        host: str,
        port: int,
        rank: int,
        sync_group_size: int,
        timeout_s: float,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> dict[str, float]:
        """Join the weight-sync group (engine worker k takes rank ``rank + k``), load the update
        in place and switch to ``version``. Blocks until loaded; a running generate finishes
        first. A manifest mismatch is refused before joining: the old weights keep serving."""
        self.check_manifest(manifest)
        wait_s = self.rollout_cfg.generate_timeout_s + 2 * timeout_s
        called = time.perf_counter()
        return self._on_engine(
            self._load_weights,
            wait_s,
            manifest,
            version,
            host,
            port,
            rank,
            sync_group_size,
            timeout_s,
            bucket_bytes,
            called,
            park=True,
        )

    def _load_weights(self, manifest, version, host, port, rank, sync_group_size, timeout_s, bucket_bytes, called):
        """On the engine thread; ``called``: when the update arrived (the wait for the engine thread
        is reported as ``wait_seconds``)."""
        if self._adapter:
            return self._load_adapter(
                manifest, version, host, port, rank, sync_group_size, timeout_s, bucket_bytes, called
            )
        t0 = time.perf_counter()
        try:
            stats = self._llm.collective_rpc(
                "grpo_receive_weights", args=(manifest, host, port, rank, sync_group_size, timeout_s, bucket_bytes)
            )
        except Exception as e:
            if any(self._llm.collective_rpc("grpo_weights_partial")):
                # vLLM's in-place reload cannot run again after a failure (layers are left on the
                # meta device; measured: the next reload raises). Restart the process through Ray
                # (max_restarts), which brings the engine back on the initial checkpoint, version 0.
                self.weight_version = -1
                self._gauges.set_weight_version(-1, False)
                threading.Timer(_RESTART_DELAY_S, os._exit, args=(1,)).start()
                state = (
                    "the engine is half-updated and cannot reload again: this worker restarts and comes "
                    "back at version 0 (initial checkpoint); generation is refused until then"
                )
            else:
                state = f"no tensor was loaded, still serving version {self.weight_version}"
            raise RuntimeError(f"{self.name}: weight update to version {version} failed: {e} ({state})") from e
        return self._adopt(version, t0, stats, called)

    def _adopt(self, version: int, t0: float, stats: list[dict], called: float) -> dict[str, float]:
        """Serve ``version`` from the next batch on (its cached prefixes are the old weights'). A
        streaming engine with requests running preempts them: they resume by recomputing their
        KV cache under these weights (``rollout_server.stream``)."""
        engine = self._llm.llm_engine
        engine.reset_prefix_cache(reset_running_requests=self._streaming)
        engine.set_weight_version(str(version))
        self.weight_version = version
        self.awaiting_weights = False
        self._gauges.set_weight_version(version, False)
        return {
            "version": float(version),
            "seconds": time.perf_counter() - t0,
            "bytes": stats[0]["bytes"],
            "join_seconds": max(s["join_seconds"] for s in stats),
            "load_seconds": max(s["load_seconds"] for s in stats),
            "wait_seconds": t0 - called,
        }

    def _load_adapter(self, manifest, version, host, port, rank, sync_group_size, timeout_s, bucket_bytes, called):
        """Receive the adapter in place of the one served (``_ADAPTER_ID``) and serve it from the next
        engine step on; the base weights are never written, so a failed update leaves the previous
        adapter serving and nothing needs a restart."""
        t0 = time.perf_counter()
        try:
            sync = (manifest, host, port, rank, sync_group_size, timeout_s, bucket_bytes)
            stats = self._llm.collective_rpc("grpo_receive_adapter", args=(*sync, _ADAPTER_ID, self._peft_config))
        except Exception as e:
            raise RuntimeError(
                f"{self.name}: adapter update to version {version} failed: {e} (still serving "
                f"version {self.weight_version})"
            ) from e
        self._serve_adapter(version)
        return self._adopt(version, t0, stats, called)

    def _serve_zero_adapter(self) -> None:
        """On the engine thread at start (streaming): version 0 as an adapter of zeros, which gives
        the base model's outputs exactly, so every request carries the adapter id from admission."""
        self._llm.collective_rpc(
            "grpo_zero_adapter", args=(list(self._expected.values()), _ADAPTER_ID, self._peft_config)
        )
        self._serve_adapter(0)

    def _serve_adapter(self, version: int) -> None:
        from vllm.lora.request import LoRARequest

        # vLLM never reads the path of an adapter it already holds. The path is part of its prefix-cache
        # block hash, so a version's blocks never match another's even without the cache reset.
        self._lora_request = LoRARequest("grpo-policy", _ADAPTER_ID, lora_path=f"grpo-dist:in-memory/v{version}")
        if self._streaming:
            self._engine.lora_request = self._lora_request


def _thread_info() -> dict[str, Any]:
    """Cores and threads of the calling (engine) thread: shows the binding took effect."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return {"cores": cores, "torch_threads": torch.get_num_threads(), "omp_places": os.environ.get("OMP_PLACES", "")}


def _where() -> dict[str, Any]:
    """Node and process of this actor, and whether Ray re-created it (False outside an actor)."""
    import ray

    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        "restarted": bool(ctx.get_actor_id() and ctx.was_current_actor_reconstructed),
    }


class _WorkerGauges:
    """This worker's series in Ray's metrics: every one of ``grpo_dist.metrics.WORKER_SERIES``."""

    def __init__(self, worker: str, node_id: str) -> None:
        from ray.util.metrics import Counter, Gauge

        keys = ("worker", "node")
        self._tags = {"worker": worker, "node": node_id}
        made = {
            name: (Counter if m.kind == "counter" else Gauge)(name, m.meaning, tag_keys=keys)
            for name, m in WORKER_SERIES.items()
        }
        self._version = made["grpo_worker_weight_version"]
        self._awaiting = made["grpo_worker_awaiting_weights"]
        self._completions = made["grpo_worker_completions"]
        self._seconds = made["grpo_worker_generate_seconds"]

    def set_weight_version(self, version: int, awaiting: bool) -> None:
        self._version.set(version, tags=self._tags)
        self._awaiting.set(float(awaiting), tags=self._tags)

    def generated(self, completions: int, seconds: float) -> None:
        # Ray's Counter.inc refuses 0 (a streaming take can find groups finished before its window).
        if completions > 0:
            self._completions.inc(completions, tags=self._tags)
        if seconds > 0:
            self._seconds.inc(seconds, tags=self._tags)
