"""Engine presets: ``engine = "vllm"`` in a model entry instead of a hand-written command.

A preset knows, for one kind of model server, the command that launches it, the health path,
how long it may take to start and to stop, its default mode, and how it treats the ``model``
field of a request. ``apply_preset`` turns a decoded entry into a complete ``ModelConfig``
(``parse_config`` calls it once per model), so the worker, placement and the CLI only ever see
an explicit ``command`` and never need to know about engines.

Fields written in the file always win over the preset (``given``); ``engine_args`` are appended
to the command, preset or explicit. The argv uses the usual ``{host}``/``{port}`` placeholders,
filled in at each start.

Served model names. The router forwards request bodies unchanged, so the engine receives the
name the client used, which may be any alias of the model:

- llama.cpp ``llama-server`` serves one model and ignores ``model`` in requests (``--alias``
  only sets the name ``/v1/models`` reports): any alias works.
- vLLM rejects names it does not serve (404 "The model `x` does not exist"), but
  ``--served-model-name`` takes several values: the preset passes the id and every alias.
- SGLang also rejects unknown names (400, recent versions) and takes a single
  ``--served-model-name``: the preset passes the id, and ``warnings`` says that aliases will
  be refused by the server (give SGLang models no aliases, or front them with one name).
- TEI ``text-embeddings-router`` ignores ``model`` in requests: any alias works.
- llama-cpp-python's server answers any unknown ``model`` with its one model: any alias works.

CLI assumptions (checked against each project's documented flags, not run here):
``llama-server -m FILE --host H --port P --alias NAME [--embedding]``;
``vllm serve MODEL --host H --port P --served-model-name N [N ...]``;
``python3 -m sglang.launch_server --model-path MODEL --host H --port P --served-model-name N``;
``text-embeddings-router --model-id MODEL --hostname H --port P``;
``python3 -m llama_cpp.server --model FILE --host H --port P --model_alias NAME
--interrupt_requests false [--embedding true]`` (llama-cpp-python 0.3, checked against its
``server/settings.py``: by default a new request interrupts the one being generated, so the
preset turns that off and concurrent requests queue). Each answers ``GET /health`` with 200 once
it can serve (llama-server answers 503 while loading; vLLM, SGLang and TEI do not listen before
that), except llama-cpp-python, which has no ``/health`` (404) and is polled on ``/v1/models``
(it listens only once the model is loaded). Binaries are looked up on ``PATH``: a model's ``env.PATH`` picks
another installation (e.g. a virtualenv's ``bin``), or an explicit ``command`` replaces the
whole template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Literal

import msgspec
from llm_lab_router.model_config import ENGINES, ModelConfig
from llm_lab_router.protocol import Mode

ServedNames = Literal["any", "all", "one"]


@dataclass(frozen=True)
class Preset:
    """One server kind. ``argv`` builds the command from the (mode-resolved) entry; the other
    fields are defaults for the entry's own fields of the same name. ``names``: how the server
    treats a request's ``model``: ``any`` ignores it, ``all`` is launched with every alias,
    ``one`` accepts only the id (aliases are refused by the server). ``unserved``: paths the
    server answers 404, so a ``health`` set to one of them can never pass (``config check``)."""

    argv: Callable[[ModelConfig], list[str]]
    health: str = "/health"
    startup_timeout: float = 120.0
    stop_grace: float = 10.0
    mode: Mode = "chat"
    names: ServedNames = "any"
    unserved: tuple[str, ...] = ()


def _llama_cpp(m: ModelConfig) -> list[str]:
    argv = ["llama-server", "-m", m.model_path, "--host", "{host}", "--port", "{port}", "--alias", m.id]
    return [*argv, "--embedding"] if m.mode == "embedding" else argv


def _vllm(m: ModelConfig) -> list[str]:
    return ["vllm", "serve", m.model_path, "--host", "{host}", "--port", "{port}", "--served-model-name", *m.names]


def _sglang(m: ModelConfig) -> list[str]:
    return ["python3", "-m", "sglang.launch_server", "--model-path", m.model_path, "--host", "{host}",
            "--port", "{port}", "--served-model-name", m.id]


def _tei(m: ModelConfig) -> list[str]:
    return ["text-embeddings-router", "--model-id", m.model_path, "--hostname", "{host}", "--port", "{port}"]


def _llama_cpp_python(m: ModelConfig) -> list[str]:
    argv = ["python3", "-m", "llama_cpp.server", "--model", m.model_path, "--host", "{host}", "--port", "{port}",
            "--model_alias", m.id, "--interrupt_requests", "false"]
    return [*argv, "--embedding", "true"] if m.mode == "embedding" else argv


PRESETS: dict[str, Preset] = {
    "command": Preset(argv=lambda m: list(m.command)),  # today's behaviour: the explicit command
    # Big GGUF files on network disks take minutes to map; llama-server exits fast on SIGTERM.
    "llama.cpp": Preset(argv=_llama_cpp, startup_timeout=300.0),
    # Weights load, CUDA graphs compile: minutes. Shutdown frees GPU memory and joins workers.
    "vllm": Preset(argv=_vllm, startup_timeout=600.0, stop_grace=30.0, names="all"),
    "sglang": Preset(argv=_sglang, startup_timeout=600.0, stop_grace=30.0, names="one"),
    # May download the model from the Hub on first start.
    "tei": Preset(argv=_tei, startup_timeout=300.0, mode="embedding"),
    # No /health route; the port opens once the model is loaded, so /v1/models says "ready".
    "llama-cpp-python": Preset(argv=_llama_cpp_python, health="/v1/models", startup_timeout=300.0,
                               unserved=("/health",)),
}
DEFAULTED = ("mode", "health", "startup_timeout", "stop_grace")  # fields a preset may default


def apply_preset(model: ModelConfig, given: Collection[str] = ()) -> ModelConfig:
    """The complete entry: preset defaults for the fields not in ``given`` (the keys written
    in the file), the preset's command unless one is written, then ``engine_args``.

    Pure; apply it once per decoded entry (a second time would append ``engine_args`` again).
    Raises ``ValueError("field: problem")`` for an entry the preset cannot complete."""
    preset = PRESETS[model.engine]
    if model.engine == "command" and not model.command:
        raise ValueError('command: required when engine is "command" (the default); '
                         f"or set engine to one of {', '.join(e for e in ENGINES if e != 'command')}")
    if not model.command and not model.model_path:
        raise ValueError(f"model_path: required by engine {model.engine!r} (or give an explicit command)")
    model = msgspec.structs.replace(model, **{f: getattr(preset, f) for f in DEFAULTED if f not in given})
    base = model.command or preset.argv(model)
    return msgspec.structs.replace(model, command=[*base, *model.engine_args])


def warnings(model: ModelConfig) -> list[str]:
    """Things that will not work as the operator probably expects (the file is still valid)."""
    if PRESETS[model.engine].names == "one" and len(model.names) > 1:
        aliases = ", ".join(model.names[1:])
        return [f"{model.id}: engine {model.engine!r} accepts one served model name ({model.id!r}); "
                f"requests naming an alias ({aliases}) are refused by the server"]
    return []
