"""The query parameters of the ``/api`` routes: declared once, parsed strictly, documented
from the same declaration (``router/http/openapi.py`` renders each ``Param``).

The rule: a parameter that is *absent* takes its default; one that is *present* must be valid.
Empty or blank is a 400 naming the parameter, never "absent": a script calling
``/api/logs/m/clear?keep_minutes=$KEEP`` with ``KEEP`` unset must not clear every log line of
the model, which is what an absent ``keep_minutes`` means (the manual's default, kept).

- Values are read raw from ``request.query_arguments``: Tornado's ``get_argument`` strips
  whitespace, so ``keep_minutes=%20`` would arrive as ``""`` and look absent.
- Numbers are ASCII digits only, at most 18 of them: ``"²".isdigit()`` is true but ``int("²")``
  raises, and ``int`` of a 5,000-digit string raises too (both were 500s).
- ``check_query`` (router/http/validate.py) has already refused unknown, repeated, non-UTF-8 and
  unprintable parameters when a handler reads one.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Mapping

from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.core.errors import ApiError

Args = Mapping[str, list[bytes]]
Json = dict[str, Any]

MAX_COUNT = 10**18 - 1  # 18 ASCII digits: fits a signed 64-bit integer, and int() of it is cheap
DIGITS = re.compile(r"[0-9]{1,18}")
U64 = 2**64 - 1  # each half of a Redis stream id
STREAM_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
FALSE_WORDS = ("false", "0", "no", "off")
TRUE_WORDS = ("true", "1", "yes", "on")


def invalid(message: str) -> ApiError:
    return ApiError(400, message, "invalid_parameter")


@dataclass(frozen=True, kw_only=True)
class Param:
    """One optional query parameter: its name, what it does, and what leaving it out means."""

    name: str
    description: str
    absent: str

    def raw(self, args: Args) -> str | None:
        """The value as sent (unstripped); ``None`` only when the parameter is absent."""
        values = args.get(self.name)
        if not values:
            return None
        text = values[0].decode("utf-8", "replace")
        if not text.strip():
            raise invalid(f"query parameter {self.name!r} is empty: give a value, or leave the parameter out "
                          f"for its default: {self.absent}")
        return text

    def schema(self) -> Json:
        raise NotImplementedError

    def openapi(self) -> Json:
        return {"name": self.name, "in": "query", "required": False, "schema": self.schema(),
                "description": f"{self.description}. Absent: {self.absent}. Present, it must be valid: "
                               "empty or blank is a 400 naming the parameter."}


@dataclass(frozen=True, kw_only=True)
class Count(Param):
    """A non-negative integer in ASCII digits, from ``minimum`` to ``maximum``."""

    default: int
    maximum: int = MAX_COUNT
    minimum: int = 0

    def parse(self, args: Args) -> int:
        text = self.raw(args)
        if text is None:
            return self.default
        if not DIGITS.fullmatch(text) or not self.minimum <= int(text) <= self.maximum:
            raise invalid(f"{self.name} must be an integer from {self.minimum} to {self.maximum} in ASCII digits, "
                          f"got {text!r}")
        return int(text)

    def schema(self) -> Json:
        return {"type": "integer", "minimum": self.minimum, "maximum": self.maximum, "default": self.default}


@dataclass(frozen=True, kw_only=True)
class Flag(Param):
    """A boolean: true/1/yes/on or false/0/no/off, any case."""

    default: bool

    def parse(self, args: Args) -> bool:
        text = self.raw(args)
        if text is None:
            return self.default
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise invalid(f"{self.name} must be one of {', '.join(TRUE_WORDS + FALSE_WORDS)}, got {text!r}")

    def schema(self) -> Json:
        return {"type": "string", "enum": [*TRUE_WORDS, *FALSE_WORDS], "default": str(self.default).lower()}


@dataclass(frozen=True, kw_only=True)
class StreamId(Param):
    """A Redis stream id (``1700000000000-0``), also accepted from a header (``Last-Event-ID``),
    which wins over the query parameter. Checked here, so that Redis never refuses it mid-stream."""

    header: str

    def parse(self, args: Args, header_value: str | None) -> str | None:
        text = self.raw(args)
        from_query = None if text is None else self.check(text, self.name)  # checked even when the header wins
        return from_query if header_value is None else self.check(header_value, f"the {self.header} header")

    def check(self, text: str, source: str) -> str:
        match = STREAM_ID.fullmatch(text)
        if not match or any(int(part) > U64 for part in match.groups() if part is not None):
            raise invalid(f"{source} must be a stream id like 1700000000000-0 (ASCII digits), got {text!r}")
        return text

    def schema(self) -> Json:
        return {"type": "string", "pattern": STREAM_ID.pattern.join("^$")}


@dataclass(frozen=True, kw_only=True)
class Name(Param):
    """A name as given (a worker id): any text but empty or blank, which ``raw`` refuses."""

    def parse(self, args: Args) -> str | None:
        return self.raw(args)

    def schema(self) -> Json:
        return {"type": "string", "minLength": 1}


TIME = re.compile(r"(?:[0-9]{1,12}(?:\.[0-9]{1,6})?|-[0-9]{1,9}[smhd]|now)")
TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, kw_only=True)
class Time(Param):
    """A moment: unix seconds (``1700000000``, ``1700000000.5``), ``now``, or a time ago
    (``-15m``, ``-1h``, ``-7d``, ``-30s``)."""

    def parse(self, args: Args, now: float, default: float) -> float:
        text = self.raw(args)
        if text is None:
            return default
        if not TIME.fullmatch(text):
            raise invalid(f"{self.name} must be unix seconds, 'now', or a time ago like -15m, -1h, -7d, got {text!r}")
        if text == "now":
            return now
        if text.startswith("-"):
            return now - int(text[1:-1]) * TIME_UNITS[text[-1]]
        return float(text)

    def schema(self) -> Json:
        return {"type": "string", "pattern": TIME.pattern.join("^$")}


DURATION = re.compile(r"([0-9]{1,9})([smhdw]?)")
UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``1d``, ``2w`` in seconds; ``ValueError`` otherwise."""
    match = DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"a duration must be digits with an optional unit s, m, h, d or w (e.g. 1d), got {text!r}")
    return int(match.group(1)) * UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True, kw_only=True)
class Duration(Param):
    """A span back from now: digits and an optional unit (``s`` ``m`` ``h`` ``d`` ``w``)."""

    default: str

    def parse(self, args: Args) -> float:
        text = self.raw(args)
        try:
            return parse_duration(self.default if text is None else text)
        except ValueError as exc:
            raise invalid(f"{self.name}: {exc}") from None

    def schema(self) -> Json:
        return {"type": "string", "pattern": DURATION.pattern.join("^$"), "default": self.default}


@dataclass(frozen=True, kw_only=True)
class Choice(Param):
    """One of a few words."""

    choices: tuple[str, ...]
    default: str | None = None  # what an absent parameter reads as (None: absent)

    def parse(self, args: Args) -> str | None:
        text = self.raw(args)
        if text is None:
            return self.default
        if text not in self.choices:
            raise invalid(f"{self.name} must be one of {', '.join(self.choices)}, got {text!r}")
        return text

    def schema(self) -> Json:
        schema: Json = {"type": "string", "enum": list(self.choices)}
        if self.default is not None:
            schema["default"] = self.default
        return schema


@dataclass(frozen=True)
class TimelineParams:
    """The query parameters of ``/api/history`` and ``/api/events``."""

    series: Choice
    model: Name
    host: Name
    gpu: Count
    start: Time
    end: Time
    step: Count
    kind: Name
    limit: Count

    def all(self) -> tuple[Param, ...]:
        return (self.series, self.model, self.host, self.gpu, self.start, self.end, self.step, self.kind, self.limit)


TIMELINE = TimelineParams(
    series=Choice(name="series", choices=("model", "gpu", "gpus", "host"),
                  description="which series: model (requests, errors, tokens, TTFT, latency and wait of model), "
                              "gpu (memory, utilisation, power, temperature of GPU gpu of host, and the VRAM "
                              "of each model's engine on it), gpus (every host's GPUs summed, VRAM per model), "
                              "host (CPU and RAM of host)",
                  absent="no points: only the list of recorded series (available)"),
    model=Name(name="model", description="a model id (series=model), or events concerning it",
               absent="series=model: 400; events: every model"),
    host=Name(name="host", description="a worker id (series=gpu or host), or events on it",
              absent="series=gpu or host: 400; events: every host"),
    gpu=Count(name="gpu", default=0, maximum=1023, description="the GPU index on host (series=gpu)",
              absent="GPU 0"),
    start=Time(name="from", description="the start: unix seconds, 'now', or a time ago (-15m, -1h, -24h, -7d)",
               absent="one hour ago"),
    end=Time(name="to", description="the end: unix seconds, 'now', or a time ago", absent="now"),
    step=Count(name="step", default=0, maximum=30 * 86400,
               description="seconds per point (rounded up to a multiple of the resolution read)",
               absent="the resolution read: 10 s within the last 24 h, 5 min beyond (by default)"),
    kind=Name(name="kind", description="only events of this kind (ready, evicted, crashed, ...)",
              absent="every kind"),
    # one ``limit`` for /api/events and /api/audit (PARAMS.by_name: a name is one parameter)
    limit=Count(name="limit", default=1000, minimum=1, maximum=100_000,
                description="at most this many entries (events, audit entries), the latest ones",
                absent="1000, the latest 1000 entries"),
)


@dataclass(frozen=True)
class RouteParams:
    """Every query parameter of the API, with the defaults and limits of this router's options."""

    wait: Flag
    tail: Count
    last_event_id: StreamId
    keep_minutes: Count
    worker: Name
    since: Duration
    limit: Count
    by: Choice

    def by_name(self) -> dict[str, Param]:
        return {p.name: p for p in (self.wait, self.tail, self.last_event_id, self.keep_minutes, self.worker,
                                    *TIMELINE.all(), self.since, self.by)}


@functools.cache
def route_params(options: RouterOptions) -> RouteParams:
    return RouteParams(
        wait=Flag(name="wait", default=True, description="wait until the model runs",
                  absent="true, answer 200 once the model runs, 503 if it fails to start; false answers "
                         "202 at once while it starts"),
        tail=Count(name="tail", default=options.log_tail_default, maximum=options.log_tail_max,
                   description="how many past log entries to send before the live ones, 0 for none",
                   absent=f"the last {options.log_tail_default} entries, LLM_ROUTER_LOG_TAIL_DEFAULT"),
        last_event_id=StreamId(name="last_event_id", header="Last-Event-ID",
                               description="resume right after this entry id (the SSE id: of the last event "
                                           "received), with no history; the Last-Event-ID header wins over it",
                               absent="history first (tail), then live entries"),
        keep_minutes=Count(name="keep_minutes", default=0,
                           description="minutes of recent log entries to keep; older ones are deleted, 0 deletes all",
                           absent="0, every entry of the model's log is deleted, as the manual says"),
        worker=Name(name="worker", description="act on this host only (a worker id, as GET /api/models/{alias}/info "
                                               "lists them); unknown, not live, or without the model in its "
                                               "catalog: 404",
                    absent="every host: a start goes where the scheduler places it, a stop reaches every host"),
        since=Duration(name="since", default="1d", description="how far back, e.g. 90s, 15m, 12h, 1d, 30d, 2w",
                       absent="1d, the last day"),
        limit=TIMELINE.limit,
        by=Choice(name="by", choices=("key", "group", "model"), default="key",
                  description="one row per key, group or model", absent="key"),
    )
