"""OpenAIJudge through the official openai client against a small fake OpenAI-compatible server:
verdict parsing, position-bias cancelling, ties, retries with backoff, an unreachable endpoint."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignkit.errors import AlignkitError
from alignkit.eval.judge import JudgeUnavailable, OpenAIJudge, normalise_url, parse_verdict
from alignkit.eval.winrate import wilson_interval, win_rate


class FakeHandler(BaseHTTPRequestHandler):
    """Answers like a judge model; its behaviour is set on the server object."""

    server: FakeServer

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        srv.requests.append(body)
        time.sleep(srv.delay)
        if srv.failures > 0:
            srv.failures -= 1
            return self._send(500, {"error": {"message": "overloaded", "type": "server_error"}})
        if srv.status != 200:
            return self._send(srv.status, {"error": {"message": "nope", "type": "auth"}})
        user = body["messages"][-1]["content"]
        text = srv.reply(user.split("[Answer A]")[1].split("[Answer B]"))
        self._send(200, {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })  # fmt: skip

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.requests: list[dict] = []
        self.failures = 0
        self.status = 200
        self.delay = 0.0
        self.reply = prefers_good

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def prefers_good(answers):
    a, b = ("GOOD" in x for x in answers)
    return "tie" if a == b else "A" if a else "B"


@pytest.fixture
def fake():
    srv = FakeServer()
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def judge_for(srv, **kw):
    kw = {"retries": 2, "backoff_s": 0.01, "timeout_s": 5.0, **kw}
    return OpenAIJudge(srv.url, "judge", **kw)


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("A", "first"), ("B", "second"), ("tie", "tie"), ("Tie.", "tie"), (" b\n", "second"),
        ("**A**", "first"), ('"B"', "second"), ("[[A]]", "first"), ("Answer: B", "second"),
        ("Verdict - tie", "tie"), ("A\nBecause it is clearer.", "first"), ("TIE!", "tie"),
        ("A is better", None), ("B, because", None), ("Both", None), ("", None), (None, None),
        ("C", None), ("A or B", None), ("I cannot decide", None), ("AB", None),
    ],
)  # fmt: skip
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_url_and_key(monkeypatch):
    assert normalise_url("http://h:8000") == "http://h:8000/v1"
    assert normalise_url("https://api.example.com/v1/") == "https://api.example.com/v1"
    with pytest.raises(AlignkitError, match="not an http"):
        OpenAIJudge("localhost:8000", "m")
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key_env="MY_JUDGE_KEY")  # local: no key needed
    with pytest.raises(AlignkitError, match="MY_JUDGE_KEY is not set"):
        OpenAIJudge("https://api.example.com/v1", "m", api_key_env="MY_JUDGE_KEY")
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    assert OpenAIJudge("https://api.example.com", "m", api_key_env="MY_JUDGE_KEY").client.api_key


def test_win_rate_over_http(fake):
    model = ["GOOD one", "meh", "GOOD too", "meh"]
    ref = ["meh", "GOOD ref", "GOOD ref", "meh"]
    result = win_rate(["q1", "q2", "q3", "q4"], model, ref, judge_for(fake))
    assert (result.wins, result.losses, result.ties, result.unparseable) == (1, 1, 2, 0)
    assert result.win_rate == 0.5
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(0.5, 4))
    assert len(fake.requests) == 8  # both orders of every prompt
    first, second = fake.requests[:2]
    assert first["temperature"] == 0 and first["model"] == "judge"
    assert first["messages"][0]["role"] == "system" and '"A"' in first["messages"][0]["content"]
    shown_1, shown_2 = first["messages"][1]["content"], second["messages"][1]["content"]
    assert shown_1.index("GOOD one") < shown_1.index("meh")  # the model's answer first ...
    assert shown_2.index("meh") < shown_2.index("GOOD one")  # ... then second
    assert result.records[0]["raw"] == ["A", "B"]


def test_position_bias_over_http_is_a_tie(fake):
    fake.reply = lambda answers: "A"  # always the first position
    result = win_rate(["q1", "q2"], ["GOOD", "meh"], ["meh", "GOOD"], judge_for(fake))
    assert (result.ties, result.n, result.win_rate) == (2, 2, 0.5)


def test_rambling_judge_is_unparseable(fake):
    fake.reply = lambda answers: "Answer A is better because it is longer."
    result = win_rate(["q"], ["GOOD"], ["meh"], judge_for(fake))
    assert result.unparseable == 1 and result.n == 0 and result.wins == 0
    assert result.records[0]["raw"][0].startswith("Answer A is better")


def test_server_errors_are_retried(fake):
    fake.failures = 2
    judge = judge_for(fake, retries=2)
    assert judge.compare("q", "GOOD", "meh") == "first"
    assert len(fake.requests) == 3


def test_refusal_is_not_retried(fake):
    fake.status = 401
    with pytest.raises(JudgeUnavailable, match=r"refused the request \(401\)") as info:
        judge_for(fake, retries=3).compare("q", "a", "b")
    assert len(fake.requests) == 1
    assert "API key" in str(info.value)


def test_timeouts_are_retried_then_unavailable(fake):
    fake.delay = 1.0
    with pytest.raises(JudgeUnavailable, match="after 2 attempts") as info:
        judge_for(fake, retries=1, timeout_s=0.2).compare("q", "a", "b")
    assert "Timeout" in str(info.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_unreachable_endpoint_keeps_partial_results(fake):
    judge = judge_for(fake, retries=3, backoff_s=0.05)

    def stop_after_first(record):
        if record["index"] == 0:  # the endpoint goes away after the first prompt
            judge.client = judge.client.with_options(
                base_url=f"http://127.0.0.1:{_closed_port()}/v1"
            )

    start = time.monotonic()
    with pytest.raises(JudgeUnavailable) as info:
        win_rate(["q1", "q2", "q3"], ["GOOD"] * 3, ["meh"] * 3, judge, on_record=stop_after_first)
    elapsed = time.monotonic() - start
    exc = info.value
    assert "unreachable after 4 attempts" in str(exc) and "APIConnectionError" in str(exc)
    assert "judged so far are kept" in str(exc)
    assert exc.partial.wins == 1 and exc.partial.n == 1 and len(exc.partial.records) == 1
    # backoff 0.05 + 0.1 + 0.2 s between the four attempts
    assert 0.35 <= elapsed < 10


def test_unreachable_from_the_start():
    url = f"http://127.0.0.1:{_closed_port()}"
    judge = OpenAIJudge(url, "m", retries=1, backoff_s=0.01, timeout_s=2)
    with pytest.raises(JudgeUnavailable, match=f"127.0.0.1:{url.rsplit(':', 1)[1]}/v1") as info:
        win_rate(["q"], ["a"], ["b"], judge)
    assert info.value.partial.n == 0 and info.value.partial.records == []
