#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3 + pip, nothing else): creates .venv on
# first use, installs the project into it (again only when pyproject.toml changed), then
#   ./dev.sh up [options]     llm-router up: Redis (private if none), a worker, a router on :8000
#   ./dev.sh test [pytest args]   the whole test suite
#   ./dev.sh test-real [pytest args]  the real-engine tier (tests/real): builds llama-server once
#                             (scripts/build_llama_server.sh, ~/.cache/llm-router), installs the
#                             `real` extra (gguf, numpy) into .venv
#   ./dev.sh bench [options]  the benchmark suite (scripts/bench.py)
#   ./dev.sh plots [NAME ...] redraw the docs' plots (docs/*.svg) from docs/data/*.json (scripts/plots.py)
#   ./dev.sh <anything else>  the llm-router CLI (models, start, logs -f, ...)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "dev.sh: installing llm-router and its dependencies into .venv (log: .venv/install.log)" >&2
  if ! .venv/bin/python -m pip install -e '.[test,fast]' \
       >.venv/install.log 2>&1; then
    tail -n 30 .venv/install.log >&2
    echo "dev.sh: installation failed (full log: .venv/install.log)" >&2
    exit 1
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi
cmd="${1:-help}"
[ $# -gt 0 ] && shift
case "$cmd" in
  up) exec .venv/bin/llm-router up "$@" ;;
  test) exec .venv/bin/python -m pytest -q "$@" ;;
  test-real)
    real_stamp=".venv/.installed-real-$(sha1sum pyproject.toml | cut -c1-12)"
    if [ ! -f "$real_stamp" ]; then
      .venv/bin/python -m pip install -e '.[test,fast,real]' >.venv/install-real.log 2>&1 \
        || { tail -n 30 .venv/install-real.log >&2; exit 1; }
      touch "$real_stamp"
    fi
    LLM_ROUTER_LLAMA_SERVER="$(PYTHON=.venv/bin/python scripts/build_llama_server.sh)"
    export LLM_ROUTER_LLAMA_SERVER
    exec .venv/bin/python -m pytest -q tests/real "$@" ;;
  bench) exec .venv/bin/python scripts/bench.py "$@" ;;
  plots) exec .venv/bin/python -m scripts.plots "$@" ;;
  help) exec .venv/bin/llm-router --help ;;
  *) exec .venv/bin/llm-router "$cmd" "$@" ;;
esac
