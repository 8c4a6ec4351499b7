"""The one SSE parser (``llm_router.sse``), used by the CLI, the tests and the bench: the same
events whatever the split points of the byte stream."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from llm_lab_router.sse import SseEvent, SseParser, sse_events

STREAM = (": keep-alive\n\n"
          "id: 5-0\r\ndata: {\"type\":\r\ndata:  \"x\"}\r\n\r\n"
          "event: ignored\nretry: 100\ndata: 你好 🚀\n\n"
          "data: [DONE]\n\n"
          "data: never ended").encode()
EXPECTED = [
    SseEvent(comment="keep-alive"),
    SseEvent(id="5-0", data='{"type":\n "x"}'),
    SseEvent(data="你好 🚀"),
    SseEvent(data="[DONE]"),
]


def parse(chunks: list[bytes]) -> list[SseEvent]:
    parser = SseParser()
    return [event for chunk in chunks for event in parser.feed(chunk)]


def test_whole_stream():
    events = parse([STREAM])
    assert events == EXPECTED
    assert events[1].json() == {"type": "x"}


def test_every_single_split_point():
    body = STREAM
    for i in range(len(body) + 1):
        assert parse([body[:i], body[i:]]) == EXPECTED, i


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_any_split_points_give_the_same_events(cuts):
    body = STREAM
    bounds = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *bounds], [*bounds, len(body)])]
    assert parse(chunks) == EXPECTED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=30),
                min_size=1, max_size=5),
       st.integers(min_value=1, max_value=7))
def test_data_lines_round_trip(lines, chunk_size):
    """Any text (UTF-8 split mid-character included) comes back as it was sent."""
    body = "".join(f"data: {line}\n" for line in lines).encode() + b"\n"
    chunks = [body[i:i + chunk_size] for i in range(0, len(body), chunk_size)]
    assert parse(chunks) == [SseEvent(data="\n".join(lines))]


def test_sse_events_over_lines_as_a_client_reads_them():
    lines = [b": loading model 'm'\n", b"\n", b'data: {"a": 1}\n', b"\n"]
    assert [e.json() if e.data else e.comment for e in sse_events(lines)] == ["loading model 'm'", {"a": 1}]
