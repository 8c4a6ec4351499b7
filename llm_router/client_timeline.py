"""``llm-router history`` and ``llm-router events``: the timeline (``GET /api/history``,
``GET /api/events``) as tables, or the router's JSON with ``--json``."""

from __future__ import annotations

import time
from typing import Any

import click
from llm_lab_router.client import Api, CliError, _echo_json, api_command, table

TIME_HELP = "unix seconds, 'now', or a time ago: -15m, -1h, -24h, -7d"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _num(value: Any, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _model_row(p: dict) -> list[str]:
    errors = None if p["requests"] is None else (p["errors_4xx"] or 0) + (p["errors_5xx"] or 0)
    return [_when(p["t"]), _num(p["requests"]), _num(p["rate"], "{:.2f}"), _num(errors), _num(p["tokens_per_s"], "{:.1f}"),
            f"{_ms(p['ttft_p50'])}/{_ms(p['ttft_p95'])}", f"{_ms(p['latency_p50'])}/{_ms(p['latency_p95'])}",
            _ms(p["wait_p95"])]


def _gauge_row(p: dict, fields: list[str]) -> list[str]:
    return [_when(p["t"]), *(_num(p.get(f)) for f in fields)]


@click.command()
@click.argument("model", required=False)
@click.option("--gpu", "gpu", default=None, metavar="HOST[:INDEX]",
              help="A GPU's memory (and each model's VRAM on it), utilisation, power, temperature instead.")
@click.option("--gpus", "lab", is_flag=True, help="Every host's GPUs summed (memory, VRAM per model) instead.")
@click.option("--host", "host", default=None, metavar="HOST", help="A host's CPU and RAM instead.")
@click.option("--from", "start", default="-1h", show_default=True, help=f"Start: {TIME_HELP}.")
@click.option("--to", "end", default="now", show_default=True, help=f"End: {TIME_HELP}.")
@click.option("--step", type=click.IntRange(min=0), default=None, help="Seconds per row (default: the resolution).")
@api_command
def history(api: Api, as_json: bool, model: str | None, gpu: str | None, lab: bool, host: str | None, start: str,
            end: str, step: int | None) -> None:
    """A model's requests, errors, tokens/s and TTFT/latency/wait (ms, p50/p95) over time; or a
    GPU's (--gpu), all GPUs' (--gpus) or a host's (--host) gauges. Without any: the series recorded."""
    if sum(x is not None for x in (model, gpu, host)) + lab > 1:
        raise CliError("give one of MODEL, --gpu, --gpus or --host", 2)
    params: dict[str, Any] = {"from": start, "to": end, "step": step}
    if model:
        params.update(series="model", model=model)
    elif gpu:
        name, _, index = gpu.partition(":")
        params.update(series="gpu", host=name, gpu=index or "0")
    elif host:
        params.update(series="host", host=host)
    elif lab:
        params.update(series="gpus")
    body = api.get("/api/history", **params)
    if as_json:
        return _echo_json(body)
    if not body.get("series"):
        click.echo("\n".join(body.get("available") or []) or "nothing recorded yet")
        return
    points = body.get("points") or []
    if model:
        headers = ["TIME", "REQUESTS", "REQ/S", "ERRORS", "TOK/S", "TTFT MS p50/p95", "LATENCY MS p50/p95",
                   "WAIT MS p95"]
        rows = [_model_row(p) for p in points]
    else:
        fields = body.get("fields") or []
        headers = ["TIME", *(f.upper() for f in fields)]
        rows = [_gauge_row(p, fields) for p in points]
    click.echo(table(headers, rows))
    click.echo(f"{body['series']}: {len(points)} rows of {body['step']} s ('-': nothing recorded, a gap)")


@click.command()
@click.option("--from", "start", default="-1h", show_default=True, help=f"Start: {TIME_HELP}.")
@click.option("--to", "end", default="now", show_default=True, help=f"End: {TIME_HELP}.")
@click.option("--model", default=None, help="Only events of this model (or evicting it).")
@click.option("--host", default=None, help="Only events on this host (worker id).")
@click.option("--kind", default=None, help="Only events of this kind (ready, evicted, crashed, ...).")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="At most this many (router default 1000).")
@api_command
def events(api: Api, as_json: bool, start: str, end: str, model: str | None, host: str | None, kind: str | None,
           limit: int | None) -> None:
    """What happened: starts (and by which key), cold starts, stops and why, evictions, crashes,
    restarts, adoptions, reloads, oldest first."""
    body = api.get("/api/events", **{"from": start, "to": end, "model": model, "host": host, "kind": kind,
                                     "limit": limit})
    if as_json:
        return _echo_json(body)
    rows = []
    for e in body.get("events") or []:
        what = e.get("detail", "")
        if e.get("models"):
            what = f"evicted {', '.join(e['models'])}" + (f": {what}" if what else "")
        if e.get("seconds"):
            what = f"{e['seconds']:.1f}s" + (f", {what}" if what else "")
        rows.append([_when(e["ts"]), e.get("kind", ""), e.get("model", "") or "-", e.get("host", "") or "-",
                     e.get("key", "") or "-", what])
    if not rows:
        click.echo("no events")
        return
    click.echo(table(["TIME", "KIND", "MODEL", "HOST", "KEY", "WHAT"], rows))
    if body.get("more"):
        click.echo("(more: narrow --from/--to or raise --limit)")


COMMANDS = [history, events]
