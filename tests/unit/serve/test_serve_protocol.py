"""The server's request validation and stop-sequence cutting, without a model."""

from __future__ import annotations

import json

import pytest

from alignkit.serve.protocol import RequestError, StopMatcher, parse_request

MSGS = [{"role": "user", "content": "hi"}]


def body(**kw) -> bytes:
    return json.dumps({"model": "m", "messages": MSGS, **kw}).encode()


def test_defaults_follow_openai():
    req = parse_request(body())
    assert req.temperature == 1.0 and req.top_p == 1.0 and req.max_tokens is None
    assert req.stop == [] and req.stream is False and req.include_usage is False


def test_fields_are_read():
    req = parse_request(
        body(
            max_tokens=7, temperature=0, top_p=0.5, stop="##", stream=True, seed=3,
            stream_options={"include_usage": True},
            messages=[
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": t} for t in "ab"]},
            ],
        )
    )  # fmt: skip
    assert (req.max_tokens, req.temperature, req.top_p, req.seed) == (7, 0.0, 0.5, 3)
    assert req.stop == ["##"] and req.stream and req.include_usage
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert parse_request(body(max_completion_tokens=9)).max_tokens == 9
    assert parse_request(body(top_p=0)).top_p == 0.0


@pytest.mark.parametrize(
    "raw, param",
    [
        (b"{oops", None),
        (b'"text"', None),
        (json.dumps({"model": "m"}).encode(), "messages"),
        (body(messages=[]), "messages"),
        (body(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (body(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (body(n=3), "n"),
        (body(temperature=2.5), "temperature"),
        (body(temperature="hot"), "temperature"),
        (body(max_tokens=0), "max_tokens"),
        (body(max_tokens=True), "max_tokens"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (body(stop=[""]), "stop"),
        (body(stream="yes"), "stream"),
    ],
)
def test_bad_requests(raw, param):
    with pytest.raises(RequestError) as info:
        parse_request(raw)
    assert info.value.status == 400 and info.value.param == param
    err = info.value.body()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


def feed_all(stops, pieces):
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces) + m.flush()
    return out, m.stopped


def test_stop_matcher():
    assert feed_all(["END"], ["ab", "c"]) == ("abc", False)
    assert feed_all(["END"], ["abcE", "N", "Dxyz"]) == ("abc", True)  # split across pieces
    assert feed_all(["END"], ["abcEN", "x"]) == ("abcENx", False)  # a false start is sent
    assert feed_all(["xy", "b"], ["aaxb", "y"]) == ("aax", True)  # the earliest stop wins
    assert feed_all([], ["a", "b"]) == ("ab", False)


def test_stop_matcher_holds_back_only_possible_prefixes():
    m = StopMatcher(["END"])
    assert m.feed("abcE") == "abc"  # "E" may start "END"
    assert m.feed("x") == "Ex"
    assert m.feed("EN") == ""
    assert m.feed("D tail") == "" and m.stopped
    assert m.feed("more") == "" and m.flush() == ""
