"""The one configuration schema of grpo-dist.

YAML in, validated before anything starts. Every section is a pydantic model with
``extra="forbid"``: an unknown or misspelt key is an error that names the field, never
silently ignored. Nothing here rewrites a user's value; impossible combinations fail.
Each component receives only its own section (``cfg.rollout``, ``cfg.learner``, ...).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from grpo_dist.errors import UserError, one_line


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def resolve_dtype(dtype: str, cuda: bool) -> str:
    """``auto`` is bfloat16 on CUDA and float32 on CPU (CPU bf16 matmuls are slow and lossy).

    The one rule for the learner and the rollout engines: the weight-sync manifest check needs
    both sides to agree on it."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if cuda else "float32"


# The attention and MLP projections of Llama/Qwen/Mistral-style decoders (PEFT's usual targets).
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(_Section):
    """A PEFT LoRA adapter on the policy: only its parameters are trained and synced."""

    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input (training only).")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        description="Module names (last name component) that get an adapter; each must exist in the model.",
    )
    sync: Literal["adapter", "merged"] = Field(
        "adapter",
        description="`adapter`: engines serve the adapter (vLLM LoRA) and only its tensors are synced; `merged`: "
        "engines without LoRA get the merged full weights at every sync.",
    )


class ModelConfig(_Section):
    path: str = Field("runs/tiny-model", description="HF model id or local directory of the policy.")
    tokenizer_path: str | None = Field(None, description="Tokenizer location; defaults to `path`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Training/inference dtype. `auto`: bfloat16 on CUDA, float32 on CPU."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run model and tokenizer code shipped with the checkpoint (transformers' and vLLM's "
        "trust_remote_code) in the learner, the engines and the preflight checks.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the policy's activations in backward (transformers' gradient_checkpointing_enable): "
        "less learner memory for more compute; needs learner.shared_prompt_forward=false.",
    )
    lora: LoraConfig | None = Field(None, description="Train a LoRA adapter instead of every weight; off when absent.")


class SyntheticTaskConfig(_Section):
    num_train: int = Field(5000, gt=0, description="Distinct training problems generated.")
    num_test: int = Field(200, gt=0, description="Held-out problems (disjoint from train).")
    max_operand: int = Field(99, ge=1, description="Operands are drawn from [0, max_operand].")
    ops: list[Literal["+", "-", "*"]] = Field(
        default_factory=lambda: ["+"],
        description="Operators of the problems `a op b`, each listed once (checked when the data is loaded).",
    )
    seed: int = Field(1234, description="Seed of the draw that picks the test problems and then the train problems.")


class DataConfig(_Section):
    source: Literal["synthetic", "gsm8k", "hf"] = Field(
        "synthetic",
        description="`synthetic` arithmetic, `gsm8k` JSONL dir (default: the copy shipped in grpo_dist/assets), "
        "`hf` any datasets-loadable local file/dir or hub dataset id.",
    )
    path: str | None = Field(
        None,
        description="gsm8k: directory with train.jsonl/test.jsonl (None: the shipped copy); hf: data file, "
        "dir, or hub id such as `openai/gsm8k`.",
    )
    hf_config: str | None = Field(
        None, description="hf: dataset config name on the hub (e.g. `main` for openai/gsm8k)."
    )
    train_split: str = Field(
        "train",
        description="Split of the training prompts: `<path>/<split>.jsonl` for gsm8k, the split name for hf (a "
        "single data file serves only this split), the train part of synthetic.",
    )
    test_split: str = Field("test", description="Held-out split of the evaluations, looked up like train_split.")
    prompt_column: str = Field(
        "question",
        description="gsm8k/hf: the column holding the question that fills prompt_template; synthetic ignores it.",
    )
    answer_column: str = Field(
        "answer",
        description="gsm8k/hf: the column holding the reference answer, which reward functions get as `answer` "
        "(gsm8k: the text after `####`); synthetic ignores it.",
    )
    system_prompt: str | None = Field(
        None, description="System turn of the chat template; None keeps the template's default (SmolLM2 has one)."
    )
    prompt_template: str = Field(
        "{question}", description="User turn built from the question, e.g. `What is {question}?`."
    )
    use_chat_template: bool = Field(True, description="Apply the tokenizer's chat template when it has one.")
    max_prompt_length: int = Field(256, gt=0, description="Rows whose prompt is longer (tokens) are dropped at load.")
    shuffle_seed: int = Field(
        0, description="Not read by any code: the order of the training prompts is seeded by trainer.seed."
    )
    synthetic: SyntheticTaskConfig = Field(
        default_factory=SyntheticTaskConfig,
        description="The synthetic arithmetic task; read only with source=synthetic.",
    )

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        """- `data.path` is required with `data.source: hf`.
        - `data.prompt_template` contains `{question}` and no other `{...}` field."""
        if self.source == "hf" and not self.path:
            raise ValueError("data.path is required for data.source='hf'")
        try:
            self.prompt_template.format(question="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"data.prompt_template={self.prompt_template!r} is not a template with only {{question}}: {e!r}"
            ) from None
        if "{question}" not in self.prompt_template:
            raise ValueError(f"data.prompt_template={self.prompt_template!r} does not contain {{question}}")
        return self


class RewardSpec(_Section):
    name: str = Field(..., description="Registry name (`accuracy`, `format`, `length`) or import path `pkg.mod:fn`.")
    weight: float = Field(
        1.0,
        description="Factor of this function's reward in the sum; where it gives a row no value (None, NaN, an "
        "exception, a timeout), that row's sum is over the other functions.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the function.")


# The fields a judge's prompt_template may name; question and answer are required.
JUDGE_FIELDS = ("question", "answer", "reference")


class RewardModelSpec(_Section):
    """A reward model served by its own Ray actors (``reward-<name>-<i>``): a classifier or an LLM judge.

    Its score is one more reward component, weighted like a function's. A row it gives no score (a
    failed, timed-out or exhausted request) has a missing (NaN) combined reward: it is left out of its
    group's baseline and gets advantage 0."""

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,39}$",
        description="Component name (in `reward_components`, metrics and actor names `reward-<name>-<i>`); must not "
        "equal a reward function's name.",
    )
    kind: Literal["judge", "classifier"] = Field(
        ...,
        description="`judge`: an LLM on a vLLM engine reads the rendered template and the score is "
        "P(yes) / (P(yes) + P(no)) of its first answer token; `classifier`: an "
        "`AutoModelForSequenceClassification` in transformers and the score is its (single) logit.",
    )
    path: str = Field(..., description="Local model directory (HF format). Neither trained nor synced.")
    prompt_template: str | None = Field(
        None,
        description="Text the model reads, with `{question}`, `{answer}` (the completion) and optionally "
        "`{reference}` (the dataset's answer). A judge needs one (with question and answer) and reads it as the "
        "user turn of its chat template; a classifier without one reads the prompt followed by the completion.",
    )
    choices: tuple[str, str] = Field(
        ("Yes", "No"),
        description="The judge's yes and no answers; each must be one token of the judge's tokenizer.",
    )
    weight: float = Field(1.0, allow_inf_nan=False, description="Factor of this model's score in the reward sum.")
    num_workers: int = Field(1, ge=1, description="Actors serving this model (scaled live with `grpo-dist scale`).")
    max_concurrency: int = Field(
        64, ge=1, description="Rows one actor scores at once; further requests wait in its queue."
    )
    timeout_s: float = Field(30.0, gt=0, description="Bound on one request (a rollout worker's rows) per attempt.")
    retries: int = Field(2, ge=0, description="Further attempts after a failed or timed-out request, with backoff.")
    backoff_s: float = Field(1.0, gt=0, description="Wait before the first retry; doubled for each further one.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype; `auto` is the policy's rule: bfloat16 on a GPU actor, float32 on CPU."
    )
    max_model_len: int = Field(
        2048, ge=16, description="Longest text (tokens) it scores; longer rows are cut from the left."
    )
    num_cpus: float = Field(1.0, gt=0, description="Ray logical CPUs per actor.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per actor (a judge's engine uses one whole GPU).")
    cpu_threads: int = Field(1, ge=1, description="Torch threads of a CPU actor.")
    label_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels its actors must be placed on, as cluster.rollout_label_selector."
    )

    @model_validator(mode="after")
    def _template(self) -> RewardModelSpec:
        """- A judge has a `prompt_template` naming `{question}` and `{answer}`.
        - A template names no field but `question`, `answer` and `reference`.
        - The two `choices` differ and are not empty.
        - `num_gpus` is 0 or 1 for a judge."""
        if self.prompt_template is not None:
            fields = template_fields(self.prompt_template)
            unknown = sorted(set(fields) - set(JUDGE_FIELDS))
            if unknown:
                raise ValueError(
                    f"rewards.models[{self.name}].prompt_template names {unknown}; it may use only "
                    f"{{question}}, {{answer}} and {{reference}}"
                )
            try:  # a format spec or conversion that fails on text would fail every row
                self.prompt_template.format(question="q", answer="a", reference="r")
            except (ValueError, KeyError, IndexError) as e:
                raise ValueError(
                    f"rewards.models[{self.name}].prompt_template does not format with text: {e}"
                ) from None
        if self.kind == "judge":
            missing = [f for f in ("question", "answer") if f not in template_fields(self.prompt_template or "")]
            if missing:
                raise ValueError(
                    f"rewards.models[{self.name}]: a judge's prompt_template must contain "
                    + " and ".join(f"{{{m}}}" for m in missing)
                )
            if self.num_gpus not in (0, 1):
                raise ValueError(
                    f"rewards.models[{self.name}].num_gpus={self.num_gpus:g}: a judge engine takes 0 or 1 GPU"
                )
        yes, no = self.choices
        if not yes or not no or yes == no:
            raise ValueError(f"rewards.models[{self.name}].choices={list(self.choices)} must be two different answers")
        return self


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of a ``str.format`` template (ValueError on a malformed one)."""
    import string

    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"prompt_template {template[:60]!r}...: {e}") from None


class RewardsConfig(_Section):
    functions: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="accuracy", weight=1.0), RewardSpec(name="format", weight=0.2)],
        description="Reward functions, summed with their weights; with rollout.multi_turn the environment's step "
        "rewards add a component `env` (weight 1).",
    )
    timeout_s: float = Field(10.0, gt=0, description="Per-call timeout of one reward function on one batch.")
    models: list[RewardModelSpec] = Field(
        default_factory=list,
        description="Reward models and LLM judges, each served by its own actors; their scores add components.",
    )
    score_on_finish: bool = Field(
        True,
        description="With rollout.streaming: send each group to the served models as soon as its G completions "
        "finish, so scoring overlaps the engine's work on the others; false: when the driver takes the group. "
        "Batch generation always scores after its generate call.",
    )

    @model_validator(mode="after")
    def _names(self) -> RewardsConfig:
        """- Reward model names are unique and equal no reward function's name, nor `env`."""
        taken = {s.name for s in self.functions} | {"env"}
        seen: set[str] = set()
        for m in self.models:
            if m.name in taken or m.name in seen:
                raise ValueError(
                    f"rewards.models name {m.name!r} is taken ({'a reward function' if m.name in taken else 'another model'}"
                    " has it); reward components need distinct names"
                )
            seen.add(m.name)
        return self


class RolloutCorrectionConfig(_Section):
    """Train/inference mismatch correction: the policy term of every token is weighted by
    ``w = pi_behaviour / pi_vllm`` (detached), the learner's probability of the sampled tokens over
    the engine's (TRL's ``vllm_importance_sampling_*``, verl's rollout correction)."""

    level: Literal["token", "sequence", "geometric"] = Field(
        "token",
        description="`token`: one weight per token; `sequence`: the product over the row's model tokens "
        "(TRL's `sequence_*`); `geometric`: that product to the power 1/length, i.e. exp(mean log-ratio), which "
        "does not shrink or explode with length.",
    )
    mode: Literal["truncate", "mask"] = Field(
        "truncate",
        description="`truncate`: w clamped to [min, max]; `mask`: w kept as is inside [min, max] and 0 outside (the "
        "token or row gets no policy gradient but still counts in the loss's denominator, as in TRL).",
    )
    max: float | None = Field(3.0, gt=0, description="Upper bound on w (None: none).")
    min: float | None = Field(None, ge=0, description="Lower bound on w (None: none).")

    @model_validator(mode="after")
    def _bounds(self) -> RolloutCorrectionConfig:
        """- At least one of `max` and `min` is set (with neither the correction changes nothing).
        - `level: sequence` has a `max`: a product over hundreds of tokens overflows to inf.
        - With both set, `min` is below `max`."""
        if self.max is None and self.min is None:
            raise ValueError("algorithm.rollout_correction needs max or min (with neither it changes nothing)")
        if self.level == "sequence" and self.max is None:
            raise ValueError(
                "algorithm.rollout_correction.level=sequence needs a max: the product of a long row's weights "
                "overflows (a 0.05 log-gap over 2,000 tokens is e^100); or use level=geometric"
            )
        if self.max is not None and self.min is not None and self.min >= self.max:
            raise ValueError(f"algorithm.rollout_correction.min={self.min:g} must be below max={self.max:g}")
        return self


# Fields that only one policy loss reads; away from their default under another loss they are refused.
_LOSS_ONLY_FIELDS = {
    "epsilon_low": "clip",
    "epsilon_high": "clip",
    "clip_ratio_c": "clip",
    "cispo_max_ratio": "cispo",
    "sapo_temperature_pos": "sapo",
    "sapo_temperature_neg": "sapo",
}


class AlgoConfig(_Section):
    """The GRPO algorithm. Field names follow TRL's GRPOConfig where TRL has one."""

    num_generations: int = Field(8, ge=2, description="G: completions per prompt (one vLLM call with n=G).")
    beta: float = Field(0.04, ge=0, description="KL coefficient; 0 skips the reference model entirely.")
    policy_loss: Literal["clip", "cispo", "sapo"] = Field(
        "clip",
        description="Per-token policy loss (grpo_dist.losses.POLICY_LOSSES): `clip` PPO's clipped ratio (GRPO, "
        "and GSPO with importance_sampling_level=sequence), `cispo` the clipped IS weight on log pi (MiniMax-M1), "
        "`sapo` a soft sigmoid gate instead of the clip (Qwen's SAPO).",
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token",
        description="`token`: ratio pi/pi_old per token; `sequence`: one ratio per row, exp(mean over its model "
        "tokens of log pi/pi_old), given to each of its tokens (GSPO).",
    )
    epsilon_low: float = Field(0.2, ge=0, description="`clip`: lower clip, ratio >= 1 - epsilon_low.")
    epsilon_high: float = Field(
        0.2, ge=0, description="`clip`: upper clip, ratio <= 1 + epsilon_high (DAPO clip-higher)."
    )
    clip_ratio_c: float | None = Field(
        None,
        gt=1,
        description="`clip`: dual-clip bound; a negative-advantage token's loss is at most clip_ratio_c * |A| "
        "(verl's clip_ratio_c, OpenRLHF's dual_clip); None = off.",
    )
    cispo_max_ratio: float = Field(
        5.0, gt=0, description="`cispo`: the IS weight is sg(min(ratio, cispo_max_ratio)) (TRL's epsilon_high)."
    )
    sapo_temperature_pos: float = Field(1.0, gt=0, description="`sapo`: gate temperature for A > 0.")
    sapo_temperature_neg: float = Field(1.05, gt=0, description="`sapo`: gate temperature for A <= 0.")
    entropy_coef: float = Field(
        0.0,
        ge=0,
        description="Entropy bonus: entropy_coef * H is subtracted per model token, aggregated as the loss "
        "(loss_type); 0 = off.",
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "grpo", description="Token aggregation of the per-token loss, see grpo_dist.losses."
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3",
        description="Per-token estimate of KL(pi || pi_ref) from the sampled token, with d = log pi_ref - log pi: "
        "`k1` -d, `k2` d²/2, `k3` exp(d) - d - 1 (TRL's).",
    )
    advantage: Literal["grpo", "rloo", "softmax"] = Field(
        "grpo", description="`grpo` group z-score, `rloo` leave-one-out baseline, `softmax` seed-003 weights."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Std used by `grpo` advantages; `none` is Dr. GRPO."
    )
    adv_eps: float = Field(1e-4, gt=0, description="Added to the std before dividing.")
    softmax_temperature: float = Field(1.0, gt=0, description="Temperature of the `softmax` advantage weights.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; logits are divided by it in the loss.")
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="vLLM's nucleus-sampling top_p; 1 = off. The learner's log-probs are of the full softmax, so "
        "below 1 (or with top_k) the trained probabilities are not the sampled ones.",
    )
    top_k: int = Field(-1, description="-1 disables top-k.")
    max_completion_length: int = Field(
        64,
        gt=0,
        description="Most tokens the model writes per completion (vLLM's max_tokens); with rollout.multi_turn, over "
        "all its turns together. Also dr_grpo's fixed denominator.",
    )
    num_iterations: int = Field(1, ge=1, description="mu: optimisation passes over each generated batch.")
    rollout_correction: RolloutCorrectionConfig | None = Field(
        None, description="Weight tokens by learner/engine probability of the sampled tokens; None = off."
    )
    dynamic_sampling: bool = Field(False, description="Drop zero-variance groups and top the batch up (DAPO).")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """- `algorithm.tis_cap` is refused; it was `rollout_correction: {level: token, mode: truncate, max: <tis_cap>}`.
        `tis_cap: null` (off, as configs saved before it was replaced hold it) is read as the default, off."""
        if not isinstance(data, dict) or "tis_cap" not in data:
            return data
        if data["tis_cap"] is not None:
            raise ValueError(
                f"algorithm.tis_cap was replaced by algorithm.rollout_correction; tis_cap={data['tis_cap']} is "
                f"rollout_correction: {{level: token, mode: truncate, max: {data['tis_cap']}}}"
            )
        return {k: v for k, v in data.items() if k != "tis_cap"}

    @model_validator(mode="after")
    def _combinations(self) -> AlgoConfig:
        """- `importance_sampling_level: sequence` does not go with `policy_loss: cispo` (GSPO is `clip` with it).
        - `epsilon_low`, `epsilon_high` and `clip_ratio_c` keep their defaults unless `policy_loss` is `clip`.
        - `clip_ratio_c` is above `1 + epsilon_high` (below it, negative-advantage tokens inside the clip range
          would lose their gradient).
        - `cispo_max_ratio` keeps its default unless `policy_loss` is `cispo`.
        - `sapo_temperature_pos` and `sapo_temperature_neg` keep their defaults unless `policy_loss` is `sapo`."""
        if self.importance_sampling_level == "sequence" and self.policy_loss == "cispo":
            raise ValueError(
                "algorithm.importance_sampling_level=sequence with policy_loss=cispo is not supported: CISPO weights "
                "each token's log-prob by that token's own clipped ratio (MiniMax-M1); for a sequence ratio use "
                "policy_loss=clip (GSPO)"
            )
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1 + self.epsilon_high:
            raise ValueError(
                f"algorithm.clip_ratio_c={self.clip_ratio_c:g} must be above 1 + epsilon_high = {1 + self.epsilon_high:g}: "
                "the dual clip bounds negative-advantage tokens beyond the clip range, not inside it"
            )
        # By value, not by "was it given": a dumped config (submit, checkpoints) holds every field.
        for field, loss in _LOSS_ONLY_FIELDS.items():
            value = getattr(self, field)
            if loss != self.policy_loss and value != type(self).model_fields[field].default:
                raise ValueError(
                    f"algorithm.{field}={value} is set but only policy_loss={loss} reads it "
                    f"(policy_loss={self.policy_loss})"
                    + (
                        "; CISPO's cap is algorithm.cispo_max_ratio (TRL's epsilon_high under loss_type=cispo)"
                        if self.policy_loss == "cispo" and field == "epsilon_high"
                        else ""
                    )
                )
        return self


class MultiTurnConfig(_Section):
    """Multi-turn rollouts: the model writes, an environment (or a tool) answers, the model writes
    again. ``algorithm.max_completion_length`` bounds the model's tokens over all turns together."""

    env: str | None = Field(
        None,
        description="`module:factory`; `factory(row)` returns one environment per trajectory (reset(), step(text), "
        "optional close(); see grpo_dist.envs). Exactly one of env and tools.",
    )
    tools: list[str] = Field(
        default_factory=list,
        description="`module:function` paths offered to the model as tools (schemas from signatures and "
        "docstrings); a turn without a tool call ends the episode.",
    )
    tools_prompt: Literal["template", "system"] = Field(
        "template",
        description="How the model learns of the tools: `template` passes them to the chat template's `tools=` "
        "(Qwen2.5 and others); `system` puts their schemas and the call format in a system message, for templates "
        "that take no tools (SmolLM2, the tiny model).",
    )
    max_turns: int = Field(4, ge=1, description="Model turns per trajectory.")
    max_tokens_per_turn: int = Field(
        128, ge=1, description="Tokens of one model turn (also cut to what is left of the trajectory's budget)."
    )
    max_env_tokens_per_turn: int = Field(
        256,
        ge=1,
        description="Tokens of one environment turn (its messages and the chat template's boundary tokens); longer "
        "messages are cut, in tokens, and counted.",
    )
    tool_timeout_s: float = Field(10.0, gt=0, description="Bound on one tool call (or one environment step).")
    episode_timeout_s: float = Field(
        120.0, gt=0, description="Bound on one trajectory's environment time; past it the episode stops (`timeout`)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> MultiTurnConfig:
        """- Exactly one of `env` and `tools` is given.
        - `tools_prompt` keeps its default with `env` (by value: a dumped config holds every field)."""
        if (self.env is None) == (not self.tools):
            raise ValueError("rollout.multi_turn needs exactly one of env (an environment factory) and tools")
        if self.env is not None and self.tools_prompt != type(self).model_fields["tools_prompt"].default:
            raise ValueError("rollout.multi_turn.tools_prompt applies to tools, not to an env")
        return self


class RolloutConfig(_Section):
    num_workers: int = Field(1, ge=1, description="Rollout actors, each owning one vLLM engine.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM TP size per worker (GPU).")
    gpu_memory_utilization: float = Field(
        0.85,
        gt=0,
        le=1,
        description="vLLM's gpu_memory_utilization: the fraction of its GPU(s) memory an engine may take for "
        "weights, activations and KV cache. GPU only; on CPU the KV cache is cpu_kvcache_space_gib.",
    )
    cpu_kvcache_space_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE per worker on CPU.")
    cpu_threads_per_worker: int = Field(1, ge=1, description="OMP threads (and cores bound) per worker on CPU.")
    max_model_len: int | None = Field(None, description="Defaults to max_prompt_length + max_completion_length.")
    enforce_eager: bool = Field(
        True,
        description="vLLM's enforce_eager: run the model eagerly, without capturing CUDA graphs (faster engine "
        "start, slower decoding on GPU).",
    )
    block_size: int | None = Field(
        None,
        ge=1,
        description="Tokens per KV-cache block. Prefix caching shares whole blocks only, so the G "
        "completions of a prompt share its first floor(P / block_size) blocks. None: 32 on CPU (vLLM-CPU's own "
        "default, 128, shares nothing of a prompt shorter than 128 tokens; its attention needs multiples of 32), "
        "vLLM's default on GPU.",
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        16, description="vLLM's max_lora_rank (its allowed values); must hold model.lora.rank with lora.sync=adapter."
    )
    seed: int = Field(
        0,
        description="vLLM's engine seed and the base of the per-request sampling seeds (distinct for every prompt "
        "and call); evaluations use trainer.seed instead.",
    )
    generate_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Bound (s) on generating one batch, from its submission (prompts re-issued after a worker "
        "failure get a fresh one), and on starting an engine; past it the run fails.",
    )
    multi_turn: MultiTurnConfig | None = Field(None, description="Multi-turn episodes with an environment or tools.")
    streaming: bool = Field(
        False,
        description="Continuous generation: each worker keeps its engine full from a queue of groups (stepping vLLM's "
        "engine itself instead of one blocking call per batch) and a step trains on the first "
        "trainer.prompts_per_step groups to complete, in completion order; the driver keeps up to "
        "(trainer.max_staleness + 1) * trainer.prompts_per_step groups in flight. Needs trainer.max_staleness >= 1.",
    )
    in_flight_updates: bool = Field(
        True,
        description="With streaming: a weight update is applied between two engine steps and the running requests "
        "continue under the new weights (their KV cache recomputed), each token recording the version that "
        "sampled it. False: an update waits for the running requests, which finish on the version they started "
        "with (one version per row), and no request starts meanwhile.",
    )


class LearnerConfig(_Section):
    num_ranks: int = Field(2, ge=1, description="Data-parallel DeepSpeed ranks (one Ray actor each).")
    zero_stage: Literal[2, 3] = Field(
        2,
        description="DeepSpeed ZeRO stage: 2 shards the optimizer state and gradients over the ranks, 3 also the "
        "parameters (and the reference model the same way).",
    )
    micro_batch_size: int = Field(
        4, ge=1, description="Rows per rank per forward/backward, unless max_tokens_per_micro_batch is set."
    )
    optimizer_steps_per_batch: int = Field(
        1, ge=1, description="Mini-batches (optimizer steps) each rollout batch is split into, per iteration."
    )
    lr: float = Field(1e-5, gt=0, description="Peak learning rate of the AdamW optimizer (DeepSpeed's, torch's AdamW).")
    warmup_steps: int = Field(
        0,
        ge=0,
        description="Optimizer steps (not GRPO steps) of linear warmup, from lr/(warmup_steps+1) up to lr.",
    )
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant",
        description="LR after warmup: constant, or cosine/linear decay to 0 at the last optimizer step "
        "(trainer.steps * optimizer_steps_per_batch * algorithm.num_iterations).",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    adam_betas: tuple[float, float] = Field(
        (0.9, 0.99), description="AdamW's (beta1, beta2): decay rates of the first and second moment estimates."
    )
    adam_eps: float = Field(1e-8, gt=0, description="AdamW's epsilon, added to the root of the second moment.")
    max_grad_norm: float = Field(
        1.0, gt=0, description="Clip the gradients' global L2 norm to this (DeepSpeed's gradient_clipping)."
    )
    ref_sync_every: int | None = Field(
        None, ge=1, description="TRL sync_ref_model: refresh the reference every K steps."
    )
    ref_sync_alpha: float = Field(1.0, gt=0, le=1, description="ref <- alpha*policy + (1-alpha)*ref at each refresh.")
    weight_sync_bucket_mb: float = Field(64.0, gt=0, description="Max bucket size of one weight broadcast.")
    logits_chunk_tokens: int | None = Field(
        2048,
        ge=1,
        description="Completion tokens whose [tokens, vocab] logits exist at once (recomputed in "
        "backward); None = one pass per micro-batch, keeping its logits for backward.",
    )
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="Token budget per rank per forward/backward: the positions a micro-batch's padded "
        "forward computes (unique prompts x the longest prompt + rows x the longest completion with "
        "shared_prompt_forward, else rows x the longest row); None = micro_batch_size rows each.",
    )
    shared_prompt_forward: bool = Field(
        True,
        description="Forward each prompt once per micro-batch and its rows' completions on top of its key/value "
        "cache (the G rows of a group share it), instead of every row's prompt + completion: the same log-probs "
        "and gradients for (G-1) fewer prompt passes per group. A rank's rows are dealt group by group.",
    )


class TrainerConfig(_Section):
    steps: int = Field(20, ge=1, description="GRPO steps (one rollout batch each).")
    prompts_per_step: int = Field(16, ge=1, description="Unique prompts per step; rows = prompts_per_step * G.")
    sync_every: int = Field(1, ge=1, description="Broadcast weights to rollout workers every N steps.")
    max_staleness: int = Field(
        0,
        ge=0,
        description="0 = on-policy; k >= 1 = async, batches at most k versions old (with rollout.streaming: every "
        "trained token sampled at most k versions before the learner's).",
    )
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Also evaluate every N steps; an evaluation before the first step and one after the last "
        "always run (None: only those).",
    )
    eval_num_prompts: int = Field(
        200, ge=1, description="Held-out prompts evaluated: the first N rows of data.test_split."
    )
    eval_num_samples: int = Field(1, ge=1, description="k samples per eval prompt (1 + temperature 0 = greedy).")
    eval_temperature: float = Field(0.0, ge=0, description="Sampling temperature of the evaluations; 0 = greedy.")
    seed: int = Field(
        0,
        description="Seed of the training prompts' order (epoch e visits every row in a permutation seeded by "
        "seed + e) and of the evaluations' sampling.",
    )
    output_dir: str = Field(
        "runs/default",
        description="Run directory: config.yaml, metrics.jsonl, prompts.jsonl, eval.jsonl, summary.json, training.png, "
        "grpo-dist.log, tensorboard/ and by default checkpoints/; one job at a time (a lock file).",
    )


class CheckpointConfig(_Section):
    save_every: int | None = Field(None, ge=1, description="Save every N steps (None: only at the end).")
    save_at_end: bool = Field(
        True,
        description="Save after the last step (unless save_every just did); this or save_every also saves when "
        "the job is stopped (Ctrl-C, `ray job stop`).",
    )
    dir: str | None = Field(None, description="Defaults to <output_dir>/checkpoints.")
    keep_last: int = Field(
        2,
        ge=1,
        description="Checkpoints kept: after each save older `step-*` directories are deleted, never the one "
        "`latest` names.",
    )


class LoggingConfig(_Section):
    jsonl: bool = Field(
        True, description="Append each step's metrics to `<output_dir>/metrics.jsonl` (eval.jsonl is always written)."
    )
    tensorboard: bool = Field(
        True, description="Write the step and evaluation metrics as TensorBoard scalars to `<output_dir>/tensorboard`."
    )
    progress_bar: bool = Field(True, description="Show a tqdm progress bar of the steps, with ETA.")
    ray_metrics: bool = Field(
        True,
        description="Export each step's metrics as `ray.util.metrics` gauges (Ray dashboard, Prometheus) through a "
        "named actor on the head node.",
    )
    log_completions: int = Field(2, ge=0, description="Sample completions printed per step.")


# Ray's label selector syntax: a value, its negation, or a set ("in(a, b)", "!in(a,b)").
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_LABEL_VALUE = re.compile(rf"!?in\({_LABEL}(, ?{_LABEL})*\)|!?{_LABEL}")


class ClusterConfig(_Section):
    address: str | None = Field(None, description="Ray address; None starts a local head (with dashboard).")
    num_cpus_per_rollout: float = Field(
        1.0,
        gt=0,
        description="Ray logical CPUs reserved per rollout worker (scheduling only; its engine's threads are "
        "rollout.cpu_threads_per_worker).",
    )
    num_gpus_per_rollout: float = Field(
        0.0, ge=0, description="Ray GPUs per rollout worker: rollout.tensor_parallel_size on GPU, 0 on CPU."
    )
    num_cpus_per_learner: float = Field(
        1.0, gt=0, description="Ray logical CPUs per learner rank (its placement-group bundle)."
    )
    num_gpus_per_learner: float = Field(0.0, ge=0, description="Ray GPUs per learner rank: 1 on GPU, 0 on CPU.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement-group strategy of the learner ranks (one bundle each); the rollout workers are "
        "placed one by one, without a placement group.",
    )
    learner_label_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels the nodes of the learner ranks must have, e.g. {'ray.io/accelerator-type': "
        "'H100'} (Ray sets it on GPU nodes) or {'grpo-role': 'learner'} (`ray start --labels grpo-role=learner`). "
        "Values use Ray's selector syntax: 'v', '!v', 'in(a,b)', '!in(a,b)'. Empty: any node.",
    )
    rollout_label_selector: dict[str, str] = Field(
        default_factory=dict, description="The same for the rollout workers' nodes."
    )
    connect_timeout_s: float = Field(
        30.0, gt=0, description="How long `cluster.address` may take to answer before the run is refused."
    )
    rpc_timeout_s: float = Field(600.0, gt=0, description="Bound on any single actor call.")
    collective_timeout_s: float = Field(300.0, gt=0, description="torch.distributed / weight-sync timeout.")
    max_worker_restarts: int = Field(
        3,
        ge=0,
        description="Times Ray restarts a dead rollout worker (Ray's max_restarts); it gets the current weights "
        "before it generates again. A lost learner rank is not restarted: the job fails (continue with --resume).",
    )

    @field_validator("learner_label_selector", "rollout_label_selector")
    @classmethod
    def _selector_syntax(cls, v: dict[str, str]) -> dict[str, str]:
        """- Every key of `learner_label_selector` and `rollout_label_selector` is non-empty.
        - Every value is `v`, `!v`, `in(a,b,...)` or `!in(a,b,...)`, each label 1 to 63 letters, digits, `_`, `.`
          or `-`, beginning and ending with a letter or digit."""
        for key, value in v.items():
            if not key or not _LABEL_VALUE.fullmatch(value):
                raise ValueError(f"label {key!r}: {value!r} is not 'v', '!v', 'in(a,b,...)' or '!in(a,b,...)'")
        return v


class Config(_Section):
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="The policy: its checkpoint, tokenizer, dtype and optional LoRA adapter.",
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="The prompts: their source and splits, their columns, and how a question becomes a prompt.",
    )
    rewards: RewardsConfig = Field(
        default_factory=RewardsConfig, description="The reward functions scoring each completion, and their weights."
    )
    algorithm: AlgoConfig = Field(
        default_factory=AlgoConfig,
        description="Group size, policy loss, advantages, KL penalty and sampling; read by the engines and the learner.",
    )
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig,
        description="The rollout workers: one vLLM engine each, its memory and timeouts, and multi-turn episodes.",
    )
    learner: LearnerConfig = Field(
        default_factory=LearnerConfig,
        description="The DeepSpeed learner group: ranks, batch split, optimizer, reference model and weight sync.",
    )
    trainer: TrainerConfig = Field(
        default_factory=TrainerConfig,
        description="The training loop: steps, prompts per step, weight sync and staleness, evaluation, seed, "
        "run directory.",
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="When checkpoints are saved, where, and how many are kept."
    )
    logging: LoggingConfig = Field(
        default_factory=LoggingConfig,
        description="What a run records and shows: metrics files, TensorBoard, progress bar, Ray metrics, samples.",
    )
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig,
        description="The Ray cluster: its address, resources per actor, node labels, placement, timeouts and restarts.",
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        """- The rows of a step, `trainer.prompts_per_step * algorithm.num_generations`, divide evenly by
          `learner.num_ranks * learner.micro_batch_size * learner.optimizer_steps_per_batch` (without
          `learner.micro_batch_size` when `learner.max_tokens_per_micro_batch` is set).
        - `learner.max_tokens_per_micro_batch`, when set, and `rollout.max_model_len`, when set, hold the longest
          possible row: `data.max_prompt_length + algorithm.max_completion_length`, plus
          `rollout.multi_turn.max_turns * rollout.multi_turn.max_env_tokens_per_turn` with multi-turn episodes.
        - `trainer.sync_every - 1` is at most `trainer.max_staleness`.
        - `algorithm.dynamic_sampling` needs `trainer.max_staleness: 0`.
        - With `rollout.tensor_parallel_size` above 1 or any GPU per rollout worker, `cluster.num_gpus_per_rollout`
          equals `rollout.tensor_parallel_size` (whole GPUs, one per engine process).
        - On CPU (`cluster.num_gpus_per_rollout: 0`), `rollout.block_size`, when set, is a multiple of 32.
        - `cluster.num_gpus_per_learner` is 0 or 1.
        - The learner and the rollout workers are both on GPU or both on CPU.
        - With `model.lora` and `sync: adapter`, `model.lora.rank` is at most `rollout.max_lora_rank`.
        - `learner.ref_sync_every` is not set with `model.lora`, nor with `algorithm.beta: 0`.
        - `model.gradient_checkpointing` needs `learner.shared_prompt_forward: false`.
        - With `rollout.multi_turn`, `rollout.generate_timeout_s` is above `rollout.multi_turn.episode_timeout_s`.
        - `rewards.functions` lists at least one function, unless `rewards.models` or `rollout.multi_turn.env`
          gives the rewards.
        - `rollout.streaming` needs `trainer.max_staleness` of at least 1 and single-turn rows (no
          `rollout.multi_turn`)."""
        rows = self.trainer.prompts_per_step * self.algorithm.num_generations
        ln = self.learner
        # A token budget packs each rank's rows of a mini-batch itself: no whole row micro-batches are needed.
        by_rows = ln.max_tokens_per_micro_batch is None
        per_opt = ln.num_ranks * (ln.micro_batch_size if by_rows else 1) * ln.optimizer_steps_per_batch
        if rows % per_opt:
            raise ValueError(
                f"trainer.prompts_per_step * algorithm.num_generations = {rows} rows per step is not divisible by "
                f"learner.num_ranks * {'learner.micro_batch_size * ' if by_rows else ''}"
                f"learner.optimizer_steps_per_batch = {per_opt}"
            )
        longest = self.data.max_prompt_length + self.max_completion_tokens
        if not by_rows and ln.max_tokens_per_micro_batch < longest:
            raise ValueError(
                f"learner.max_tokens_per_micro_batch={ln.max_tokens_per_micro_batch} is below the longest possible "
                f"row, data.max_prompt_length + {self._completion_terms} = {longest}"
            )
        if longest > self.max_model_len:
            raise ValueError(
                f"rollout.max_model_len={self.rollout.max_model_len} is shorter than data.max_prompt_length + "
                f"{self._completion_terms} = {longest}"
            )
        if self.trainer.sync_every - 1 > self.trainer.max_staleness:
            raise ValueError(
                f"trainer.sync_every={self.trainer.sync_every} lets batches be {self.trainer.sync_every - 1} weight "
                f"versions old, more than trainer.max_staleness={self.trainer.max_staleness} allows"
            )
        if self.algorithm.dynamic_sampling and self.trainer.max_staleness:
            raise ValueError("algorithm.dynamic_sampling tops batches up on-policy; it needs trainer.max_staleness=0")
        if self.rollout.streaming:
            if self.trainer.max_staleness < 1:
                raise ValueError(
                    "rollout.streaming trains on groups as they complete, while later ones are generated: it needs "
                    "trainer.max_staleness >= 1 (the oldest token a trained row may hold, in weight versions)"
                )
            if self.rollout.multi_turn is not None:
                raise ValueError("rollout.streaming generates single-turn rows; it cannot run rollout.multi_turn")
        tp, gpus = self.rollout.tensor_parallel_size, self.cluster.num_gpus_per_rollout
        # A fraction of a GPU would put two engines (and two ranks of one NCCL weight-sync group,
        # which NCCL refuses) on one device.
        if (tp > 1 or gpus > 0) and gpus != tp:
            raise ValueError(
                f"rollout.tensor_parallel_size={tp} runs {tp} engine process(es), one per whole GPU, inside each "
                f"rollout actor: cluster.num_gpus_per_rollout must be {tp}, got {gpus:g}"
            )
        bs = self.rollout.block_size
        if gpus == 0 and bs is not None and bs % 32:
            raise ValueError(f"rollout.block_size={bs}: vLLM-CPU's attention takes blocks of a multiple of 32 tokens")
        learner_gpus = self.cluster.num_gpus_per_learner
        if learner_gpus not in (0, 1):
            raise ValueError(
                f"cluster.num_gpus_per_learner={learner_gpus:g}: a learner rank drives exactly one whole GPU (a "
                "fraction puts two ranks of one NCCL group on a device, more leaves GPUs idle); use 1, or 0 on CPU"
            )
        if (gpus > 0) != (learner_gpus > 0):
            raise ValueError(
                f"cluster.num_gpus_per_rollout={gpus:g} with cluster.num_gpus_per_learner={learner_gpus:g}: the learner "
                "and the rollout engines must both be on GPU or both on CPU (the weight sync is NCCL or gloo on both "
                f"sides, and model.dtype={self.model.dtype} must resolve to the same dtype on both)"
            )
        lora = self.model.lora
        if lora is not None and lora.sync == "adapter" and lora.rank > self.rollout.max_lora_rank:
            raise ValueError(
                f"model.lora.rank={lora.rank} is above rollout.max_lora_rank={self.rollout.max_lora_rank}: the engines "
                "could not serve the adapter (raise rollout.max_lora_rank, or use model.lora.sync=merged)"
            )
        if lora is not None and self.learner.ref_sync_every is not None:
            raise ValueError(
                "learner.ref_sync_every with model.lora: the reference is the base model with the adapter switched off, "
                "so refreshing it would mean merging the adapter into the base weights; not supported"
            )
        if self.model.gradient_checkpointing and self.learner.shared_prompt_forward:
            raise ValueError(
                "model.gradient_checkpointing with learner.shared_prompt_forward: transformers runs checkpointed layers "
                "without a key/value cache in training, so the completions would not see their prompt; set "
                "learner.shared_prompt_forward=false to use gradient checkpointing"
            )
        mt = self.rollout.multi_turn
        if mt is not None and self.rollout.generate_timeout_s <= mt.episode_timeout_s:
            raise ValueError(
                f"rollout.generate_timeout_s={self.rollout.generate_timeout_s:g} bounds a whole batch of episodes, so it "
                f"must exceed rollout.multi_turn.episode_timeout_s={mt.episode_timeout_s:g}"
            )
        if not self.rewards.functions and not self.rewards.models and (mt is None or mt.env is None):
            raise ValueError(
                "rewards.functions must list at least one reward function (only served reward models, "
                "rewards.models, or an environment's own rewards, rollout.multi_turn.env, can stand alone)"
            )
        if self.learner.ref_sync_every is not None and self.algorithm.beta == 0:
            raise ValueError("learner.ref_sync_every is set but algorithm.beta=0 means no reference model is used")
        return self

    @property
    def max_completion_tokens(self) -> int:
        """The longest completion a row can have: the model's tokens, plus with multi-turn episodes the
        environment turns (one before the first model turn, one after each but the last)."""
        mt = self.rollout.multi_turn
        env = 0 if mt is None else mt.max_turns * mt.max_env_tokens_per_turn
        return self.algorithm.max_completion_length + env

    @property
    def _completion_terms(self) -> str:
        if self.rollout.multi_turn is None:
            return "algorithm.max_completion_length"
        return "algorithm.max_completion_length + rollout.multi_turn.max_turns * rollout.multi_turn.max_env_tokens_per_turn"

    @property
    def max_model_len(self) -> int:
        return self.rollout.max_model_len or (self.data.max_prompt_length + self.max_completion_tokens)

    @property
    def rows_per_step(self) -> int:
        return self.trainer.prompts_per_step * self.algorithm.num_generations

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per rank per optimizer step, which seeds the DeepSpeed config. With
        ``learner.max_tokens_per_micro_batch`` the learner sets it per optimizer step from the rows'
        lengths, so the seed is 1."""
        ln = self.learner
        if ln.max_tokens_per_micro_batch is not None:
            return 1
        return self.rows_per_step // (ln.num_ranks * ln.micro_batch_size * ln.optimizer_steps_per_batch)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.trainer.output_dir) / "checkpoints")


class ConfigError(UserError):
    """A configuration is invalid; the message names the field(s)."""


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not in the schema)"
        lines.append(f"{loc}: {msg}")
    return "invalid config: " + one_line(lines)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error as ``line L, column C: what`` (1-based, where the parser noticed it)."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{what}" + (f" ({context})" if context else "")


def _parse_scalar(text: str) -> Any:
    # YAML scalar parsing so `--set algorithm.beta=0` gives 0 (int) and `x=null` gives None.
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a raw config dict (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node = child
        try:
            node[parts[-1]] = _parse_scalar(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not YAML ({_yaml_problem(e)})") from None
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or defaults if ``path`` is None), apply overrides, validate. Raises ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: {_yaml_problem(e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at top level, got {type(loaded).__name__}")
        raw = loaded
    raw = apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
