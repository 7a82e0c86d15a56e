"""Entrypoint of a submitted Ray job: `python -m deploy.entrypoint [--resume]`.

The validated config arrives in the GRPO_DIST_CONFIG_YAML env var (see deploy/submit.py)."""

from __future__ import annotations

import os
import sys
import tempfile

from deploy.submit import CONFIG_ENV_VAR
from grpo_dist.cli import main

if __name__ == "__main__":
    text = os.environ.get(CONFIG_ENV_VAR)
    if not text:
        sys.exit(f"{CONFIG_ENV_VAR} is not set: submit jobs with `grpo-dist submit`")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    sys.exit(main(["run", f.name, *sys.argv[1:]]))
