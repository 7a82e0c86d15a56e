#!/usr/bin/env bash
# The docs site (MkDocs with the Material theme, mkdocs.yml, pages in docs/).
#   bash scripts/docs.sh             serve it at http://127.0.0.1:8000, reloading on edits
#   bash scripts/docs.sh build [DIR] build it into DIR (default: site/) in strict mode, as CI does:
#                                    a broken link or anchor, a page outside the nav, or a
#                                    configuration reference older than the schema fails the build
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Material for MkDocs prints a banner about its successor (Zensical) on every build; DEVELOPERS.md
# records it, the build log need not.
export NO_MKDOCS_2_WARNING=1
case "${1:-serve}" in
  serve) exec .venv/bin/mkdocs serve -a 127.0.0.1:8000 ;;
  build)
    .venv/bin/python -m grpo_dist.config_reference --check
    exec .venv/bin/mkdocs build --strict --quiet -d "${2:-site}" ;;
  *) echo "usage: bash scripts/docs.sh [serve | build [DIR]]" >&2; exit 2 ;;
esac
