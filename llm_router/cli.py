"""The ``llm-router`` command: ``up``, ``serve``, ``worker`` and client commands."""

from __future__ import annotations

import functools
import os
import re
import shlex
import sys
from pathlib import Path

import click
from llm_lab_router import __version__, client, client_timeline, presets
from llm_lab_router.config import ConfigError, check_worker_id, default_config_path, load_config
from llm_lab_router.redact import redact_argv
from llm_lab_router.redis_url import read_url_file
from llm_lab_router.safepath import safe_python_m
from llm_lab_router.shipped import MissingFile

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
redis_url_file_option = click.option(
    "--redis-url-file", envvar="LLM_ROUTER_REDIS_URL_FILE", type=click.Path(dir_okay=False), default=None,
    help="Read the Redis URL from this file (mode 0600), so that a password stays off the command "
         "line, which ps shows to every local user; also LLM_ROUTER_REDIS_URL_FILE.")


def redis_options(default: str | None = DEFAULT_REDIS, help: str = "Redis URL (also LLM_ROUTER_REDIS_URL)."):
    """``--redis URL`` and ``--redis-url-file PATH`` (which wins): the command gets ``redis_url``."""
    def decorate(command):
        @functools.wraps(command)
        def run(*args, redis_url_file: str | None = None, **kw):
            if redis_url_file:
                ctx = click.get_current_context()
                if ctx.get_parameter_source("redis_url") is click.core.ParameterSource.COMMANDLINE:
                    raise click.UsageError("give --redis or --redis-url-file, not both")
                try:
                    kw["redis_url"] = read_url_file(redis_url_file)
                except ValueError as exc:
                    click.echo(f"error: {exc}", err=True)
                    sys.exit(2)
            return command(*args, **kw)

        run = redis_url_file_option(run)
        return click.option("--redis", "redis_url", envvar="LLM_ROUTER_REDIS_URL", default=default,
                            show_default=default is not None, help=help)(run)
    return decorate


redis_option = redis_options()
prefix_option = click.option("--prefix", envvar="LLM_ROUTER_PREFIX", default="llm:", show_default=True,
                             help="Namespace of every Redis key.")


def _export_origins(ctx: click.Context, param: click.Parameter, origins: tuple[str, ...]) -> None:
    """``--allow-origin``: the router (and the routers ``up``/``--workers`` start) read
    ``LLM_ROUTER_ALLOW_ORIGINS``, as every router tunable (router/core/options.py)."""
    if origins:
        os.environ["LLM_ROUTER_ALLOW_ORIGINS"] = ",".join(origins)


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
        click.option("--allow-origin", multiple=True, expose_value=False, callback=_export_origins,
                     help="A web app's origin (scheme://host[:port]) whose pages may call the router: its "
                          "cross-site writes pass, its answers get CORS headers (repeatable; also "
                          "LLM_ROUTER_ALLOW_ORIGINS=a,b). None by default (docs/security.md)."),
        click.option("--logs-read", type=click.Choice(["client", "admin"]), envvar="LLM_ROUTER_LOGS_READ",
                     default="client", show_default=True,
                     help="Which key may stream a model's engine log (it may hold other users' prompts); "
                          "admin needs admin keys."),
    ]):
        command = option(command)
    return command


def _access(host: str, api_keys_file: str | None, admin_keys_file: str | None, read_access: str, insecure: bool,
            logs_read: str = "client"):
    """The router's access policy, or exit 2 with one line (bad key file; open on a network;
    logs for admins only, but no admin key)."""
    from llm_lab_router.router.http.auth import AccessPolicy, KeyFileError, KeyRing, startup_refusal

    try:
        ring = KeyRing.load(api_keys_file, admin_keys_file)
    except KeyFileError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if refusal := startup_refusal(host, ring, insecure):
        click.echo(f"error: {refusal}", err=True)
        sys.exit(2)
    if logs_read == "admin" and not ring.admin:
        click.echo("error: --logs-read admin needs admin keys (--admin-keys-file or LLM_ROUTER_ADMIN_KEYS): "
                   "without keys every route is open", err=True)
        sys.exit(2)
    return AccessPolicy(ring, read_access, logs_read)  # type: ignore[arg-type]


def _access_args(api_keys_file: str | None, admin_keys_file: str | None, read_access: str,
                 insecure: bool, logs_read: str = "client") -> list[str]:
    """The security options again, for a ``serve`` started by this process (``up``, ``--workers``)."""
    args = ["--read-access", read_access, "--logs-read", logs_read, *(["--insecure"] if insecure else [])]
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
    _worker_id(cfg)
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
          admin_keys_file: str | None, read_access: str, insecure: bool, logs_read: str) -> None:
    """Run a router: the HTTP API, proxying to the models every worker publishes."""
    from llm_lab_router.router.http.app import main as router_main
    from llm_lab_router.router.supervisor import worker_count

    access = _access(host, api_keys_file, admin_keys_file, read_access, insecure, logs_read)
    if (count := worker_count(workers)) > 1:
        argv = safe_python_m("llm_lab_router.cli", "serve", "--prefix", prefix, "--host", host, "--port", str(port),
                             *_access_args(api_keys_file, admin_keys_file, read_access, insecure, logs_read))
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
@redis_options(default=None, help="Use this Redis if it answers; otherwise a private redis-server is started.")
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
       admin_keys_file: str | None, read_access: str, insecure: bool, logs_read: str) -> None:
    """Run everything on this host: Redis (if none answers), one worker, one router.

    A second ``up`` on one host needs another --port and another --worker-id. The client
    commands (``llm-router models`` ...) find the router of the running ``up`` by themselves."""
    from llm_lab_router.up import WorkerArgs, run_up

    cfg = _load(config_path)  # fail here, with one line, before anything starts
    worker_argv = _override(cfg, worker_id, state_dir)
    _access(host, api_keys_file, admin_keys_file, read_access, insecure, logs_read)
    serve_args = ["--workers", str(router_workers),
                  *_access_args(api_keys_file, admin_keys_file, read_access, insecure, logs_read)]
    sys.exit(run_up(os.path.abspath(cfg.path), redis_url, host, port, prefix, data_dir, serve_args,
                    WorkerArgs(_worker_id(cfg), worker_argv)))


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
    from llm_lab_router.estimate import Estimator
    from llm_lab_router.hostcheck import host_problems, vram_lines

    checked = read_config(config_path)
    for problem in checked.problems:
        click.echo(f"error: {problem}", err=True)
    if (cfg := checked.config) is None:
        click.echo(f"{config_path}: not valid ({len(checked.problems)} problem{'s' * (len(checked.problems) != 1)})")
        return 2
    config_dir = str(Path(config_path).resolve().parent)
    problems = 0
    estimator = Estimator()
    for i, m in enumerate(cfg.models):
        click.echo(f"{m.id:24} {m.engine:16} {m.mode:10} {', '.join(m.aliases)}")
        click.echo(f"    {_show_argv(redact_argv(m.command))}")  # keys in flags stay off screens and CI logs
        for warning in presets.warnings(m):
            click.echo(f"warning: {warning}", err=True)
        for line in [] if portable else vram_lines(m, config_dir, estimator):
            click.echo(f"    {line}")
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


@main.group("redis-user")
def redis_user_group() -> None:
    """Redis ACL users of a lab (examples/redis-users.acl, docs/security.md)."""


@redis_user_group.command("add-worker")
@click.argument("worker_id")
@prefix_option
@click.option("--password-file", type=click.Path(dir_okay=False), default=None,
              help="Where to write the new password (mode 0600, never overwritten). Default: ./worker.<ID>.password.")
@click.option("--apply", is_flag=True,
              help="Also create the user in the Redis at --redis, as its admin (ACL SETUSER, then ACL SAVE). "
                   "Give the admin's URL in LLM_ROUTER_REDIS_URL: a command line is visible to every local user.")
@redis_option
def redis_user_add_worker(worker_id: str, prefix: str, password_file: str | None, apply: bool, redis_url: str) -> None:
    """Make the Redis user of worker WORKER_ID (a new host): print its ACL line, write its password.

    The user may write only that worker's records and read only its command stream. Add the
    line to the ACL file Redis loads (or use --apply); the worker then logs in with
    LLM_ROUTER_REDIS_URL=redis://worker.<ID>:<password>@<redis host>:6379/0."""
    from llm_lab_router.redis_users import apply_worker_user, new_worker, worker_user, write_secret

    try:
        password, line = new_worker(check_worker_id(worker_id), prefix)
        path = write_secret(password_file or f"worker.{worker_id}.password", password + "\n")
    except (ValueError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(line)
    click.echo(f"password of Redis user {worker_user(worker_id)} written to {path} (mode 0600)", err=True)
    if apply:
        import redis as redis_sync
        from llm_lab_router.redis_url import sync_client

        client_ = sync_client(redis_url)
        try:
            saved = apply_worker_user(client_, worker_id, line)
        except (redis_sync.RedisError, OSError) as exc:  # a wrong URL, Redis away, not an admin
            click.echo(f"error: could not create the user in Redis: {exc}", err=True)
            sys.exit(1)
        finally:
            client_.close()
        click.echo("created in Redis" + (" and saved to its ACL file" if saved else
                                         "; it has no ACL file: add the line to its config"), err=True)


def _worker_id(cfg) -> str:
    """The host's worker id, or exit 2 with one line when it cannot name a Redis user and keys."""
    try:
        return check_worker_id(cfg.worker_id)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


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
for _command in client_timeline.COMMANDS:  # history, events (llm_router/client_timeline.py)
    main.add_command(_command)


if __name__ == "__main__":
    main()
