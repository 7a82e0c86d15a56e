"""Checks that need the file system, the device or the network, run before any cluster resource
is touched.

The schema (``grpo_dist.config``) checks shapes and arithmetic; this checks the world: that the
model directory holds a model and a tokenizer this vLLM build can serve, that the reward functions
import with the right signature, that the output directory can be written and that the cluster
answers. Each failure names the config field and says what to do; all failures of one call come
back together in one line (``UserError``).

Checks run where the thing lives: ``where="submit"`` checks only what the submitting machine
uploads (the schema and the code, i.e. reward imports); paths, models, data and devices are the
cluster's and are checked by the job's own preflight there (``where="local"``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Literal

from grpo_dist.config import Config, ConfigError
from grpo_dist.errors import UserError, first_line, one_line

# vLLM's CPU attention backend only has kernels for these head sizes.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.pt")
# Any one of these makes a directory loadable by AutoTokenizer (fast, sentencepiece, BPE files).
# Logged by `grpo-dist run` once every check that can be made before Ray starts has passed (a
# submitted job's log line that `grpo-dist submit` waits for).
PREFLIGHT_PASSED = "preflight passed"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def is_hub_id(text: str) -> bool:
    """``owner/name`` that is not meant as a local path (``runs/x``, ``./x`` and ``/x`` are)."""
    return bool(_HF_REPO_ID.match(text)) and not text.startswith(("runs/", "./", "../", "/"))


def model_head_dim(model_dir: Path) -> int | None:
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        return None
    c = json.loads(cfg_file.read_text())
    if c.get("head_dim"):
        return int(c["head_dim"])
    if c.get("hidden_size") and c.get("num_attention_heads"):
        return int(c["hidden_size"]) // int(c["num_attention_heads"])
    return None


def has_tokenizer_files(tok_dir: Path) -> bool:
    return any((tok_dir / f).is_file() for f in TOKENIZER_FILES)


def has_chat_template(tok_dir: Path) -> bool:
    """Whether the tokenizer directory carries a chat template (its own file or in its config)."""
    if (tok_dir / "chat_template.jinja").is_file() or (tok_dir / "chat_template.json").is_file():
        return True
    tc = tok_dir / "tokenizer_config.json"
    return tc.is_file() and bool(json.loads(tc.read_text()).get("chat_template"))


def cpu_fp16_supported() -> bool:
    """DeepSpeed's CPU accelerator's own test (``is_fp16_supported``): oneDNN float16 on this CPU."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:
        return False


def _model_problems(cfg: Config, cuda: bool) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    notes: list[str] = []
    path = Path(cfg.model.path)
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            problems.append(
                f"model.path={cfg.model.path!r} is a LoRA adapter, not a model: merge it first "
                f"(`grpo-dist export-merged {cfg.model.path} --out DIR`) or set model.path to its base "
                "and model.lora"
            )
        elif not (path / "config.json").is_file():
            problems.append(f"model.path={cfg.model.path!r} is a directory without config.json (not an HF model)")
        elif not any(next(path.glob(g), None) for g in WEIGHT_FILES):
            problems.append(
                f"model.path={cfg.model.path!r} has config.json but no weights (*.safetensors or pytorch_model*.bin)"
            )
        else:
            hd = model_head_dim(path)
            # The engines run on CPU where this machine has no CUDA and the config gives them no GPU.
            if not (cuda or cfg.cluster.num_gpus_per_rollout) and hd and hd not in VLLM_CPU_HEAD_SIZES and hd < 128:
                problems.append(
                    f"model.path={cfg.model.path!r} has head_dim {hd}; vLLM-CPU supports {list(VLLM_CPU_HEAD_SIZES)}"
                )
            problems += _contradictions(cfg, path)
            hf, why = _hf_config(cfg)
            if why:
                problems.append(why)
            else:
                problems += _tokenizer_problems(cfg)
                if cfg.model.lora is not None or cfg.model.gradient_checkpointing:
                    problems += _meta_model_problems(cfg, hf)
                if cfg.learner.shared_prompt_forward and (why := _shared_prompt_problem(cfg, hf)):
                    problems.append(why)
    elif is_hub_id(cfg.model.path):
        notes.append(f"model.path={cfg.model.path!r} is not a local directory; it is resolved as a hub id")
    else:
        problems.append(
            f"model.path={cfg.model.path!r} does not exist (run `grpo-dist get-model` or "
            "`grpo-dist make-tiny-model --out ...`?)"
        )
    field = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path"
    tok = Path(cfg.model.tokenizer_path or cfg.model.path)
    if tok.is_dir():
        if not has_tokenizer_files(tok):
            problems.append(
                f"{field}={str(tok)!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                "save the tokenizer there or set model.tokenizer_path"
            )
        elif cfg.data.use_chat_template and not has_chat_template(tok):
            problems.append(
                f"data.use_chat_template=true but the tokenizer at {field}={str(tok)!r} has no chat "
                "template; set data.use_chat_template=false to feed plain-text prompts"
            )
    elif cfg.model.tokenizer_path and not is_hub_id(cfg.model.tokenizer_path):
        problems.append(f"model.tokenizer_path={cfg.model.tokenizer_path!r} does not exist")
    return problems, notes


# Where vLLM reads a model's context (vllm/transformers_utils/model_arch_config_convertor.py,
# derive_max_model_len_and_key): the smallest of these keys, unless config.json sets model_max_length.
_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_target_positions")
_LENGTH_KEYS += ("max_sequence_length", "max_seq_length", "seq_len")
# Model types vLLM refuses to run in float16 (vllm/config/model.py, _FLOAT16_NOT_SUPPORTED_MODELS).
VLLM_NO_FLOAT16 = ("gemma2", "gemma3", "gemma3_text", "glm4")
# Mixture-of-experts models (these config.json keys): their intermediate_size is not checked against TP.
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def _model_json(model_dir: Path) -> tuple[dict, dict]:
    """config.json and its language model's part (multimodal configs nest it as text_config)."""
    top = json.loads((model_dir / "config.json").read_text())
    return top, top.get("text_config", top)


def _contradictions(cfg: Config, model_dir: Path) -> list[str]:
    """What the config asks that the model's config.json rules out; each otherwise fails only inside
    a rollout worker's engine start (vLLM's own checks and asserts)."""
    problems = []
    top, mc = _model_json(model_dir)
    where = f"model.path={cfg.model.path!r}"
    rope = mc.get("rope_parameters") or mc.get("rope_scaling") or {}
    # With rope scaling the engine derives a longer context; only the plain case is checked here.
    scaled = rope.get("rope_type", rope.get("type", "default")) not in ("default", None)
    limits = [(mc["model_max_length"], "model_max_length")] if mc.get("model_max_length") else []
    limits = limits or sorted((mc[k], k) for k in _LENGTH_KEYS if isinstance(mc.get(k), int))
    if limits and not scaled and cfg.max_model_len > limits[0][0]:
        how = (
            "rollout.max_model_len"
            if cfg.rollout.max_model_len
            else f"data.max_prompt_length + {cfg._completion_terms}"
        )
        problems.append(
            f"{how} = {cfg.max_model_len} is beyond the {limits[0][0]} positions of {where} "
            f"({limits[0][1]} in its config.json)"
        )
    heads, kv, tp = mc.get("num_attention_heads"), mc.get("num_key_value_heads"), cfg.rollout.tensor_parallel_size
    if heads and heads % tp:
        problems.append(
            f"rollout.tensor_parallel_size={tp} does not divide the {heads} attention heads of "
            f"{where} (num_attention_heads in its config.json)"
        )
    # vLLM splits the key/value heads over the ranks, or replicates each over tp/kv of them.
    if kv and (kv % tp if tp < kv else tp % kv):
        problems.append(
            f"rollout.tensor_parallel_size={tp} neither divides nor is a multiple of the {kv} key/value heads of "
            f"{where} (num_key_value_heads in its config.json)"
        )
    inter = mc.get("intermediate_size")
    if isinstance(inter, int) and inter % tp and not any(k in mc for k in _MOE_KEYS):
        problems.append(
            f"rollout.tensor_parallel_size={tp} does not divide the {inter} MLP channels of {where} "
            "(intermediate_size in its config.json)"
        )
    no_fp16 = sorted({top.get("model_type"), mc.get("model_type")} & set(VLLM_NO_FLOAT16))
    if cfg.model.dtype == "float16" and no_fp16:
        problems.append(
            f"model.dtype=float16 but {where} is a {no_fp16[0]!r} model (model_type in its config.json), which "
            "vLLM refuses to run in float16 (numerically unstable); use bfloat16 or float32"
        )
    return problems


def _load_refusal(field: str, value: str, file: str, e: Exception, trust: bool) -> str:
    f = Path(value) / file
    if not trust and f.is_file() and "auto_map" in json.loads(f.read_text()):
        return (
            f"model.trust_remote_code=false but {field}={value!r} ships its own code (auto_map in its {file}), "
            "which transformers and vLLM run only with model.trust_remote_code=true (set it if you trust that code)"
        )
    return f"{field}={value!r}: transformers cannot load its {file}: {first_line(e)}"


def _hf_config(cfg: Config):
    """(transformers' config of model.path, None), or (None, why it does not load)."""
    from transformers import AutoConfig

    trust = cfg.model.trust_remote_code
    try:
        return AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=trust), None
    except Exception as e:  # custom code, a model type this transformers lacks, a broken file
        return None, _load_refusal("model.path", cfg.model.path, "config.json", e, trust)


def _tokenizer_problems(cfg: Config) -> list[str]:
    """The tokenizer loads, fits the model's embedding, has a token the learner pads rows with, and
    its chat template renders the prompts the data will build (else: learner start, first step, data)."""
    tok_dir, trust = Path(cfg.model.tokenizer_path or cfg.model.path), cfg.model.trust_remote_code
    if not (tok_dir.is_dir() and has_tokenizer_files(tok_dir)):
        return []  # _model_problems names what is missing
    from transformers import AutoTokenizer

    field = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path"
    where = f"the tokenizer at {field}={str(tok_dir)!r}"
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust)
    except Exception as e:
        return [_load_refusal(field, str(tok_dir), "tokenizer_config.json", e, trust)]
    problems = []
    vocab, size = _model_json(Path(cfg.model.path))[1].get("vocab_size"), len(tok)
    if vocab and size > vocab:
        problems.append(
            f"{where} has {size} tokens but model.path={cfg.model.path!r} embeds {vocab} (vocab_size in its "
            f"config.json): token ids beyond {vocab - 1} have no embedding"
        )
    if tok.pad_token_id is None and tok.eos_token_id is None:
        problems.append(
            f"{where} has neither a pad token nor an eos token (pad_token, eos_token in its tokenizer_config.json), "
            "and the learner pads rows with one; set pad_token there"
        )
    if not (cfg.data.use_chat_template and getattr(tok, "chat_template", None)):
        return problems
    # The messages of grpo_dist.data.build_prompt: a system message when one is configured (or lists the tools).
    mt, system = cfg.rollout.multi_turn, cfg.data.system_prompt
    tools_system = mt is not None and bool(mt.tools) and mt.tools_prompt == "system"
    messages = [{"role": "system", "content": system or ""}] if system is not None or tools_system else []
    messages.append({"role": "user", "content": cfg.data.prompt_template.format(question="What is 2 + 3?")})
    try:
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja's TemplateError, e.g. raise_exception('System role not supported')
        if system is not None:
            side, fix = f"data.system_prompt={system!r}", "set data.system_prompt=null"
        elif tools_system:
            side, fix = (
                "rollout.multi_turn.tools_prompt=system (the tools in a system message)",
                "use tools_prompt=template",
            )
        else:
            side, fix = "data.use_chat_template=true", "set data.use_chat_template=false"
        what = "a system message" if messages[0]["role"] == "system" else "a user turn"
        problems.append(f"{side} but the chat template of {where} cannot render {what} ({first_line(e)}); {fix}")
    return problems


def _meta_model_problems(cfg: Config, hf) -> list[str]:
    """Gradient checkpointing and the LoRA targets against the model's modules, on a meta-device copy
    (no weights loaded); each otherwise fails at learner start or, for some targets, never syncs."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from grpo_dist.lora import check_target_modules, wrap

    # The layer types PEFT's LoRA takes (peft/tuners/lora/model.py: "Target module ... is not supported").
    nn = torch.nn
    peft_layers = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)
    where, lora = f"model.path={cfg.model.path!r}", cfg.model.lora
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=cfg.model.trust_remote_code)
    arch, problems = type(model).__name__, []
    if cfg.model.gradient_checkpointing and not model.supports_gradient_checkpointing:
        problems.append(
            f"model.gradient_checkpointing=true but {where} ({arch}) does not support it (transformers' "
            "supports_gradient_checkpointing); set model.gradient_checkpointing=false"
        )
    if lora is None:
        return problems
    try:
        check_target_modules(model, lora, where)
    except ValueError as e:
        return [*problems, str(e)]
    named = [(n.rsplit(".", 1)[-1], m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in lora.target_modules]
    # PEFT keeps an embedding's adapter as lora_embedding_A/B, which the weight sync (lora_A/B) never sends.
    if emb := sorted({t for t, m in named if isinstance(m, torch.nn.Embedding)}):
        problems.append(
            f"model.lora.target_modules: {emb} are embeddings in {where} ({arch}); grpo-dist syncs adapters of "
            "linear layers only: drop them"
        )
    head, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    tied = [t for t, m in named if m is head and head is not None and head.weight is inputs.weight]
    if tied and lora.sync == "merged":
        problems.append(
            f"model.lora.target_modules: {tied[0]!r} with model.lora.sync=merged, but {where} ties it to its input "
            f"embedding (tie_word_embeddings): the merged sync sends that shared weight once, without the adapter's "
            f"delta; drop {tied[0]!r}"
        )
    try:
        wrap(model, lora, cfg.model.path)
    except ValueError as e:  # PEFT: "Target module ... is not supported"
        odd = sorted({f"{t!r} ({type(m).__name__})" for t, m in named if not isinstance(m, peft_layers)})
        fit = sorted({t for t, m in named if isinstance(m, peft_layers)})
        problems.append(
            f"model.lora.target_modules: {', '.join(odd) or first_line(e)} in {where} ({arch}) cannot take a LoRA "
            f"adapter (PEFT adapts linear, embedding and convolution layers); of the targets, {fit} can"
        )
    return problems


def _shared_prompt_problem(cfg: Config, hf) -> str | None:
    from grpo_dist.forward import shared_prompt_refusal

    return shared_prompt_refusal(hf, cfg.data.max_prompt_length + cfg.max_completion_tokens, cfg.model.path)


def _writable_dir_problem(field: str, value: str) -> str | None:
    """Why ``value`` cannot be (created and) written as a directory, without creating anything."""
    p = Path(value).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{field}={value!r} cannot be created: {probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{field}={value!r} is not writable ({probe} refuses writes)"
    return None


def _reward_problems(cfg: Config) -> list[str]:
    from grpo_dist.rewards import build_reward_fns

    try:
        build_reward_fns(cfg.rewards.functions)  # imports each one and checks its signature
    except (ValueError, TypeError) as e:
        return [f"rewards.functions: {e}"]
    return []


def _served_model_problems(cfg: Config) -> list[str]:
    """Each served reward model's path is a local HF model; a classifier's checkpoint has a score head
    of one label (a causal LM loaded as a classifier gets a random head); a judge's answers are one
    token each in its tokenizer."""
    problems = []
    for m in cfg.rewards.models:
        field = f"rewards.models[{m.name}].path={m.path!r}"
        path = Path(m.path)
        if not (path / "config.json").is_file():
            problems.append(f"{field} is not a model directory (no config.json)")
            continue
        if not any(next(path.glob(g), None) for g in WEIGHT_FILES):
            problems.append(f"{field} has config.json but no weights (*.safetensors or pytorch_model*.bin)")
            continue
        hf = json.loads((path / "config.json").read_text())
        archs = hf.get("architectures") or []
        if not has_tokenizer_files(path):
            problems.append(f"{field} has no tokenizer files")
            continue
        if m.kind == "classifier":
            if not any(a.endswith("ForSequenceClassification") for a in archs):
                problems.append(
                    f"{field} is a {'/'.join(archs) or 'model'} checkpoint without a score head "
                    "(a classifier needs a *ForSequenceClassification checkpoint; loading this one would add a random head)"
                )
            elif (labels := len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2)) != 1:
                # transformers' default is 2 labels when config.json names none
                problems.append(f"{field} has {labels} labels; a reward classifier has one (a scalar score)")
            continue
        if archs and not any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
            problems.append(f"{field} is a {'/'.join(archs)} checkpoint; a judge is a causal language model")
            continue
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        for c in m.choices:
            ids = tok.encode(c, add_special_tokens=False)
            if len(ids) != 1:
                problems.append(
                    f"rewards.models[{m.name}].choices: {c!r} is {len(ids)} tokens in {m.path}'s tokenizer; each answer "
                    "must be one token"
                )
    return problems


def _multi_turn_code_problems(cfg: Config) -> list[str]:
    """The environment factory or the tools import, and every tool has a JSON schema."""
    from grpo_dist.envs.from_config import env_factory, tool_schemas

    try:
        env_factory(cfg.rollout.multi_turn)
        tool_schemas(cfg.rollout.multi_turn)
    except UserError as e:
        return [f"rollout.multi_turn: {e}"]
    return []


def _template_problems(cfg: Config) -> list[str]:
    """The chat template of a local tokenizer can carry multi-turn episodes: it is append-only (what
    the learner trains on is what the engine saw) and, with tools_prompt=template, renders the tools.
    A hub tokenizer is checked where the job runs (``notes`` say so when it is not reachable here)."""
    from transformers import AutoTokenizer

    from grpo_dist.envs.from_config import tool_schemas
    from grpo_dist.transcript import check_append_only, env_suffix_ids, template_takes_tools

    mt = cfg.rollout.multi_turn
    tok = AutoTokenizer.from_pretrained(
        cfg.model.tokenizer_path or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code
    )
    if not getattr(tok, "chat_template", None) or not cfg.data.use_chat_template:
        return ["rollout.multi_turn needs the tokenizer's chat template (and data.use_chat_template=true)"]
    problems = []
    in_template = mt.tools and mt.tools_prompt == "template"
    if in_template and not template_takes_tools(tok):
        problems.append(
            "rollout.multi_turn.tools: the chat template takes no tools= (SmolLM2's and the tiny model's do not); "
            "set rollout.multi_turn.tools_prompt=system to list them in a system message"
        )
    tools = tool_schemas(mt) if in_template else None
    # The roles the episodes will send: users (an env's feedback), tool results with tools; reasoning
    # in every model turn, which history-rewriting templates drop.
    convo = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>2 plus 3</think>It is 6."},
        {"role": "user", "content": "That is not right. Try again."},
        {"role": "assistant", "content": "<think>add again</think>It is 5."},
    ]
    if mt.tools:
        convo[2:2] = [
            {"role": "assistant", "content": "<think>ask</think><tool_call>{}</tool_call>"},
            {"role": "tool", "content": "5"},
        ]
    try:
        refusal = check_append_only(tok, tools=tools, conversation=convo)
        if refusal is None:
            # The smallest environment turn (after a model turn cut at its limit): template tokens only.
            empty = env_suffix_ids(
                tok, convo[:2], [{"role": "user", "content": ""}], model_turn_ended=False, tools=tools
            )
            if len(empty) > mt.max_env_tokens_per_turn:
                problems.append(
                    f"rollout.multi_turn.max_env_tokens_per_turn={mt.max_env_tokens_per_turn} is below the chat "
                    f"template's {len(empty)} tokens of an empty environment turn"
                )
    except ValueError as e:
        refusal = str(e)
    if refusal:
        problems.append(f"rollout.multi_turn: the chat template cannot carry episodes token for token: {refusal}")
    return problems


def preflight(cfg: Config, cuda: bool, where: Literal["local", "submit"] = "local") -> list[str]:
    """Raise ConfigError naming every problem (one line); return notes (e.g. what was assumed)."""
    problems = _reward_problems(cfg)
    env_problems = _multi_turn_code_problems(cfg) if cfg.rollout.multi_turn is not None else []
    problems += env_problems
    notes: list[str] = []
    if where == "submit":
        notes.append("model, data, output paths and devices are checked by the job's preflight on the cluster")
    else:
        mp, mn = _model_problems(cfg, cuda)
        problems += mp + _served_model_problems(cfg)
        notes += mn
        if cfg.rollout.multi_turn is not None and not (mp or env_problems):
            if Path(cfg.model.tokenizer_path or cfg.model.path).is_dir():
                problems += _template_problems(cfg)
            else:
                notes.append("rollout.multi_turn: the chat template of a hub tokenizer is not checked before launch")
        if not cuda and (cfg.cluster.num_gpus_per_rollout or cfg.cluster.num_gpus_per_learner):
            notes.append("GPUs requested per actor but this machine has no CUDA: the cluster must provide them")
        elif not cuda and cfg.model.dtype == "float16" and not cpu_fp16_supported():
            problems.append(
                "model.dtype=float16 but the learner runs on CPU (no CUDA here, cluster.num_gpus_per_learner=0) and "
                "DeepSpeed refuses fp16 on this CPU (oneDNN has no float16 on it); use float32 or bfloat16"
            )
        if cfg.data.source in ("gsm8k", "hf") and cfg.data.path and not Path(cfg.data.path).exists():
            if cfg.data.source == "hf" and is_hub_id(cfg.data.path):
                notes.append(f"data.path={cfg.data.path!r} is not a local path; it is loaded from the hub")
            else:
                problems.append(f"data.path={cfg.data.path!r} does not exist")
        for field, value in (("trainer.output_dir", cfg.trainer.output_dir), ("checkpoint.dir", cfg.checkpoint.dir)):
            if value is not None and (why := _writable_dir_problem(field, value)):
                problems.append(why)
    if problems:
        raise ConfigError("config rejected before launch: " + one_line(problems))
    return notes


# ---------------------------------------------------------------- the cluster


def ray_gcs_address(address: str) -> str | None:
    """The ``host:port`` a Ray address reaches, or None where Ray resolves it itself (``auto``,
    ``local``, ``ray://`` clients)."""
    if address in ("auto", "local") or "://" in address:
        return None
    return address if ":" in address else f"{address}:6379"


def check_reachable(
    address: str, timeout_s: float, field: str = "cluster.address", bound: str = "cluster.connect_timeout_s"
) -> None:
    """Raise UserError unless the Ray head at ``address`` accepts a TCP connection within
    ``timeout_s`` (retried: a head that is still starting is waited for)."""
    target = ray_gcs_address(address)
    if target is None:
        return
    host, _, port = target.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except (OSError, ValueError) as e:
            reason = e.strerror or type(e).__name__ if isinstance(e, OSError) else str(e)
            if time.monotonic() >= deadline:
                shown = address if target == address else f"{address} -> {target}"
                raise UserError(
                    f"{field}={shown!r}: no Ray head answers there within {timeout_s:.0f}s "
                    f"({reason}); start the cluster or fix the address "
                    f"({bound} bounds the wait)"
                ) from None
            time.sleep(0.5)
