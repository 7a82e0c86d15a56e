"""grpo_dist is the pure core: importing any of its modules must not pull in ray, vllm or deepspeed."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import grpo_dist

FORBIDDEN = ("ray", "vllm", "deepspeed")
REQUIRED = {"config", "batch", "weight_sync", "advantages", "losses", "rewards", "data", "envs", "envs.tools"}


def _modules(path: list[str] = grpo_dist.__path__, prefix: str = "") -> list[str]:
    """Every module of grpo_dist, subpackages' modules included (found on disk, not imported here)."""
    out = []
    for m in pkgutil.iter_modules(path):
        out.append(prefix + m.name)
        if m.ispkg:
            out += _modules([str(Path(m.module_finder.path) / m.name)], f"{prefix}{m.name}.")
    return sorted(out)


def test_all_expected_modules_exist():
    assert set(_modules()) >= REQUIRED


def test_importing_every_module_keeps_heavy_deps_out():
    names = ["grpo_dist"] + [f"grpo_dist.{m}" for m in _modules()]
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    root = Path(grpo_dist.__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing {names} loaded {loaded}"


def test_building_a_tool_schema_keeps_heavy_deps_out():
    # tool_schema imports transformers.utils lazily, on first use: check that path too.
    code = (
        "import json, sys\n"
        "from grpo_dist.envs import calculator, tool_schema\n"
        "tool_schema(calculator)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    root = Path(grpo_dist.__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
