"""The ``llm-router`` command: ``up``, ``serve``, ``worker`` and client commands."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import click
from llm_lab_router import __version__, client, presets
from llm_lab_router.config import ConfigError, default_config_path, load_config
from llm_lab_router.redact import redact_argv
from llm_lab_router.shipped import MissingFile

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
redis_option = click.option("--redis", "redis_url", envvar="LLM_ROUTER_REDIS_URL", default=DEFAULT_REDIS,
                            show_default=True, help="Redis URL (also LLM_ROUTER_REDIS_URL).")
prefix_option = click.option("--prefix", envvar="LLM_ROUTER_PREFIX", default="llm:", show_default=True,
                             help="Namespace of every Redis key.")


worker_id_option = click.option("--worker-id", default=None,
                                help="Override the worker id (default: the config's [worker] id, else the host name).")
state_dir_option = click.option("--state-dir", type=click.Path(file_okay=False), default=None,
                                help="Override the worker's state directory (log spool, lock; default: the "
                                     "config's [worker] state_dir, else $LLM_ROUTER_STATE_DIR, else "
                                     "~/.local/state/llm-router).")


def _override(cfg, worker_id: str | None, state_dir: str | None) -> list[str]:
    """Apply ``--worker-id``/``--state-dir`` to ``cfg``; returns them as a worker's argv."""
    argv: list[str] = []
    if worker_id:
        cfg.worker.id = worker_id
        argv += ["--worker-id", worker_id]
    if state_dir:
        cfg.worker.state_dir = os.path.abspath(state_dir)
        argv += ["--state-dir", cfg.worker.state_dir]
    return argv


def security_options(command):
    """API-key options shared by ``serve`` and ``up`` (see docs/security.md)."""
    for option in reversed([
        click.option("--api-keys-file", envvar="LLM_ROUTER_API_KEYS_FILE", type=click.Path(dir_okay=False),
                     help="Client keys, one per line (plain or sha256:<hex>), or a .toml/.json file with "
                          "names and limits (docs/security.md); also LLM_ROUTER_API_KEYS=k1,k2."),
        click.option("--admin-keys-file", envvar="LLM_ROUTER_ADMIN_KEYS_FILE", type=click.Path(dir_okay=False),
                     help="Admin keys (start/stop, log clear); also LLM_ROUTER_ADMIN_KEYS=k1,k2."),
        click.option("--read-access", type=click.Choice(["client", "public"]), envvar="LLM_ROUTER_READ_ACCESS",
                     default="client", show_default=True,
                     help="With keys on: whether read-only routes (/, /v1/models, /api/... GETs) need a key."),
        click.option("--insecure", is_flag=True,
                     help="Allow a router on a non-loopback address without keys (anyone reaching it may use it)."),
    ]):
        command = option(command)
    return command


def _access(host: str, api_keys_file: str | None, admin_keys_file: str | None, read_access: str, insecure: bool):
    """The router's access policy, or exit 2 with one line (bad key file; open on a network)."""
    from llm_lab_router.router.http.auth import AccessPolicy, KeyFileError, KeyRing, startup_refusal

    try:
        ring = KeyRing.load(api_keys_file, admin_keys_file)
    except KeyFileError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if refusal := startup_refusal(host, ring, insecure):
        click.echo(f"error: {refusal}", err=True)
        sys.exit(2)
    return AccessPolicy(ring, read_access)  # type: ignore[arg-type]


def _access_args(api_keys_file: str | None, admin_keys_file: str | None, read_access: str,
                 insecure: bool) -> list[str]:
    """The security options again, for a ``serve`` started by this process (``up``, ``--workers``)."""
    args = ["--read-access", read_access, *(["--insecure"] if insecure else [])]
    for flag, path in (("--api-keys-file", api_keys_file), ("--admin-keys-file", admin_keys_file)):
        if path:
            args += [flag, os.path.abspath(path)]
    return args


@click.group()
@click.version_option(__version__, prog_name="llm-router")
def main() -> None:
    """One OpenAI-compatible endpoint and one control plane for a lab's model servers."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Model config (TOML) of this host. Default: examples/models.toml.")
@redis_option
@prefix_option
@worker_id_option
@state_dir_option
@click.option("--stop-models", is_flag=True,
              help="Do not run: stop the models a worker of this id left running (after SIGTERM or a crash).")
def worker(config_path: str | None, redis_url: str, prefix: str, worker_id: str | None, state_dir: str | None,
           stop_models: bool) -> None:
    """Run the worker agent of this host: launch, supervise and publish model processes.

    SIGTERM makes it exit and leave its models running, for the next worker of its id to adopt
    (within [worker] adopt_timeout); SIGINT (Ctrl-C) stops its models first."""
    cfg = _load(config_path)
    _override(cfg, worker_id, state_dir)
    if stop_models:
        from llm_lab_router.worker.handover import stop_models_now

        sys.exit(stop_models_now(cfg))
    from llm_lab_router.worker.agent import main as worker_main

    sys.exit(worker_main(cfg, redis_url, prefix))


@main.command()
@redis_option
@prefix_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=0),
              help="Router processes sharing the port (SO_REUSEPORT), supervised by this one; 0: one per core.")
@security_options
def serve(redis_url: str, prefix: str, host: str, port: int, workers: int, api_keys_file: str | None,
          admin_keys_file: str | None, read_access: str, insecure: bool) -> None:
    """Run a router: the HTTP API, proxying to the models every worker publishes."""
    from llm_lab_router.router.http.app import main as router_main
    from llm_lab_router.router.supervisor import worker_count

    access = _access(host, api_keys_file, admin_keys_file, read_access, insecure)
    if (count := worker_count(workers)) > 1:
        argv = [sys.executable, "-m", "llm_lab_router.cli", "serve", "--prefix", prefix, "--host", host,
                "--port", str(port), *_access_args(api_keys_file, admin_keys_file, read_access, insecure)]
        sys.exit(_supervise(argv, count, host, port, redis_url))
    sys.exit(router_main(redis_url=redis_url, prefix=prefix, host=host, port=port, access=access,
                         insecure=insecure))


def _supervise(argv: list[str], count: int, host: str, port: int, redis_url: str) -> int:
    """``serve --workers N``: run ``argv`` (a one-process ``serve``) N times on one port. The Redis
    URL goes in the environment, where a password stays out of ``ps``."""
    import logging

    from llm_lab_router.router.core.options import RouterOptions
    from llm_lab_router.router.supervisor import Supervisor, port_is_free

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        grace = RouterOptions.from_env().shutdown_grace + 10  # the children's drain, then closing
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    if why := port_is_free(host, port):
        click.echo(f"error: cannot listen on {host}:{port}: {why}", err=True)
        return 1
    return Supervisor(argv, count, grace, env={**os.environ, "LLM_ROUTER_REDIS_URL": redis_url}).run()


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
@click.option("--router-workers", default=1, show_default=True, type=click.IntRange(min=0),
              help="Router processes (serve --workers); 0: one per core.")
@worker_id_option
@state_dir_option
@security_options
def up(config_path: str | None, redis_url: str | None, prefix: str, host: str, port: int, data_dir: str,
       router_workers: int, worker_id: str | None, state_dir: str | None, api_keys_file: str | None,
       admin_keys_file: str | None, read_access: str, insecure: bool) -> None:
    """Run everything on this host: Redis (if none answers), one worker, one router.

    A second ``up`` on one host needs another --port and another --worker-id. The client
    commands (``llm-router models`` ...) find the router of the running ``up`` by themselves."""
    from llm_lab_router.up import WorkerArgs, run_up

    cfg = _load(config_path)  # fail here, with one line, before anything starts
    worker_argv = _override(cfg, worker_id, state_dir)
    _access(host, api_keys_file, admin_keys_file, read_access, insecure)
    serve_args = ["--workers", str(router_workers),
                  *_access_args(api_keys_file, admin_keys_file, read_access, insecure)]
    sys.exit(run_up(os.path.abspath(cfg.path), redis_url, host, port, prefix, data_dir, serve_args,
                    WorkerArgs(cfg.worker_id, worker_argv)))


@main.group("config")
def config_group() -> None:
    """Model config files: check one before a worker loads it (or reloads it on SIGHUP)."""


@config_group.command("check")
@click.argument("config_paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--portable", is_flag=True,
              help="Only validate the file: skip the checks against this host (programs, Python modules, "
                   "model files).")
def config_check(config_paths: tuple[str, ...], portable: bool) -> None:
    """Validate config files; list each model with its engine and resolved command.

    Every problem of a file at once, one ``error: file:line: model 'id': field: problem`` line
    each on stderr; a file that is not valid makes the exit status 2. Then, for a valid file and
    unless --portable, what will surely fail on this host (a program not on the model's PATH, a
    Python module its interpreter cannot find, a missing model file, a health path the engine
    does not serve), in the same form: exit status 1. Warnings (valid, but probably not what
    was meant) go to stderr too."""
    status = max(_check_one(path, portable) for path in config_paths)
    if status:
        sys.exit(status)


def _check_one(config_path: str, portable: bool) -> int:
    """``config check`` of one file: its exit status (0 ok, 1 problems on this host, 2 invalid)."""
    from llm_lab_router.config import Problem, read_config
    from llm_lab_router.hostcheck import host_problems

    checked = read_config(config_path)
    for problem in checked.problems:
        click.echo(f"error: {problem}", err=True)
    if (cfg := checked.config) is None:
        click.echo(f"{config_path}: not valid ({len(checked.problems)} problem{'s' * (len(checked.problems) != 1)})")
        return 2
    config_dir = str(Path(config_path).resolve().parent)
    problems = 0
    for i, m in enumerate(cfg.models):
        click.echo(f"{m.id:24} {m.engine:16} {m.mode:10} {', '.join(m.aliases)}")
        click.echo(f"    {_show_argv(redact_argv(m.command))}")  # keys in flags stay off screens and CI logs
        for warning in presets.warnings(m):
            click.echo(f"warning: {warning}", err=True)
        for found in [] if portable else host_problems(m, config_dir):
            field, _, message = found.partition(": ")
            click.echo(f"error: {Problem(config_path, checked.line(i, field), f'model {m.id!r}', field, message)}",
                       err=True)
            problems += 1
    if problems:
        click.echo(f"{config_path}: {problems} problem{'s' * (problems != 1)} on this host ({len(cfg.models)} models)")
        return 1
    click.echo(f"{config_path}: ok ({len(cfg.models)} models)")
    return 0


main.add_command(config_check, "config-check")  # the first spelling, kept for scripts


def _show_argv(argv: list[str]) -> str:
    """An argv as a shell line, placeholders such as ``{port}`` left unquoted for reading."""
    return " ".join(a if re.fullmatch(r"[\w@%+=:,./{}-]+", a) else shlex.quote(a) for a in argv)


def _load(config_path: str | None):
    """The config to run, or exit 2 with one ``error:`` line per problem of the file."""
    try:
        return load_config(config_path or os.environ.get("LLM_ROUTER_CONFIG") or default_config_path())
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
    except MissingFile as exc:
        click.echo(f"error: {exc}", err=True)
    sys.exit(2)


client.register(main)


if __name__ == "__main__":
    main()
