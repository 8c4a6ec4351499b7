#!/usr/bin/env python3
"""A small, fast OpenAI-compatible model server that stands in for llama-server / vLLM.

It exists so that tests, the demo config and the benchmarks can run real processes speaking
the real protocol on machines with no GPU and no weights. It behaves like a model server
where that matters to the router and the worker: it binds its port only once "loaded", logs to
stdout, streams SSE token by token at a configurable rate, notices when a client goes away,
and can be told to crash (with any exit code: vLLM exits 0 when its engine dies), hang, ignore
SIGTERM, flood its log, or serve no ``/health`` (like llama-cpp-python's server).

Deliberately standalone (stdlib + tornado + msgspec, uvloop if present): it must not import
the project's packages, so that it measures and exercises the router from the outside.

    python scripts/mock_engine.py --port 8001 --model tiny --tokens-per-second 50
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import hashlib
import json
import os
import signal
import struct
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgspec
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError

DEFAULT_RESPONSE = "This is a deterministic reply from the mock engine."


# --------------------------------------------------------------------------- logging


def log(line: str) -> None:
    """One stdout line, flushed at once: the worker tails our stdout line by line."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


LIBCUDA_ENV = "LLM_ROUTER_LIBCUDA"  # the CUDA driver library to load (default: libcuda.so.1)
MIB = 1024 * 1024


class CudaError(RuntimeError):
    pass


class CudaHold:
    """Real GPU memory held through the CUDA driver API (``--gpu-mb``), so NVML sees a real
    process using real memory: ``cuInit``, then on each device this process sees (the driver
    applies ``CUDA_VISIBLE_DEVICES``) a context and one ``cuMemAlloc`` of ``mib`` MiB, kept
    until the process exits. No toolkit, no torch: ``ctypes`` on the driver library alone.
    ``lib`` is the loaded library (a stand-in in tests)."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.contexts: list[ctypes.c_void_p] = []
        self.pointers: list[int] = []

    @classmethod
    def load(cls, path: str = "") -> "CudaHold":
        path = path or os.environ.get(LIBCUDA_ENV) or "libcuda.so.1"
        try:
            return cls(ctypes.CDLL(path))
        except OSError as exc:
            raise CudaError(f"--gpu-mb needs the NVIDIA driver's {path}, which cannot be loaded ({exc})") from None

    def _check(self, what: str, result: int) -> None:
        if result != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(result, ctypes.byref(text))
            name = text.value.decode() if text.value else "unknown error"
            raise CudaError(f"{what} failed: CUDA error {result} ({name})")

    def hold(self, mib: int) -> int:
        """Allocate ``mib`` MiB on every visible device; returns how many devices."""
        self._check("cuInit", self.lib.cuInit(0))
        count = ctypes.c_int()
        self._check("cuDeviceGetCount", self.lib.cuDeviceGetCount(ctypes.byref(count)))
        if count.value == 0:
            raise CudaError("no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})")
        for ordinal in range(count.value):
            device = ctypes.c_int()
            self._check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(device), ordinal))
            ctx = ctypes.c_void_p()
            self._check("cuCtxCreate", self.lib.cuCtxCreate_v2(ctypes.byref(ctx), 0, device))
            self.contexts.append(ctx)
            pointer = ctypes.c_uint64()
            self._check(f"cuMemAlloc of {mib} MiB on device {ordinal}",
                        self.lib.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(mib * MIB)))
            self.pointers.append(pointer.value)
        return count.value


EXIT_CODE = 1  # of a crash (--exit-code)


def die(message: str) -> None:
    """Exit like a crashing engine: a last line on stderr, then no cleanup at all."""
    try:
        sys.stdout.flush()
    finally:
        sys.stderr.write(f"fatal: {message}\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)


# --------------------------------------------------------------------------- requests

class RequestError(tornado.web.HTTPError):
    """An error answered in OpenAI's shape; raised from handlers, rendered by write_error."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(status)
        self.message = message
        self.kind = kind


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class GenerateRequest(msgspec.Struct):
    """Only the fields the mock acts on; everything else in the body is skipped by msgspec."""

    model: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream_options: StreamOptions | None = None


class Message(msgspec.Struct):
    role: str
    content: Any = None


class ChatRequest(GenerateRequest):
    messages: list[Message] = msgspec.field(default_factory=list)


class CompletionRequest(GenerateRequest):
    prompt: Any = ""


class EmbeddingRequest(msgspec.Struct):
    input: Any
    model: str | None = None
    encoding_format: str = "float"


def decode(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """Decode a request body or answer 400 the way OpenAI does."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise RequestError(400, f"Invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise RequestError(400, f"Malformed JSON body: {exc}") from None


def count_words(value: Any) -> int:
    """Prompt 'tokens' are words: good enough for usage numbers, and deterministic."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        if all(isinstance(item, int) for item in value):  # a token array
            return len(value)
        return sum(count_words(item) for item in value)
    if isinstance(value, dict):  # a content part such as {"type": "text", "text": ...}
        return count_words(value.get("text"))
    return 0


# --------------------------------------------------------------------------- prefix cache

PROMPT_BLOCK_WORDS = 32  # a completion prompt is cached in blocks of this many words


class PrefixCache:
    """An engine's KV prefix cache, modelled: an LRU of prefix hashes, at most ``capacity``.

    A prompt is a sequence of blocks (a chat message: role + content; a completion prompt: runs
    of ``PROMPT_BLOCK_WORDS`` words), each with its token count (whitespace words, as the usage
    numbers count them). Its prefixes hash cumulatively; the longest prefix already cached is
    free, the rest must be computed (``TTFT = base + per_token × uncached``). Every prefix of the
    prompt is cached afterwards, as llama.cpp (``cache_prompt``) and vLLM's prefix caching keep
    what they computed; the generated answer is not (the next turn sends it back as a message
    and pays for it once). Eviction takes the least recently used prefix, the longest first
    among those of one prompt (a radix cache drops leaves before the shared trunk)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[bytes, None] = OrderedDict()

    def admit(self, blocks: list[tuple[bytes, int]]) -> tuple[int, int]:
        """(cached, uncached) tokens of a prompt; its prefixes are cached from now on."""
        h = hashlib.blake2b(digest_size=16)
        prefixes: list[tuple[bytes, int]] = []
        for data, tokens in blocks:
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
            prefixes.append((h.digest(), tokens))
        total = sum(t for _, t in prefixes)
        cached = 0
        for k in range(len(prefixes) - 1, -1, -1):
            if prefixes[k][0] in self.entries:
                cached = sum(t for _, t in prefixes[:k + 1])
                break
        for digest, _ in reversed(prefixes):  # the shorter (shared) prefixes stay the longest, as in a radix tree
            self.entries[digest] = None
            self.entries.move_to_end(digest)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return cached, total - cached


def message_blocks(messages: list[Any]) -> list[tuple[bytes, int]]:
    return [(m.role.encode() + b"\0" + msgspec.json.encode(m.content), count_words(m.content)) for m in messages]


def prompt_blocks(prompt: Any) -> list[tuple[bytes, int]]:
    if isinstance(prompt, str):
        words = prompt.split()
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        words = [str(t) for t in prompt]
    else:
        return [(msgspec.json.encode(prompt), count_words(prompt))]
    n = PROMPT_BLOCK_WORDS
    return [(" ".join(words[i:i + n]).encode(), len(words[i:i + n])) for i in range(0, len(words), n)]


# --------------------------------------------------------------------------- engine state

@dataclass
class Stats:
    """Counters behind /debug/stats, so tests can see what the engine itself observed."""

    requests: int = 0
    completed_requests: int = 0
    cancelled_requests: int = 0
    active_streams: int = 0
    cancelled_streams: int = 0
    completed_streams: int = 0
    prompt_tokens_cached: int = 0  # the prefix cache model (--prefix-cache): tokens found cached
    prompt_tokens_computed: int = 0  # ... and tokens computed (each cost --ttft-per-token)


@dataclass
class Engine:
    """Configuration plus mutable state shared by all handlers."""

    model: str
    words: list[str]
    max_tokens: int
    tokens_per_second: float
    embedding_dim: int
    crash_after: int | None
    crash_mid_stream: bool
    hang_mid_stream: bool
    fail_health: bool
    quiet: bool
    ttft_base: float = 0.0
    ttft_per_token: float = 0.0
    cache: PrefixCache | None = None
    stats: Stats = field(default_factory=Stats)
    prefill: asyncio.Lock = field(default_factory=asyncio.Lock)  # one prompt computed at a time
    next_id: int = 0

    def piece(self, index: int) -> str:
        """Token ``index`` of the reply: the response words, repeated; a token is a word."""
        word = self.words[index % len(self.words)]
        return word if index == 0 else " " + word

    def text(self, n: int) -> str:
        return "".join(self.piece(i) for i in range(n))

    def new_id(self, prefix: str) -> str:
        self.next_id += 1
        return f"{prefix}-mock-{self.next_id}"

    def request_completed(self) -> None:
        """Count a served model request; --crash-after dies once the count is reached."""
        self.stats.completed_requests += 1
        if self.crash_after is not None and self.stats.completed_requests >= self.crash_after:
            die(f"simulated crash after {self.stats.completed_requests} requests")

    def embedding(self, item: Any) -> tuple[float, ...]:
        """A unit vector derived from a hash of the input, rounded to float32.

        Rounding to float32 here means the "float" and "base64" encodings carry exactly the
        same numbers, as they do from OpenAI.
        """
        key = item.encode() if isinstance(item, str) else msgspec.json.encode(item)
        raw = hashlib.shake_256(key).digest(4 * self.embedding_dim)
        values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{self.embedding_dim}I", raw)]
        norm = sum(v * v for v in values) ** 0.5 or 1.0
        packed = struct.pack(f"<{self.embedding_dim}f", *(v / norm for v in values))
        return struct.unpack(f"<{self.embedding_dim}f", packed)


# --------------------------------------------------------------------------- handlers

class BaseHandler(tornado.web.RequestHandler):
    """JSON in and out, OpenAI-shaped errors, no per-request ETag hashing (we must be fast)."""

    counted = False  # model requests count towards /debug/stats "requests"

    @property
    def engine(self) -> Engine:
        return self.application.settings["engine"]

    def set_default_headers(self) -> None:
        self.set_header("Server", "mock-engine")

    def compute_etag(self) -> None:
        return None

    def prepare(self) -> None:
        if self.counted:
            self.engine.stats.requests += 1

    def send_json(self, obj: Any, status: int = 200) -> "asyncio.Future[None]":
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        return self.finish(msgspec.json.encode(obj))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, RequestError):
            message, kind = exc.message, exc.kind
        else:
            message = self._reason
            kind = "invalid_request_error" if status_code < 500 else "server_error"
        self.send_json({"error": {"message": message, "type": kind, "code": None}}, status_code)


class HealthHandler(BaseHandler):
    def get(self) -> None:
        if self.engine.fail_health:
            self.send_json({"status": "unhealthy"}, 503)
        else:
            self.send_json({"status": "ok"})


class ModelsHandler(BaseHandler):
    def get(self) -> None:
        created = self.application.settings["started_at"]
        self.send_json({"object": "list", "data": [
            {"id": self.engine.model, "object": "model", "created": created, "owned_by": "mock-engine"},
        ]})


class StatsHandler(BaseHandler):
    def get(self) -> None:
        self.send_json(vars(self.engine.stats))


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise RequestError(404, f"Unknown route: {self.request.method} {self.request.path}")


class GenerateHandler(BaseHandler):
    """Shared generation logic for chat and text completions, JSON or SSE.

    Subclasses only say how the request is decoded and how a choice / chunk looks.
    """

    counted = True
    request_type: type[GenerateRequest] = GenerateRequest
    object_name = ""
    chunk_object = ""
    id_prefix = ""

    def initialize(self) -> None:
        self.closed = asyncio.Event()

    def on_connection_close(self) -> None:
        """Tornado sees the close when a write fails or the socket reports it."""
        self.closed.set()

    def prompt_tokens(self, req: Any) -> int:
        raise NotImplementedError

    def blocks(self, req: Any) -> list[tuple[bytes, int]]:
        """The prompt as blocks for the prefix cache (``PrefixCache``)."""
        raise NotImplementedError

    async def prefill(self, req: Any) -> bool:
        """The time to first token of the prompt model: ``--ttft-base``, then
        ``--ttft-per-token`` for each token the prefix cache lacks, one prompt at a time (an
        engine computes prompts with all its compute). True if the client went away."""
        engine = self.engine
        if engine.cache is None and not engine.ttft_base and not engine.ttft_per_token:
            return False
        if engine.cache is not None:
            cached, uncached = engine.cache.admit(self.blocks(req))
        else:
            cached, uncached = 0, self.prompt_tokens(req)
        engine.stats.prompt_tokens_cached += cached
        engine.stats.prompt_tokens_computed += uncached
        if await self.pause(engine.ttft_base):
            return True
        if uncached and engine.ttft_per_token:
            async with engine.prefill:
                return await self.pause(uncached * engine.ttft_per_token)
        return self.closed.is_set()

    def choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def chunk_choice(self, index: int | None, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    async def pause(self, seconds: float) -> bool:
        """Sleep, but wake early when the client goes away; True if it did."""
        if seconds > 0:
            try:
                await asyncio.wait_for(self.closed.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        return self.closed.is_set()

    async def post(self) -> None:
        req = decode(self.request.body, self.request_type)
        n = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        finish_reason = "length" if n is not None else "stop"
        n = self.engine.max_tokens if n is None else n
        if n < 0:
            raise RequestError(400, "max_tokens must be non-negative")
        self.model = req.model or self.engine.model
        self.id = self.engine.new_id(self.id_prefix)
        self.created = int(time.time())
        prompt_tokens = self.prompt_tokens(req)
        if await self.prefill(req):
            self.cancelled(stream=req.stream)
            return
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            await self.stream(n, finish_reason, usage if include_usage else None)
            return
        rate = self.engine.tokens_per_second
        if await self.pause(n / rate if rate > 0 else 0):
            self.cancelled()
            return
        try:
            await self.send_json({
                "id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": [self.choice(self.engine.text(n), finish_reason)], "usage": usage,
            })
        except StreamClosedError:
            self.cancelled()
            return
        self.engine.request_completed()

    def cancelled(self, stream: bool = False) -> None:
        """Count a request whose client went away; the access log shows nginx's 499 for it."""
        if stream:
            self.engine.stats.cancelled_streams += 1
        else:
            self.engine.stats.cancelled_requests += 1
        self.set_status(499, "Client Closed Request")

    def frame(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": choices, **extra}
        return b"data: " + msgspec.json.encode(chunk) + b"\n\n"

    async def send_frame(self, data: bytes) -> bool:
        """Write and flush one SSE frame; False once the client has gone away."""
        if self.closed.is_set():
            return False
        self.write(data)
        try:
            await self.flush()
        except StreamClosedError:
            return False
        return True

    def frames(self, n: int, finish_reason: str, usage: dict[str, int] | None) -> Iterator[tuple[float, bytes]]:
        """The stream as (seconds after start, frame) pairs; token ``i`` is due at (i + 1) / rate.

        A generator, so a long stream costs nothing before its first byte.
        """
        rate = self.engine.tokens_per_second
        first = self.chunk_choice(None, None)
        if first:
            yield 0.0, self.frame([first])
        for i in range(n):
            yield (i + 1) / rate if rate > 0 else 0.0, self.frame([self.chunk_choice(i, None)])
        end = n / rate if rate > 0 else 0.0
        yield end, self.frame([self.chunk_choice(None, finish_reason)])
        if usage is not None:
            yield end, self.frame([], usage=usage)
        yield end, b"data: [DONE]\n\n"

    async def stream(self, n: int, finish_reason: str, usage: dict[str, int] | None) -> None:
        stats = self.engine.stats
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        stats.active_streams += 1
        start = asyncio.get_running_loop().time()
        sent = 0
        try:
            for at, data in self.frames(n, finish_reason, usage):
                if self.engine.hang_mid_stream and sent == 2:
                    await self.closed.wait()  # keep the connection open, send nothing, forever
                delay = start + at - asyncio.get_running_loop().time()
                if await self.pause(delay) or not await self.send_frame(data):
                    self.cancelled(stream=True)
                    return
                sent += 1
                if self.engine.crash_mid_stream and sent == 2:
                    die("simulated crash in the middle of a stream")
        finally:
            stats.active_streams -= 1
        stats.completed_streams += 1
        try:
            await self.finish()
        except StreamClosedError:
            return
        self.engine.request_completed()


class ChatHandler(GenerateHandler):
    request_type = ChatRequest
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def prompt_tokens(self, req: ChatRequest) -> int:
        return sum(count_words(m.content) for m in req.messages)

    def blocks(self, req: ChatRequest) -> list[tuple[bytes, int]]:
        return message_blocks(req.messages)

    def choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, index: int | None, finish_reason: str | None) -> dict[str, Any]:
        if index is not None:
            delta: dict[str, str] = {"content": self.engine.piece(index)}
        elif finish_reason is None:
            delta = {"role": "assistant", "content": ""}
        else:
            delta = {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


class CompletionHandler(GenerateHandler):
    request_type = CompletionRequest
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def prompt_tokens(self, req: CompletionRequest) -> int:
        return count_words(req.prompt)

    def blocks(self, req: CompletionRequest) -> list[tuple[bytes, int]]:
        return prompt_blocks(req.prompt)

    def choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, index: int | None, finish_reason: str | None) -> dict[str, Any]:
        if index is None and finish_reason is None:
            return {}  # text completions have no role chunk
        text = self.engine.piece(index) if index is not None else ""
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


class EmbeddingHandler(BaseHandler):
    counted = True

    async def post(self) -> None:
        req = decode(self.request.body, EmbeddingRequest)
        items = self.inputs(req.input)
        if req.encoding_format not in ("float", "base64"):
            raise RequestError(400, "encoding_format must be 'float' or 'base64'")
        data = []
        for index, item in enumerate(items):
            vector: Any = self.engine.embedding(item)
            if req.encoding_format == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = sum(count_words(item) for item in items)
        try:
            await self.send_json({"object": "list", "data": data, "model": req.model or self.engine.model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        except StreamClosedError:
            return
        self.engine.request_completed()

    @staticmethod
    def inputs(value: Any) -> list[Any]:
        """OpenAI accepts a string, a token array, or a list of either."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(v, int) for v in value):
                return [value]
            if all(isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, int) for t in v))
                   for v in value):
                return value
        raise RequestError(400, "'input' must be a non-empty string, token array, or list of those")


# --------------------------------------------------------------------------- process

def log_request(handler: tornado.web.RequestHandler) -> None:
    """One access-log line per request, like a real server (unless --quiet)."""
    engine: Engine = handler.application.settings["engine"]
    if not engine.quiet:
        req = handler.request
        log(f"{req.method} {req.path} {handler.get_status()} {1000 * req.request_time():.2f}ms")


def make_app(engine: Engine, health: bool = True) -> tornado.web.Application:
    return tornado.web.Application(
        [
            *([(r"/health", HealthHandler)] if health else []),
            (r"/v1/models", ModelsHandler),
            (r"/v1/chat/completions", ChatHandler),
            (r"/v1/completions", CompletionHandler),
            (r"/v1/embeddings", EmbeddingHandler),
            (r"/debug/stats", StatsHandler),
        ],
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        engine=engine,
        started_at=int(time.time()),
    )


def chatty(rate: int, stop: threading.Event) -> None:
    """Print ``rate`` lines per second, written in blocks so that high rates are reachable.

    A thread rather than a task: a full stdout pipe then slows the log, not the serving loop.
    """
    start, written = time.monotonic(), 0
    while not stop.is_set():
        due = min(int((time.monotonic() - start) * rate) - written, max(rate // 10, 1))
        if due > 0:
            sys.stdout.write("".join(
                f"chatty {i}: slot 0 | task {i} | n_past = {i % 4096} | decode ok\n"
                for i in range(written, written + due)))
            sys.stdout.flush()
            written += due
        time.sleep(0.005)


async def serve(opts: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    if opts.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)

    log(f"mock engine {opts.model} loading")
    if opts.startup_delay > 0:  # like loading weights: the port is not bound yet
        deadline = loop.time() + opts.startup_delay
        step = min(0.25, opts.startup_delay / 4)
        while (left := deadline - loop.time()) > 0 and not stopping.is_set():
            done = 100 * (1 - left / opts.startup_delay)
            log(f"loading model {opts.model} ... {done:.0f}%")
            try:
                await asyncio.wait_for(stopping.wait(), min(step, left))
            except asyncio.TimeoutError:
                pass

    if opts.load_file:  # like llama-server reading its GGUF: from the page cache or from the disk
        began = time.monotonic()
        size = await asyncio.to_thread(read_whole, opts.load_file)
        log(f"loaded {size >> 20} MiB of {opts.load_file} in {time.monotonic() - began:.3f}s")

    claim = claim_fake_vram(opts.vram_mb, opts.fake_nvml_dir)
    if opts.gpu_mb > 0:
        try:
            devices = CudaHold.load().hold(opts.gpu_mb)
        except CudaError as exc:
            die(str(exc))
        log(f"holding {opts.gpu_mb} MiB on each of {devices} GPU(s)")
    engine = Engine(
        model=opts.model, words=opts.response.split() or ["mock"], max_tokens=opts.max_tokens,
        tokens_per_second=opts.tokens_per_second, embedding_dim=opts.embedding_dim,
        crash_after=opts.crash_after, crash_mid_stream=opts.crash_mid_stream,
        hang_mid_stream=opts.hang_mid_stream, fail_health=opts.fail_health, quiet=opts.quiet,
        ttft_base=opts.ttft_base, ttft_per_token=opts.ttft_per_token,
        cache=PrefixCache(opts.prefix_cache) if opts.prefix_cache > 0 else None)
    server: HTTPServer | None = None
    chatter = threading.Event()
    if not stopping.is_set():
        server = make_app(engine, health=not opts.no_health).listen(opts.port, opts.host)
        log(f"mock engine {opts.model} ready; listening on http://{opts.host}:{opts.port}")
        if opts.chatty > 0:
            threading.Thread(target=chatty, args=(opts.chatty, chatter), daemon=True).start()
        await stopping.wait()
    chatter.set()
    if server is not None:
        server.stop()
    if claim:
        with contextlib.suppress(OSError):
            os.unlink(claim)
    log("shutting down")


def claim_fake_vram(mib: int, folder: str) -> str:
    """With ``--vram-mb`` and ``--fake-nvml-dir`` (the folder the stand-in NVML of tests and
    benchmarks reads, tests/fake_nvml.py): say this process now uses ``mib`` MiB on each GPU of
    its ``CUDA_VISIBLE_DEVICES``, as a loaded engine would. Returns the file written ("" = none)."""
    if mib <= 0 or not folder:
        return ""
    gpus = [int(g) for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip().isdigit()]
    path = os.path.join(folder, f"{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"gpus": gpus, "mb": mib}, f)
    return path


def read_whole(path: str) -> int:
    """Read ``path`` to its end in 4 MiB chunks (what loading weights costs); its size."""
    size, buffer = 0, bytearray(4 << 20)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            size += n
    return size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mock OpenAI-compatible model server for tests and benchmarks.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", default="mock", help="model id reported by /v1/models")
    p.add_argument("--load-file", default="", metavar="PATH",
                   help="read this file whole before listening, as an engine reads its weights")
    p.add_argument("--startup-delay", type=float, default=0.0, metavar="S",
                   help="seconds of 'loading' before the port is bound")
    p.add_argument("--tokens-per-second", type=float, default=0.0, metavar="R",
                   help="generation pace, streamed or not (0: as fast as possible)")
    p.add_argument("--max-tokens", type=int, default=16, metavar="N",
                   help="tokens generated when the request sets no max_tokens")
    p.add_argument("--response", default=DEFAULT_RESPONSE, metavar="TEXT",
                   help="reply text, repeated or truncated to the token count (a token is a word)")
    p.add_argument("--embedding-dim", type=int, default=16, metavar="N")
    p.add_argument("--prefix-cache", type=int, default=0, metavar="N",
                   help="model a KV prefix cache: an LRU of N prompt-prefix hashes (0: none, every token computed)")
    p.add_argument("--ttft-base", type=float, default=0.0, metavar="S",
                   help="seconds before the first token of every request")
    p.add_argument("--ttft-per-token", type=float, default=0.0, metavar="S",
                   help="seconds per prompt token not in the prefix cache (a token is a whitespace word), "
                        "one prompt computed at a time")
    p.add_argument("--crash-after", type=int, default=None, metavar="N",
                   help="crash after N completed model requests")
    p.add_argument("--crash-mid-stream", action="store_true", help="crash after 2 chunks of a stream")
    p.add_argument("--exit-code", type=int, default=1, metavar="N",
                   help="exit status of a crash (0: like vLLM, whose API server exits 0 when its engine dies)")
    p.add_argument("--hang-mid-stream", action="store_true", help="stop sending after 2 chunks of a stream")
    p.add_argument("--ignore-sigterm", action="store_true", help="only SIGKILL stops the process")
    p.add_argument("--fail-health", action="store_true", help="/health always answers 503")
    p.add_argument("--no-health", action="store_true", help="no /health route (404), like llama-cpp-python")
    p.add_argument("--vram-mb", type=int, default=0, metavar="N",
                   help="once loaded, use N MiB on each GPU of CUDA_VISIBLE_DEVICES (stand-in NVML only)")
    p.add_argument("--fake-nvml-dir", default="", metavar="DIR",
                   help="where the stand-in NVML (tests/fake_nvml.py, LLM_ROUTER_FAKE_NVML_DIR) reads --vram-mb")
    p.add_argument("--gpu-mb", type=int, default=0, metavar="N",
                   help="once loaded, hold N MiB of real memory on each GPU it sees (CUDA driver API; "
                        "exits with one line where no driver is)")
    p.add_argument("--chatty", type=int, default=0, metavar="N", help="print N log lines per second")
    p.add_argument("--quiet", action="store_true", help="no access-log line per request")
    p.add_argument("--no-uvloop", action="store_true", help="use the stdlib asyncio loop")
    opts = p.parse_args(argv)
    if opts.embedding_dim < 1 or opts.max_tokens < 0 or opts.tokens_per_second < 0:
        p.error("--embedding-dim must be >= 1, --max-tokens and --tokens-per-second >= 0")
    if opts.gpu_mb < 0 or opts.vram_mb < 0:
        p.error("--gpu-mb and --vram-mb must be >= 0")
    if opts.prefix_cache < 0 or opts.ttft_base < 0 or opts.ttft_per_token < 0:
        p.error("--prefix-cache, --ttft-base and --ttft-per-token must be >= 0")
    return opts


def main(argv: list[str] | None = None) -> None:
    global EXIT_CODE
    opts = parse_args(argv)
    EXIT_CODE = opts.exit_code
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    run = asyncio.run
    if not opts.no_uvloop:
        try:
            import uvloop
            run = uvloop.run
        except ImportError:
            pass
    try:
        run(serve(opts))
    except OSError as exc:  # typically: the port is taken
        die(f"cannot listen on {opts.host}:{opts.port}: {exc}")
    # Exit without interpreter teardown: open streams need no draining (a stopped engine does
    # not drain either) and a daemon --chatty thread may still hold stdout's lock.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
