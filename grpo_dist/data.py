"""Prompt datasets and the deterministic prompt sampler.

``load_split(data_cfg, tokenizer, split)`` reads one split from the configured source:

- ``synthetic``: ``grpo_dist.synthetic.make_split`` (train and test disjoint by construction);
  ``split`` must be ``data.train_split`` or ``data.test_split``.
- ``gsm8k``: ``<path>/<split>.jsonl`` (default: the MIT-licensed copy shipped in
  ``grpo_dist/assets/gsm8k``); the reference answer is the text after ``####``.
- ``hf``: any ``datasets``-loadable local data: a directory (splits from file names, e.g.
  ``train.jsonl``/``test.csv``, or a ``save_to_disk`` dataset) or a single json/jsonl/csv/parquet
  file (which then serves only ``data.train_split``); or a hub dataset id (``openai/gsm8k`` with
  ``hf_config: main``) where the hub is reachable.

Every row becomes ``{"prompt", "prompt_ids", "answer", "question"}``: the user turn is
``prompt_template`` filled with the question; ``prompt`` is the text fed to the model (the
tokenizer's chat template with the system prompt when ``use_chat_template`` and the tokenizer has
a template; otherwise ``system_prompt + "\\n\\n" + user turn``), ``prompt_ids`` its tokens.
Malformed rows are dropped with a count per reason (``PromptDataset.dropped``) and a logged
summary; a split left with fewer rows than asked for raises DataError naming the filter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from grpo_dist.config import Config, DataConfig
from grpo_dist.errors import UserError
from grpo_dist.preflight import is_hub_id

log = logging.getLogger(__name__)

_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SHIPPED_GSM8K = Path(__file__).resolve().parent / "assets" / "gsm8k"


class DataError(UserError):
    """A split cannot feed the run; the message names the field or the filter at fault."""


@dataclass
class PromptDataset:
    split: str
    source: str
    rows: list[dict[str, Any]]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


# ---------------------------------------------------------------- raw rows per source


def _synthetic_rows(cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    from grpo_dist.synthetic import make_split

    roles = {cfg.train_split: "train", cfg.test_split: "test"}
    if split not in roles:
        raise DataError(f"synthetic data has splits {sorted(roles)} (data.train_split/test_split), not {split!r}")
    s = cfg.synthetic
    return make_split(roles[split], s.num_train, s.num_test, s.seed, s.max_operand, list(s.ops))


def _read_jsonl(path: Path) -> Iterable[Any]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield {"__malformed__": f"{path.name}:{lineno}"}


def gsm8k_dir(cfg: DataConfig) -> Path:
    """``data.path``, or the GSM8K copy shipped with grpo-dist (MIT, train 7,473 / test 1,319 rows)."""
    return Path(cfg.path) if cfg.path else SHIPPED_GSM8K


def _gsm8k_rows(cfg: DataConfig, split: str) -> list[Any]:
    path = gsm8k_dir(cfg) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"gsm8k split {split!r}: {path} does not exist (data.path={cfg.path!r})")
    return list(_read_jsonl(path))


def _hf_rows(cfg: DataConfig, split: str) -> list[Any]:
    import datasets

    path = Path(cfg.path)
    if not path.exists():
        if not is_hub_id(cfg.path):
            raise DataError(f"data.path={cfg.path!r} does not exist")
        # A hub dataset (e.g. openai/gsm8k with hf_config=main), where the hub is reachable.
        return list(datasets.load_dataset(cfg.path, cfg.hf_config, split=split))
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"split {split!r} not in {path} (has {sorted(ds)})")
            ds = ds[split]
    elif path.is_dir():
        ds = datasets.load_dataset(str(path), split=split)
    else:
        builder = _HF_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"data.path={cfg.path!r}: unsupported file type; use one of {sorted(_HF_BUILDERS)}")
        if split != cfg.train_split:
            raise DataError(
                f"data.path={cfg.path!r} is a single file, which serves only split {cfg.train_split!r}; "
                f"for split {split!r} point data.path at a directory with one file per split"
            )
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    return list(ds)


_SOURCES = {"synthetic": _synthetic_rows, "gsm8k": _gsm8k_rows, "hf": _hf_rows}


# ---------------------------------------------------------------- row -> prompt


def build_prompt(
    question: str,
    tokenizer: Any,
    system_prompt: str | None,
    use_chat_template: bool,
    tools: PromptTools | None = None,
) -> tuple[str, list[dict] | None]:
    """(prompt text, its chat messages, or None when no chat template was applied).

    ``tools`` (multi-turn tool calling) go to the chat template's ``tools=``, or with
    ``mode="system"`` into a system message that lists them and the call format."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        system = system_prompt
        if tools is not None and tools.mode == "system":
            from grpo_dist.envs.tools import tools_system_prompt

            system = tools_system_prompt(tools.schemas, system_prompt or "")
        # With no system message some templates insert their own default (SmolLM2's does); a
        # configured system prompt, even "", replaces it.
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": question}
        ]
        in_template = tools.schemas if tools is not None and tools.mode == "template" else None
        text = tokenizer.apply_chat_template(messages, tools=in_template, tokenize=False, add_generation_prompt=True)
        return text, messages
    if tools is not None:
        raise DataError("tools need a chat template (data.use_chat_template and a tokenizer that has one)")
    return (f"{system_prompt}\n\n{question}" if system_prompt else question), None


@dataclass(frozen=True)
class PromptTools:
    """Tools offered to the model in its prompt: their JSON schemas, through the chat template's
    ``tools=`` (``mode="template"``) or a system message (``mode="system"``)."""

    schemas: list[dict]
    mode: str


def _reference(raw: Any, source: str) -> str | None:
    if raw is None:
        return None
    text = str(raw)
    if source == "gsm8k":
        if "####" not in text:
            return None
        text = text.rsplit("####", 1)[1]
    return text.strip() or None


def _prepare(
    raw: Any, cfg: DataConfig, tokenizer: Any, tools: PromptTools | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """(row, None) or (None, reason it was dropped)."""
    if not isinstance(raw, dict) or "__malformed__" in raw:
        return None, "malformed_record"
    if cfg.source == "synthetic":
        q_key, a_key = "question", "answer"
    else:
        q_key, a_key = cfg.prompt_column, cfg.answer_column
    question = raw.get(q_key)
    if not isinstance(question, str):
        return None, f"missing_{q_key}"
    if not question.strip():
        return None, "empty_prompt"
    if raw.get(a_key) is None:
        return None, f"missing_{a_key}"
    answer = _reference(raw[a_key], cfg.source)
    if answer is None:
        return None, "no_final_answer"
    user_turn = cfg.prompt_template.format(question=question)
    prompt, messages = build_prompt(user_turn, tokenizer, cfg.system_prompt, cfg.use_chat_template, tools)
    # A chat template writes its own special tokens (BOS); adding them again would double them.
    prompt_ids = list(tokenizer(prompt, add_special_tokens=messages is None)["input_ids"])
    if not prompt_ids:
        return None, "empty_prompt"
    if len(prompt_ids) > cfg.max_prompt_length:
        return None, "prompt_too_long"
    row = {"prompt": prompt, "prompt_ids": prompt_ids, "answer": answer, "question": question}
    if messages is not None:  # what a multi-turn episode renders its later turns after
        row["messages"] = messages
    return row, None


def _dropped_detail(dropped: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(dropped.items()))


def _filter_hint(reason: str, cfg: DataConfig) -> str:
    """What to change when the filter ``reason`` removed most rows."""
    if reason.startswith("missing_"):
        return f"set data.prompt_column/answer_column (now {cfg.prompt_column!r}/{cfg.answer_column!r})"
    return {
        "prompt_too_long": f"raise data.max_prompt_length={cfg.max_prompt_length}",
        "empty_prompt": "the tokenizer turned the prompts into no tokens; check model.tokenizer_path",
        "no_final_answer": "the answer column has no final answer (GSM8K: text after ####)",
        "malformed_record": "the data file has lines that are not JSON objects",
    }.get(reason, "")


def _filter_summary(dropped: dict[str, int], total: int, cfg: DataConfig) -> str:
    if not dropped:
        return "the source has no rows"
    hint = _filter_hint(max(dropped, key=dropped.get), cfg)
    return f"{sum(dropped.values())} of {total} rows dropped ({_dropped_detail(dropped)}){'; ' + hint if hint else ''}"


def load_split(
    data_cfg: DataConfig, tokenizer: Any, split: str, min_rows: int = 1, tools: PromptTools | None = None
) -> PromptDataset:
    """Load, format, tokenize and filter one split (see the module docstring); fewer than
    ``min_rows`` rows left is a DataError naming the filter that removed them. ``tools``: the
    multi-turn tools every prompt offers (``prompt_tools``)."""
    raw_rows = _SOURCES[data_cfg.source](data_cfg, split)
    rows, dropped = [], {}
    for raw in raw_rows:
        row, reason = _prepare(raw, data_cfg, tokenizer, tools)
        if row is None:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            rows.append(row)
    where = f"{data_cfg.source} split {split!r}"
    if dropped:
        log.warning(
            "%s: dropped %d of %d rows (%s)", where, sum(dropped.values()), len(raw_rows), _dropped_detail(dropped)
        )
    if len(rows) < min_rows:
        raise DataError(
            f"data: {where} has {len(rows)} usable rows, fewer than the {min_rows} needed: "
            f"{_filter_summary(dropped, len(raw_rows), data_cfg)}"
        )
    log.info("%s: %d prompts", where, len(rows))
    return PromptDataset(split=split, source=data_cfg.source, rows=rows, dropped=dropped)


# ---------------------------------------------------------------- sampler


class PromptSampler:
    """Endless deterministic stream of row indices, ``prompts_per_step`` at a time.

    Epoch ``e`` visits every row once in the order ``permutation(seed + e)``; a step that
    crosses an epoch boundary takes the rest of one epoch and the start of the next (so the
    same prompt can appear twice in that one step when ``num_rows`` is small). The position is
    two integers, so save/restore resumes the exact stream.
    """

    def __init__(self, num_rows: int, prompts_per_step: int, seed: int) -> None:
        if num_rows < 1 or prompts_per_step < 1:
            raise ValueError(
                f"PromptSampler needs num_rows >= 1 and prompts_per_step >= 1, got {num_rows}, {prompts_per_step}"
            )
        self.num_rows, self.prompts_per_step, self.seed = num_rows, prompts_per_step, seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        return np.random.default_rng(self.seed + epoch).permutation(self.num_rows).tolist()

    def next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.prompts_per_step:
            if self.pos == self.num_rows:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.prompts_per_step - len(out), self.num_rows - self.pos)
            out += self._order[self.pos : self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {
            "num_rows": self.num_rows,
            "prompts_per_step": self.prompts_per_step,
            "seed": self.seed,
            "epoch": self.epoch,
            "pos": self.pos,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_rows", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]} but this sampler has {getattr(self, key)}")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)


def load_run_rows(cfg: Config, train: bool = True) -> tuple[list[dict], list[dict]]:
    """Train and test rows of a run, with the run's tokenizer: the train split must fill one step.
    ``train=False`` (evaluation only) leaves the train split unread: ``([], test rows)``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        cfg.model.tokenizer_path or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code
    )
    tools = prompt_tools(cfg)
    train_split, test_split = cfg.data.train_split, cfg.data.test_split
    rows = load_split(cfg.data, tok, train_split, min_rows=cfg.trainer.prompts_per_step, tools=tools) if train else []
    return list(rows), list(load_split(cfg.data, tok, test_split, tools=tools))


def prompt_tools(cfg: Config) -> PromptTools | None:
    """The tools of ``rollout.multi_turn`` as prompts offer them (None without tools)."""
    from grpo_dist.envs.from_config import tool_schemas

    mt = cfg.rollout.multi_turn
    schemas = tool_schemas(mt)
    return None if schemas is None else PromptTools(schemas, mt.tools_prompt)
