"""What the README and the docs pages show is what the code accepts: every config snippet validates
against the schema, every `grpo-dist` command parses with the CLI's own parser and its config file
(with its `--set` overrides) validates, every `python -m` module and `bash scripts/...` script exists.
Commands marked `# needs a GPU` or `# needs a cluster` are checked the same way (parsing and schema
need neither). The strict MkDocs build (scripts/docs.sh build, in CI) checks links and anchors."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from grpo_dist.cli import build_parser
from grpo_dist.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SECTIONS = set(Config.model_fields)


def blocks(lang: set[str]) -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for m in FENCE.finditer(page.read_text()):
            if m.group(1) in lang:
                out.append((page.relative_to(ROOT).as_posix(), m.group(2)))
    return out


OPTIONAL = re.compile(r"\s\[-[^\[\]]*\]")  # a usage line's optional flags, `[--resume]`


def commands() -> list[tuple[str, str]]:
    """Each shell line of the pages (continuations joined, comments, prompts and a usage line's
    optional flags dropped)."""
    out = []
    for page, body in blocks({"bash", "sh", "shell", "console"}):
        for line in body.replace("\\\n", " ").splitlines():
            line = OPTIONAL.sub("", line.strip().removeprefix("$ "))
            if line and not line.startswith("#"):
                out.append((page, line))
    return out


def config_snippets() -> list[tuple[str, dict]]:
    out = []
    for page, body in blocks({"yaml", "yml"}):
        data = yaml.safe_load(body)
        if isinstance(data, dict) and data and set(data) <= SECTIONS:
            out.append((page, data))
    return out


def test_the_pages_show_config_snippets_and_commands():
    assert len(PAGES) > 1 and config_snippets() and commands()


@pytest.mark.parametrize(("page", "snippet"), config_snippets(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_config_snippet_validates(page, snippet):
    Config.model_validate(snippet)


def _grpo_dist_argv(line: str) -> list[str] | None:
    argv = shlex.split(line, comments=True)
    if argv and argv[0] == "grpo-dist":
        return argv[1:]
    if argv[:3] == ["python", "-m", "grpo_dist.cli"]:
        return argv[3:]
    return None


@pytest.mark.parametrize(("page", "line"), commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_command_shown_parses_and_its_config_validates(page, line):
    argv = shlex.split(line, comments=True)
    if (grpo := _grpo_dist_argv(line)) is not None:
        try:
            args = build_parser().parse_args(grpo)
        except (SystemExit, argparse.ArgumentError):
            pytest.fail(f"{page}: `{line}` does not parse with grpo-dist's CLI")
        config = getattr(args, "config", None)
        if config is not None:
            path = ROOT / config
            assert path.is_file(), f"{page}: `{line}` names {config}, which the repository does not have"
            load_config(path, args.set)
    elif argv[:2] == ["python", "-m"] or argv[:2] == [".venv/bin/python", "-m"]:
        module = argv[2]
        assert importlib.util.find_spec(module) is not None, f"{page}: `{line}`: no module {module}"
    elif argv[:1] == ["bash"] and argv[1].startswith("scripts/"):
        assert (ROOT / argv[1]).is_file(), f"{page}: `{line}`: no {argv[1]}"
