"""LoRA on the policy (PEFT), shared by the learner and the rollout workers.

Names. The learner's PEFT model calls an adapter tensor
``base_model.model.<module>.lora_A.default.weight``; the sync manifest, the checkpoint and vLLM
use PEFT's saved form without the adapter name (``...lora_A.weight``), which is what vLLM's
LoRA loader parses. With ``lora.sync=merged`` the manifest is the base model's own HF names and
every targeted weight is sent as ``W + (alpha / r) * B @ A``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from grpo_dist.config import LoraConfig
from grpo_dist.weight_sync import ParamSpec, spec_of

ADAPTER = "default"  # PEFT's adapter name; the only adapter grpo-dist creates
PEFT_PREFIX = "base_model.model."


def peft_config(lora: LoraConfig, base_model: str | None = None):
    """The ``peft.LoraConfig`` of ``lora`` (no bias, causal LM)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def peft_config_dict(lora: LoraConfig, base_model: str | None = None) -> dict[str, Any]:
    """``adapter_config.json`` content (JSON-safe: PEFT keeps target modules as a set)."""
    d = peft_config(lora, base_model).to_dict()
    d["target_modules"] = sorted(d["target_modules"])
    d["peft_type"] = str(getattr(d["peft_type"], "value", d["peft_type"]))
    d["task_type"] = str(getattr(d["task_type"], "value", d["task_type"]))
    return d


def check_target_modules(model: torch.nn.Module, lora: LoraConfig, where: str) -> None:
    """Raise ValueError naming every target module ``model`` does not have (as PEFT matches them:
    the last component of a module's name) and the linear layers it does have."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    missing = [t for t in lora.target_modules if t not in leaves]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"model.lora.target_modules: {missing} not in {where} ({type(model).__name__}); its linear layers are {linear}"
        )


def wrap(model: torch.nn.Module, lora: LoraConfig, base_model: str | None = None) -> torch.nn.Module:
    """``model`` with a fresh adapter (B = 0, so the policy starts equal to the base model);
    only adapter parameters require gradients. The adapter keeps the base model's dtype."""
    from peft import get_peft_model

    check_target_modules(model, lora, base_model or "the model")
    return get_peft_model(model, peft_config(lora, base_model), autocast_adapter_dtype=False)


def sync_name(peft_name: str) -> str:
    """PEFT's in-memory adapter name -> its saved (and vLLM's) name."""
    return peft_name.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B.")


def is_adapter_param(peft_name: str) -> bool:
    return f".lora_A.{ADAPTER}." in peft_name or f".lora_B.{ADAPTER}." in peft_name


def base_name(peft_name: str) -> str:
    """PEFT's name of a base parameter -> the plain HF name (``...q_proj.base_layer.weight`` ->
    ``...q_proj.weight``)."""
    return peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def adapter_manifest(
    model_path: str, lora: LoraConfig, dtype: str, trust_remote_code: bool = False
) -> dict[str, ParamSpec]:
    """Names (saved form), shapes and dtype of the adapter the learner will send, built on the meta
    device from the model's config: what a rollout worker checks an update against."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = wrap(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code), lora, model_path)
    torch_dtype = getattr(torch, dtype)
    return {
        sync_name(n): spec_of(sync_name(n), p.to(torch_dtype))
        for n, p in model.named_parameters()
        if is_adapter_param(n)
    }


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling * B @ A`` in the weight's dtype, computed in float32 (the base weight itself is
    never modified, so no merge/unmerge round-off accumulates across syncs)."""
    delta = (lora_b.float() @ lora_a.float()) * scaling
    return (weight.float() + delta).to(weight.dtype)


def export_merged(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Merge a checkpoint's adapter (``<checkpoint>/policy``) into its base model and write a plain
    HF directory (safetensors, config, tokenizer) that transformers and vLLM load without PEFT.

    Written into a temporary sibling and renamed into place, so ``out_dir`` is never half-written."""
    import json
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_dist.errors import UserError

    src, out = Path(adapter_dir), Path(out_dir)
    cfg_file = src / "adapter_config.json"
    if not cfg_file.is_file():
        raise UserError(
            f"{src} has no adapter_config.json: not a LoRA checkpoint (a full fine-tune's policy "
            "directory is already a plain model)"
        )
    base = base_model or json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{cfg_file} names no base model; pass --base")
    if out.exists():
        raise UserError(f"--out {out} exists; refusing to overwrite it")
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")  # the base's own dtype
    merged = PeftModel.from_pretrained(model, str(src)).merge_and_unload()
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src if (src / "tokenizer_config.json").is_file() else base).save_pretrained(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
