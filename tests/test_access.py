"""Permissions per key and group (router/limits/access.py): which models a key may use and
start, and an admin key's scope. End to end: a real worker running mock engines, a real router
with a real TOML keys file."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, wait_for
from helpers import (
    assert_bad_keys_file,
    chat_body,
    model_block,
    request,
    start_router,
    start_worker,
    write_config,
)
from llm_lab_router.router.http.auth import parse_structured_keys
from llm_lab_router.router.limits.access import Access, Scope, access_of
from markdown_docs import blocks_and_prose, read

NAMES = ("vera", "tom", "tess", "olga", "sam")
KEYS = {name: f"{name}-key-0123456789abcdef" for name in NAMES}
ADMIN = "the-admin-key-0123456789abcdef"
KEYS_TOML = f"""
[groups.vision]
models = ["vis-*"]
start = "listed"

[groups.text]
models = ["chat", "small-*"]
start = "none"

[[keys]]
name = "vera"
key = "{KEYS['vera']}"
group = "vision"

[[keys]]
name = "tom"
key = "{KEYS['tom']}"
group = "text"

[[keys]]
name = "tess"            # the group's models, her own start rule
key = "{KEYS['tess']}"
group = "text"
start = "any"

[[keys]]
name = "olga"            # no permissions: everything, as before
key = "{KEYS['olga']}"

[[keys]]
name = "sam"             # a scoped admin key, from the client keys file
key = "{KEYS['sam']}"
admin = ["small-*"]
"""


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN if name == 'admin' else KEYS[name]}"}


def chat(router, name: str, model: str):
    return request("POST", f"{router.url}/v1/chat/completions", chat_body(model, max_tokens=1), headers=auth(name),
                   timeout=30)


def action(router, name: str, path: str):
    return request("POST", f"{router.url}/api/models/{path}", headers=auth(name), timeout=30)


def status(router, model: str) -> str:
    return request("GET", f"{router.url}/api/models/{model}/info", headers=auth("admin")).json()["model"]["status"]


@pytest.fixture
def lab(procs, redis_url, tmp_path):
    """One worker with ``chat``, ``small-a`` (alias ``tiny``, auto_start) and ``vis-1``; a router
    with the keys above."""
    config = write_config(tmp_path / "host.toml", model_block("chat"), model_block("small-a", aliases=["tiny"],
                          auto_start=True), model_block("vis-1"))
    start_worker(procs, redis_url, config, "wacc")
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS_TOML)
    return keyed_router(procs, redis_url, keys)


def keyed_router(procs, redis_url, keys):
    router = start_router(procs, redis_url, env={"LLM_ROUTER_API_KEYS_FILE": str(keys), "LLM_ROUTER_ADMIN_KEYS": ADMIN})
    wait_for(lambda: len(listed(router, "admin")) == 3, timeout=20, message="3 models listed")
    return router


def listed(router, name: str) -> list[str]:
    resp = request("GET", f"{router.url}/v1/models", headers=auth(name))
    assert resp.status == 200, resp.body
    return [m["id"] for m in resp.json()["data"]]


def test_models_lists_and_serves_only_what_a_key_may_use(lab, procs, redis_url, tmp_path) -> None:
    other = keyed_router(procs, redis_url, tmp_path / "keys.toml")  # permissions hold on every router
    for router in (lab, other):
        assert listed(router, "vera") == ["vis-1"]
        assert listed(router, "tom") == ["chat", "small-a"]
        assert listed(router, "olga") == ["chat", "small-a", "vis-1"]
    assert chat(other, "vera", "chat").json()["error"]["code"] == "model_not_allowed"

    resp = chat(lab, "vera", "chat")
    assert resp.status == 403, resp.body
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("permission_error", "model_not_allowed")
    assert "'chat'" in error["message"] and "'vera'" in error["message"]
    resp = request("GET", f"{lab.url}/v1/models/chat", headers=auth("vera"))
    assert resp.status == 403 and resp.json()["error"]["code"] == "model_not_allowed"
    assert status(lab, "chat") == "stopped"  # the refused request started nothing

    wait_for(lambda: status(lab, "small-a") == "running", timeout=20, message="small-a auto-started")
    assert chat(lab, "tom", "tiny").status == 200  # an alias of a model in scope (small-*)
    assert chat(lab, "vera", "vis-1").status == 200  # "listed": may start what it may use


def test_a_key_that_may_not_start_gets_a_403_unless_a_start_is_under_way(lab) -> None:
    resp = chat(lab, "tom", "chat")
    assert resp.status == 403, resp.body
    error = resp.json()["error"]
    assert error["code"] == "model_start_not_allowed"
    assert "'chat' is not running" in error["message"] and "'tom'" in error["message"]
    assert status(lab, "chat") == "stopped"

    # a start under way for someone else: tom's request waits for it and is served
    assert action(lab, "admin", "chat/start?wait=false").status == 202
    assert chat(lab, "tom", "chat").status == 200
    assert action(lab, "admin", "chat/stop").status == 200
    assert chat(lab, "tess", "chat").status == 200  # her own start = "any" wins over the group's


def test_a_scoped_admin_key_acts_within_its_scope_only(lab) -> None:
    wait_for(lambda: status(lab, "small-a") == "running", timeout=20, message="small-a auto-started")
    assert action(lab, "admin", "chat/start").status == 200

    resp = action(lab, "sam", "chat/stop")
    assert resp.status == 403 and resp.json()["success"] is False, resp.body
    assert "'chat' is outside the admin scope of key 'sam'" in resp.json()["message"]
    assert request("POST", f"{lab.url}/api/logs/chat/clear", headers=auth("sam")).status == 403
    assert action(lab, "sam", "tiny/stop").status == 200  # in scope through its id small-a
    assert action(lab, "sam", "tiny/start").status == 200
    assert request("POST", f"{lab.url}/api/logs/small-a/clear", headers=auth("sam")).status == 200
    assert action(lab, "tom", "small-a/stop").status == 403  # a plain client key is no admin

    resp = action(lab, "sam", "restart-autostart")
    assert resp.status == 200 and resp.json()["started_models"] == ["small-a"], resp.body
    resp = action(lab, "sam", "stop-all")
    assert resp.status == 200 and resp.json()["models"] == ["small-a"], resp.body
    assert status(lab, "small-a") == "stopped" and status(lab, "chat") == "running"  # out of sam's scope
    resp = action(lab, "admin", "stop-all")  # the admin file's key: the whole lab
    assert resp.status == 200 and resp.json()["models"] == ["chat"], resp.body
    assert status(lab, "chat") == "stopped"


@pytest.mark.parametrize("entry, message", [
    ('models = "chat"', "keys[0] ('a'): field 'models'"),
    ('start = "sometimes"', "keys[0] ('a'): field 'start'"),
    ("admin = []", "keys[0] ('a'): field 'admin'"),
])
def test_a_bad_permission_stops_the_router_with_one_line(tmp_path, entry, message) -> None:
    assert_bad_keys_file(tmp_path / "keys.toml", f'[[keys]]\nname = "a"\nkey = "0123456789abcdef0123"\n{entry}\n',
                         message)


def test_a_bad_group_permission_names_the_group(tmp_path) -> None:
    assert_bad_keys_file(tmp_path / "keys.toml", '[groups.g]\nstart = "all"\n[[keys]]\nname = "a"\n'
                         'key = "0123456789abcdef0123"\ngroup = "g"\n', "group 'g': field 'start'")


def test_access_rules() -> None:
    assert access_of("k", None, None, None) is None  # no permissions: nothing to check per request
    a = Access("k", Scope(["chat", "small-*"]), "listed", Scope(["small-*"]))
    assert a.may_use(("x", "small-b")) and not a.may_use(("vis-1",))
    assert a.may_start(("chat",)) and not a.may_start(("vis-1",))
    assert Access("k", start="none").may_start(("chat",)) is False
    assert a.may_administer(("small-b",)) and not a.may_administer(("chat",))
    assert Access("k").may_administer(("anything",))  # no scope of its own: its role decides
    assert not Scope(["chat"]).matches(("chat-2",))  # an id is matched whole, not as a prefix


def test_every_keys_file_of_the_docs_parses(tmp_path) -> None:
    """A ``toml`` block with ``[[keys]]`` in README.md or docs/*.md is a keys file a reader will
    copy: it must load (its ``sha256:...`` placeholders filled with distinct keys)."""
    found = 0
    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        for block in blocks_and_prose(read(doc))[0]:
            text = "\n".join(block.lines)
            if block.lang != "toml" or "[[keys]]" not in text:
                continue
            filled = iter(range(1000))
            text = re.sub(r'"sha256:\.\.\."', lambda _: f'"placeholder-key-{next(filled):04d}-0123456789"', text)
            assert parse_structured_keys(text, f"{doc.name}:{block.line}", False), f"{doc.name}:{block.line}"
            found += 1
    assert found >= 2  # the quotas example (docs/security.md) and the lab example (README.md)
