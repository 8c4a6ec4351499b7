"""The ``llm-router`` command: ``up``, ``serve``, ``worker`` and client commands."""

from __future__ import annotations

import os
import sys

import click

from llm_router import __version__, client
from llm_router.config import ConfigError, default_config_path, load_config

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
redis_option = click.option("--redis", "redis_url", envvar="LLM_ROUTER_REDIS_URL", default=DEFAULT_REDIS,
                            show_default=True, help="Redis URL (also LLM_ROUTER_REDIS_URL).")
prefix_option = click.option("--prefix", envvar="LLM_ROUTER_PREFIX", default="llm:", show_default=True,
                             help="Namespace of every Redis key.")


@click.group()
@click.version_option(__version__, prog_name="llm-router")
def main() -> None:
    """One OpenAI-compatible endpoint and one control plane for a lab's model servers."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Model config (TOML) of this host. Default: examples/models.toml.")
@redis_option
@prefix_option
@click.option("--worker-id", default=None, help="Override the worker id (default: config or host name).")
def worker(config_path: str | None, redis_url: str, prefix: str, worker_id: str | None) -> None:
    """Run the worker agent of this host: launch, supervise and publish model processes."""
    from worker.agent import main as worker_main

    cfg = _load(config_path)
    if worker_id:
        cfg.worker.id = worker_id
    sys.exit(worker_main(cfg, redis_url, prefix))


@main.command()
@redis_option
@prefix_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def serve(redis_url: str, prefix: str, host: str, port: int) -> None:
    """Run a router: the HTTP API, proxying to the models every worker publishes."""
    from router.app import main as router_main

    sys.exit(router_main(redis_url=redis_url, prefix=prefix, host=host, port=port))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Model config (TOML). Default: examples/models.toml (the demo models).")
@click.option("--redis", "redis_url", envvar="LLM_ROUTER_REDIS_URL", default=None,
              help="Use this Redis if it answers; otherwise a private redis-server is started.")
@prefix_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--data-dir", default=".llm-router", show_default=True,
              help="Where a private redis-server keeps its data.")
def up(config_path: str | None, redis_url: str | None, prefix: str, host: str, port: int, data_dir: str) -> None:
    """Run everything on this host: Redis (if none answers), one worker, one router."""
    from llm_router.up import run_up

    cfg = _load(config_path)  # fail here, with one line, before anything starts
    sys.exit(run_up(os.path.abspath(cfg.path), redis_url, host, port, prefix, data_dir))


@main.command("config-check")
@click.argument("config_path", type=click.Path(dir_okay=False))
def config_check(config_path: str) -> None:
    """Validate a model config file and list its models."""
    cfg = _load(config_path)
    for m in cfg.models:
        click.echo(f"{m.id:24} {m.mode:10} {', '.join(m.aliases)}")
    click.echo(f"{config_path}: ok ({len(cfg.models)} models)")


def _load(config_path: str | None):
    path = config_path or os.environ.get("LLM_ROUTER_CONFIG") or str(default_config_path())
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


client.register(main)


if __name__ == "__main__":
    main()
