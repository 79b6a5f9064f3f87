"""`alignkit serve` through the official openai client over real HTTP, on a tiny random model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import types
import urllib.error
import urllib.request

import openai
import pytest

from alignkit.errors import AlignkitError
from alignkit.eval.judge import OpenAIJudge, parse_verdict
from alignkit.eval.winrate import win_rate
from alignkit.models import load_for_inference
from alignkit.serve import ChatEngine, make_server

MSGS = [{"role": "user", "content": "Say something about the sea."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    model, tok = load_for_inference(tiny_model_dir, "cpu")
    srv = make_server(ChatEngine(model, tok, "tiny", max_new_tokens=12), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=30)


def test_completion_plain(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    # a random model does not find its end-of-turn token within 5 tokens
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_server_limit_caps_max_tokens(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0)
    assert r.usage.completion_tokens == 12  # the server's --max-new-tokens
    assert r.choices[0].finish_reason == "length"


def test_streaming_matches_plain(client):
    kwargs = dict(model="tiny", messages=MSGS, max_tokens=6, temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_stream_ends_with_done(server):
    body = {"messages": MSGS, "max_tokens": 3, "temperature": 0, "stream": True}
    req = urllib.request.Request(
        server.base_url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = [line for line in resp.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_sampling_with_seed_is_reproducible(client):
    kwargs = dict(model="tiny", messages=MSGS, max_tokens=8, temperature=1.5, seed=7)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_no_messages_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[])
    assert "messages" in str(info.value)


@pytest.mark.parametrize(
    "data",
    [b"{not json", b"[1, 2]", json.dumps({"messages": MSGS, "n": 2}).encode()],
)
def test_bad_request_is_openai_error(server, data):
    req = urllib.request.Request(server.base_url + "/chat/completions", data=data)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 400
    body = json.loads(info.value.read())
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


def test_server_survives_bad_requests(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSGS, temperature=5)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_judge_counts_random_answers_as_unparseable(server):
    judge = OpenAIJudge(server.base_url, "tiny", retries=0, timeout_s=30)
    result = win_rate(["q1", "q2"], ["model a1", "model a2"], ["ref 1", "ref 2"], judge)
    # what the random model replied, parsed the same way: nothing may be guessed
    for rec in result.records:
        verdicts = [parse_verdict(raw) for raw in rec["raw"]]
        assert verdicts == [rec["model_first"], rec["reference_first"]]
    assert result.unparseable == 2 and result.n == 0
    assert result.wins == result.losses == result.ties == 0


def test_stop_sequence_cuts_the_reply(client):
    kwargs = dict(model="tiny", messages=MSGS, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    assert len(full) > 8
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    r = client.chat.completions.create(**kwargs, stop=[stop, "\x00never"])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_cli_serves_and_stops_cleanly_on_ctrl_c(tiny_model_dir):
    cmd = [sys.executable, "-m", "alignkit", "serve", "--model", tiny_model_dir, "--port", "0"]
    cmd += ["--max-new-tokens", "3"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:  # the log line names the port it got
            line = proc.stderr.readline()
            assert line, "the server exited before listening"
        url = re.search(r"(http://\S+/v1)", line).group(1)
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
        r = client.chat.completions.create(model="x", messages=MSGS, top_p=0, temperature=1)
        assert r.usage.completion_tokens == 3
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert proc.returncode == 0, rest
    assert "Traceback" not in rest and "stopping" in rest


def test_port_in_use_is_a_clear_error(server):
    port = server.server_address[1]
    with pytest.raises(AlignkitError, match=f"cannot listen on 127.0.0.1:{port}") as info:
        make_server(None, "127.0.0.1", port)
    assert "--port" in str(info.value)


def test_client_leaving_mid_stream_frees_the_server(server, client):
    body = {"messages": MSGS, "max_tokens": 12, "temperature": 0, "stream": True}
    req = urllib.request.Request(
        server.base_url + "/chat/completions", data=json.dumps(body).encode()
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.readline().startswith(b"data: ")  # then hang up mid-stream
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_unknown_route_is_404(server):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.base_url + "/completions/legacy", timeout=30)
    assert info.value.code == 404
    assert "no route" in json.loads(info.value.read())["error"]["message"]


KEY = "sk-test-key"


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir):
    model, tok = load_for_inference(tiny_model_dir, "cpu")
    engine = ChatEngine(model, tok, "tiny", max_new_tokens=4)
    srv = make_server(engine, "127.0.0.1", 0, api_key=KEY)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def keyed_client(server, key):
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=30)


def test_api_key_right_key_is_served(keyed_server):
    client = keyed_client(keyed_server, KEY)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    assert r.usage.completion_tokens == 2
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_api_key_wrong_key_is_401(keyed_server):
    client = keyed_client(keyed_server, "sk-wrong")
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"
    assert "Authorization: Bearer KEY" in info.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_api_key_missing_is_401_for_every_route(keyed_server):
    body = json.dumps({"messages": MSGS, "max_tokens": 2}).encode()
    for req in (
        urllib.request.Request(keyed_server.base_url + "/chat/completions", data=body),
        urllib.request.Request(keyed_server.base_url + "/models"),
    ):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=30)
        assert info.value.code == 401
        error = json.loads(info.value.read())["error"]
        assert error["code"] == "invalid_api_key" and error["message"].startswith("no API key")


def test_cli_takes_the_key_from_the_environment(tiny_model_dir):
    cmd = [sys.executable, "-m", "alignkit", "serve", "--model", tiny_model_dir, "--port", "0"]
    env = {**os.environ, "ALIGNKIT_API_KEY": KEY}
    proc = subprocess.Popen(
        cmd + ["--max-new-tokens", "2"], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited before listening"
            assert "without an API key" not in line  # loopback only
        url = re.search(r"(http://\S+/v1)", line).group(1)
        server = types.SimpleNamespace(base_url=url)
        with pytest.raises(openai.AuthenticationError):
            keyed_client(server, "sk-wrong").models.list()
        assert [m.id for m in keyed_client(server, KEY).models.list()]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        proc.kill()


def test_serving_beyond_loopback_without_a_key_warns():
    from alignkit.serve import exposure_warning

    everyone = make_server(None, "0.0.0.0", 0)
    local = make_server(None, "127.0.0.1", 0)
    keyed = make_server(None, "0.0.0.0", 0, api_key=KEY)
    try:
        assert "without an API key" in exposure_warning(everyone)
        assert "--api-key" in exposure_warning(everyone)
        assert exposure_warning(local) is None and exposure_warning(keyed) is None
    finally:
        for srv in (everyone, local, keyed):
            srv.server_close()
