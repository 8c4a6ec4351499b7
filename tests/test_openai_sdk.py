"""The official openai Python SDK pointed at the router: what users actually run.

One cluster for the module (its own Redis, worker and router: the per-test Redis flush does
not touch it), models started on demand by the first request that needs them.
"""

from __future__ import annotations

import os

import openai
import pytest
from conftest import Processes
from helpers import DEMO_MODELS, model_block, start_router, start_worker, wait_models, write_config
from llm_lab_router.redis_server import RedisServer


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> openai.OpenAI:
    tmp = tmp_path_factory.mktemp("sdk")
    server = RedisServer(tmp / "redis", extra=["--appendonly", "no", "--save", ""]).start()
    procs = Processes(tmp)
    try:
        config = write_config(tmp / "models.toml", *DEMO_MODELS, model_block("manual", on_demand=False))
        start_worker(procs, server.url, config, f"w{os.getpid()}")
        router = start_router(procs, server.url)
        wait_models(router, 3)
        with openai.OpenAI(base_url=f"{router.url}/v1", api_key="sk-test", max_retries=0, timeout=30) as c:
            yield c
    finally:
        procs.stop_all()
        server.stop()


def test_chat(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="gpt-3.5-turbo", max_tokens=4,
                                           messages=[{"role": "user", "content": "你好"}])
    assert reply.object == "chat.completion" and reply.choices[0].message.content
    assert reply.usage.completion_tokens == 4


def test_streamed_chat_matches_the_plain_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi"}]
    plain = client.chat.completions.create(model="chatgpt", max_tokens=6, messages=messages)
    chunks = list(client.chat.completions.create(model="chatgpt", max_tokens=6, messages=messages, stream=True))
    assert len(chunks) > 3
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="demo-chat", prompt="Once upon a time", max_tokens=3)
    assert reply.object == "text_completion" and reply.choices[0].text


def test_embeddings(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model="text-embedding-ada-002", input=["a", "b"])
    assert [d.index for d in reply.data] == [0, 1] and len(reply.data[0].embedding) == 16


def test_model_list_and_retrieve(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list()} == {"demo-chat", "demo-embed", "manual"}
    assert client.models.retrieve("chatgpt").id == "demo-chat"


def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert "gpt-5" in err.value.message and err.value.code == "model_not_found"


def test_wrong_mode_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="text-embedding-ada-002", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_mode_mismatch"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="chatgpt", input="x")


def test_malformed_body_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/chat/completions", body={"model": 42, "messages": []}, cast_to=object)
    assert err.value.code == "invalid_request"


def test_model_not_running_and_not_on_demand_raises_503(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="manual", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 503 and "not running" in err.value.message


def test_async_streaming(client: openai.OpenAI) -> None:
    import asyncio

    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=str(client.base_url), api_key="sk-test", max_retries=0) as aclient:
            stream = await aclient.chat.completions.create(
                model="chatgpt", max_tokens=3, stream=True, messages=[{"role": "user", "content": "x"}])
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(run())
