"""An instance leaves a router's routing when its Redis key goes, whatever its ``updated_at``.

``updated_at`` is written by the worker (or by whoever forged the hash): a router must not
compare it with its own clock. A record stamped an hour ahead used to outlive its key:
after ``DEL llm:instance:...`` requests still went to its URL.
"""

from __future__ import annotations

import time

from conftest import wait_for
from helpers import FakeWorker, chat_body, engine_stats, get_json, request, start_router, wait_engine, wait_routable
from llm_lab_router.protocol import CatalogEntry, Event, Instance, to_hash, to_json

CHAT = CatalogEntry(id="chat", aliases=["chat"], mode="chat", on_demand=False)


def test_deleted_instance_stops_receiving_requests_even_if_stamped_in_the_future(procs, redis_url, rds,
                                                                                 mock_engine) -> None:
    fake = FakeWorker(rds, "w-stale")
    fake.publish(CHAT)
    _, engine = mock_engine("--quiet", model="chat")
    wait_engine(engine)
    router = start_router(procs, redis_url)  # resyncs every 0.5 s (helpers.ROUTER_ENV)
    forged = Instance(model="chat", worker=fake.wid, state="running", url=engine, updated_at=time.time() + 3600)
    rds.hset(fake.keys.instance("chat", fake.wid), mapping=to_hash(forged))
    rds.publish(fake.keys.events(fake.wid), to_json(Event(kind="instance", worker=fake.wid, instance=forged)))
    wait_routable(router, "chat")
    assert request("POST", f"{router.url}/v1/chat/completions", chat_body("chat")).status == 200

    rds.delete(fake.keys.instance("chat", fake.wid))  # no event: only a resync can notice
    fake.publish()  # the lease stays fresh: the worker is alive, only the instance is gone
    wait_for(lambda: get_json(f"{router.url}/v1/models")["data"][0]["status"] != "running", timeout=10,
             message="the router to drop the deleted instance")
    served = engine_stats(engine)["requests"]
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("chat"))
    assert resp.status == 503, resp.body
    assert engine_stats(engine)["requests"] == served
